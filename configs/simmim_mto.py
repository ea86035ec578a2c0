r"""SimMIM + MTO (Choi et al.): MTO's losses on the SimMIM encoder, which holds the mask tokens.

  python -m mimjax.train --config configs/simmim_mto.py:runlocal --workdir /tmp/simmim_mto

Arguments as configs/simmim.py. Recipe: the MTO supplement's Table 3 ("all configs follow the
setting of SimMIM", every loss weight at 1), which lists a cosine decay where SimMIM's official
ViT-B config is multi-step, so the default here is `cosine` (pass cosine=false for SimMIM's).
"""
from configs import simmim


def get_config(arg=None):
  c = simmim.get_config(_cosine_by_default(arg))
  c.mto.enabled = True
  c.mto.where = 'encoder'
  return c


def _cosine_by_default(arg):
  """Adds `cosine` to the argument string unless it sets cosine itself."""
  items = [item for item in (arg or '').split(',') if item]
  if not any(item.partition('=')[0] == 'cosine' for item in items):
    items.append('cosine')
  return ','.join(items)
