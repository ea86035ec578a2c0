r"""SimMIM pre-training (Xie et al., 2022): SimMIM's official ViT-B/16 ImageNet-1k recipe.

  python -m mimjax.train --config configs/simmim.py:runlocal --workdir /tmp/simmim
  python -m mimjax.train --config configs/simmim.py:model=B/16,epochs=800 --workdir gs://...

Arguments: model=<variant>, epochs=<int>, cosine (MTO's Table 3 schedule), runlocal (offline
default data, small ViT, a few minutes on 2 CPU cores).

Recipe: SimMIM's configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml with its
config.py defaults (the `cosine=True` argument gives the MTO supplement's Table 3, as
configs/simmim_mto.py). AdamW (0.9, 0.999), weight decay 0.05 (not on 1-D params, biases,
pos_embed, cls_token), base lr 1e-4 scaled linearly by batch / 512 (4e-4 at the batch of 2048), 10
warmup epochs, then a multi-step schedule: x0.1 from epoch 700 of 800. Gradient clipping at 5,
drop path 0.1, layer scale 0.1, random resized crops of scale (0.67, 1), 32-pixel mask cells, mask
ratio 0.6. SimMIM's own ViT (`models/vision_transformer.py` as the yaml builds it): no absolute
position embedding, one relative position bias shared by all blocks, q and v biases without a k
bias, BEiT's init (std 0.02 cut at +-1 std); the same parameters as timm's
`Beit(use_shared_rel_pos_bias=True, use_abs_pos_emb=False)`. Difference, in docs/recipes.md: the
warmup starts from 0 rather than 5e-7 * batch / 512.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=800, cosine=False, runlocal=False)
  c = common.base_config()
  c.framework = 'simmim'
  c.model.variant = arg.model
  c.model.posemb = 'none'  # yaml USE_APE False
  c.model.rel_pos = 'shared'  # yaml USE_SHARED_RPB True
  # models/simmim.py's VisionTransformerForSimMIM overrides _trunc_normal_ with BEiT's +-1 std cut
  c.model.weight_init = 'beit'
  c.model.drop_path = 0.1
  c.model.layerscale = 0.1
  c.batch_size = 2048
  c.total_steps = common.steps_for_epochs(arg.epochs, 'imagenet2012', c.batch_size)
  c.warmup_steps = common.steps_for_epochs(10, 'imagenet2012', c.batch_size)
  c.optim.base_lr = 1e-4
  c.optim.lr_base_batch = 512
  c.optim.min_lr = 5e-6 * c.batch_size / c.optim.lr_base_batch  # used by the cosine schedule
  if not arg.cosine:
    c.optim.schedule = 'multistep'
    # SimMIM decays at epoch 700 of its 800; other lengths keep the same 7/8 fraction.
    c.optim.milestones = (common.steps_for_epochs(arg.epochs * 7 / 8, 'imagenet2012',
                                                  c.batch_size),)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.optim.grad_clip = 5.0
  c.data.augment = 'simmim'  # data_simmim.py: torchvision's RandomResizedCrop, bilinear
  c.data.crop_scale = (0.67, 1.0)
  c.simmim.mask_ratio = 0.6
  c.simmim.mask_patch_size = 32
  if arg.runlocal:
    common.apply_runlocal(c)
    c.model.drop_path = 0.0
    c.optim.base_lr = 4e-3  # peak 1e-3 at the runlocal batch of 128
    c.optim.min_lr = 0.0
    if not arg.cosine:
      c.optim.milestones = (c.total_steps * 7 // 8,)
    c.simmim.mask_patch_size = 8  # 4 x 4 cells over the 7 x 7 patch grid, cut at the border
  c.lock()
  return c
