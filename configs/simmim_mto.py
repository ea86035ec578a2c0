r"""SimMIM + MTO (Choi et al.): MTO's losses on the SimMIM encoder, which holds the mask tokens.

  python -m mimjax.train --config configs/simmim_mto.py:runlocal --workdir /tmp/simmim_mto

Arguments as configs/simmim.py; the MTO supplement trains SimMIM's recipe unchanged, with every
loss weight at 1.
"""
from configs import simmim


def get_config(arg=None):
  c = simmim.get_config(arg)
  c.mto.enabled = True
  c.mto.where = 'encoder'
  return c
