r"""MAE + MTO (Choi et al.): MTO's losses on the MAE decoder, where MAE's mask tokens live.

  python -m mimjax.train --config configs/mae_mto.py:runlocal --workdir /tmp/mae_mto

Arguments as configs/mae.py; the MTO supplement keeps MAE's recipe (base lr 1.5e-4 at batch 256,
batch 4096, AdamW (0.9, 0.95)), with every loss weight at 1.
"""
from configs import mae


def get_config(arg=None):
  c = mae.get_config(arg)
  c.mto.enabled = True
  c.mto.where = 'decoder'
  return c
