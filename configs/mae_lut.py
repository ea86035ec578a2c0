r"""MAE + LUT (Kim et al.), recipe of the paper and its reference code for ViT-S/16 and ViT-B/16.

  python -m mimjax.train --config configs/mae_lut.py:runlocal --workdir /tmp/lut
  python -m mimjax.train --config configs/mae_lut.py:model=S/16,epochs=1600 --workdir gs://...

Arguments: model=S/16|B/16 (any variant works with an explicit alpha), epochs=<int>, alpha=<float>
(weight of the broader-context loss; by default 1.0 for S and 0.25 for B, as in the paper),
runlocal (offline default data, small ViT, a few minutes on 2 CPU cores).

The reference scales the lr with sqrt(batch) / 4 rather than batch / 256; both give 2.4e-3 at the
recipe's batch of 4096.
"""
from configs import common
from configs import mae

# Paper's loss weight per model size.
ALPHA = {'S': 1.0, 'B': 0.25}


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=1600, alpha=-1.0, runlocal=False)
  size = arg.model.partition('/')[0]
  if arg.alpha < 0 and size not in ALPHA:
    raise ValueError(f'No default LUT alpha for model {arg.model!r}; pass alpha=<float> '
                     f'(the paper uses {ALPHA}).')
  # LUT keeps MAE's recipe: AdamW (0.9, 0.95), wd 0.05, base lr 1.5e-4, 40 warmup epochs, mask
  # ratio 0.75, decoder 8 x 512, norm_pix_loss.
  c = mae.get_config(f'model={arg.model},epochs={arg.epochs}'
                     + (',runlocal' if arg.runlocal else ''))
  c.data.augment = 'lut_two_view'
  c.lut.enabled = True
  c.lut.alpha = arg.alpha if arg.alpha >= 0 else ALPHA[size]
  c.lut.momentum = 0.996
  c.lut.head_dim = 256 if arg.runlocal else 4096
  return c
