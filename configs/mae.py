r"""MAE pre-training (He et al., 2022), recipe of the paper's ImageNet-1k ViT-B/16 run.

  python -m mimjax.train --config configs/mae.py:runlocal --workdir /tmp/mae
  python -m mimjax.train --config configs/mae.py:model=L/16,epochs=1600 --workdir gs://...

Arguments: model=<variant> (e.g. S/16, B/16, L/16), epochs=<int>, runlocal (offline default data,
small ViT, a few minutes on 2 CPU cores).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=800, runlocal=False)
  c = common.base_config()
  c.framework = 'mae'
  c.model.variant = arg.model
  c.model.posemb = 'sincos2d'
  c.batch_size = 4096
  c.total_steps = common.steps_for_epochs(arg.epochs, 'imagenet2012', c.batch_size)
  c.warmup_steps = common.steps_for_epochs(40, 'imagenet2012', c.batch_size)
  c.optim.base_lr = 1.5e-4
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.mae.mask_ratio = 0.75
  c.mae.norm_pix_loss = True
  if arg.runlocal:
    common.apply_runlocal(c)
    c.optim.base_lr = 1.5e-3
    c.mae.decoder_width = 128
    c.mae.decoder_depth = 2
    c.mae.decoder_heads = 4
  c.lock()
  return c
