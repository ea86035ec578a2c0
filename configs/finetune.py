r"""End-to-end fine-tuning of a pre-trained encoder, MAE's ImageNet-1k recipe (He et al., 2022).

  python -m mimjax.evaluate --workdir DIR --protocol finetune      # derives this config from DIR
  python -m mimjax.train --config configs/finetune.py:model=B/16 --workdir FT \
      --config.init.checkpoint=PRETRAIN_WORKDIR

The supervised framework (mixup 0.8, cutmix 1.0, label smoothing 0.1, RandAugment, random erasing)
with layer-wise lr decay (0.65 for B, 0.75 for L and larger), drop path (0.1 for B, 0.2 for L),
base lr 5e-4 per 256 images at batch 1024, 5 warmup epochs then cosine, global average pooling.
Arguments: model=<variant>, epochs=<int> (100; MAE uses 50 for L/H), runlocal (Fashion-MNIST, a
small ViT, minutes on 2 CPU cores).
"""
from configs import common
from configs import supervised

# MAE's fine-tuning layer-wise lr decay and drop path per model size (others use B's values).
LAYER_DECAY = {'L': 0.75, 'H': 0.75}
DROP_PATH = {'L': 0.2, 'H': 0.3}


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=100, runlocal=False)
  c = supervised.get_config(f'model={arg.model},epochs={arg.epochs}')
  size = arg.model.partition('/')[0]
  with c.unlocked():
    c.model.posemb = 'sincos2d'  # MAE keeps the fixed sin-cos table while fine-tuning
    c.model.pool = 'gap'
    c.model.drop_path = DROP_PATH.get(size, 0.1)
    c.optim.layer_decay = LAYER_DECAY.get(size, 0.65)
    c.optim.base_lr = 5e-4
    c.optim.lr_base_batch = 256
    c.optim.min_lr = 1e-6
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.05
    c.data.repeated_aug = 1  # MAE's main_finetune.py samples with a plain DistributedSampler
    c.init.format = 'mimjax'
    c.eval.every_steps = common.steps_for_epochs(5, 'imagenet2012', c.batch_size)
    if arg.runlocal:
      common.apply_runlocal(c)
      c.model.num_classes = 10
      c.model.drop_path = 0.0
      c.optim.base_lr = 2e-3  # peak 1e-3 at batch 128
      c.total_steps = 600
      c.warmup_steps = 50
      c.data.crop_scale = (0.35, 1.0)
      c.data.randaug_layers = 0  # a few hundred steps of a tiny ViT: regularisation only hurts
      c.data.random_erase = 0.0
      c.supervised.mixup_alpha = 0.0
      c.supervised.cutmix_alpha = 0.0
      c.eval.every_steps = 200
      c.eval.batch_size = 500
      c.checkpoint.every_steps = 600
      c.log.images_every_steps = 0
  return c
