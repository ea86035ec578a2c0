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

# Paper's loss weight per model size.
ALPHA = {'S': 1.0, 'B': 0.25}


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=1600, alpha=-1.0, runlocal=False)
  size = arg.model.partition('/')[0]
  if arg.alpha < 0 and size not in ALPHA:
    raise ValueError(f'No default LUT alpha for model {arg.model!r}; pass alpha=<float> '
                     f'(the paper uses {ALPHA}).')
  c = common.base_config()
  c.framework = 'mae'
  c.model.variant = arg.model
  c.model.posemb = 'sincos2d'
  c.batch_size = 4096
  c.total_steps = common.steps_for_epochs(arg.epochs, 'imagenet2012', c.batch_size)
  c.warmup_steps = common.steps_for_epochs(40, 'imagenet2012', c.batch_size)
  c.optim.base_lr = 1.5e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.mae.mask_ratio = 0.75
  c.mae.norm_pix_loss = True
  c.mae.decoder_width = 512
  c.mae.decoder_depth = 8
  c.data.augment = 'lut_two_view'
  c.lut.enabled = True
  c.lut.alpha = arg.alpha if arg.alpha >= 0 else ALPHA[size]
  c.lut.momentum = 0.996
  c.lut.head_dim = 4096
  if arg.runlocal:
    common.apply_runlocal(c)
    c.optim.base_lr = 1.5e-3
    c.mae.decoder_width = 128
    c.mae.decoder_depth = 2
    c.mae.decoder_heads = 4
    c.lut.head_dim = 256
  c.lock()
  return c
