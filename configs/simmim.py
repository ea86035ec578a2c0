r"""SimMIM pre-training (Xie et al., 2022), recipe of the ViT-B/16 ImageNet-1k run.

  python -m mimjax.train --config configs/simmim.py:runlocal --workdir /tmp/simmim
  python -m mimjax.train --config configs/simmim.py:model=B/16,epochs=800 --workdir gs://...

Arguments: model=<variant>, epochs=<int>, runlocal (offline default data, small ViT, a few minutes
on 2 CPU cores).

Recipe (SimMIM's ViT-B config, and the MTO supplement's Table 3): AdamW (0.9, 0.999), weight
decay 0.05, base lr 1e-4 scaled linearly by batch / 512 as SimMIM's code does (4e-4 at the batch
of 2048), 10 warmup epochs, cosine decay to 5e-6 * batch / 512, gradient clipping at 5, drop path
0.1, layer scale 0.1, random resized crops of scale (0.67, 1), 32-pixel mask cells, mask ratio 0.6.
SimMIM's ViT uses a shared relative position bias, which mimjax's ViT does not have; the fixed
sin-cos position embedding stands in for it.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=800, runlocal=False)
  c = common.base_config()
  c.framework = 'simmim'
  c.model.variant = arg.model
  c.model.posemb = 'sincos2d'
  c.model.drop_path = 0.1
  c.model.layerscale = 0.1
  c.batch_size = 2048
  c.total_steps = common.steps_for_epochs(arg.epochs, 'imagenet2012', c.batch_size)
  c.warmup_steps = common.steps_for_epochs(10, 'imagenet2012', c.batch_size)
  c.optim.base_lr = 1e-4
  c.optim.lr_base_batch = 512
  c.optim.min_lr = 5e-6 * c.batch_size / c.optim.lr_base_batch
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.optim.grad_clip = 5.0
  c.data.crop_scale = (0.67, 1.0)
  c.simmim.mask_ratio = 0.6
  c.simmim.mask_patch_size = 32
  if arg.runlocal:
    common.apply_runlocal(c)
    c.model.drop_path = 0.0
    c.optim.base_lr = 4e-3  # peak 1e-3 at the runlocal batch of 128
    c.optim.min_lr = 0.0
    c.simmim.mask_patch_size = 8  # 4 x 4 cells over the 7 x 7 patch grid, cut at the border
  c.lock()
  return c
