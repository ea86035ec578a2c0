r"""End-to-end fine-tuning of a pre-trained encoder, MAE's ImageNet-1k recipe (He et al., 2022).

  python -m mimjax.evaluate --workdir DIR --protocol finetune      # derives this config from DIR
  python -m mimjax.train --config configs/finetune.py:model=B/16 --workdir FT \
      --config.init.checkpoint=PRETRAIN_WORKDIR

MAE's `main_finetune.py` with the arguments of its FINETUNE.md: the supervised framework (mixup
0.8, cutmix 1.0, label smoothing 0.1, RandAugment m9-mstd0.5, random erasing 0.25), its
`models_vit.py` model with global_pool (the mean patch token, then a fresh `fc_norm`; the
pre-trained final norm is dropped), the head initialised trunc-normal std 2e-5, the position
embedding trained (the pre-trained sin-cos table loaded into a learned one), layer-wise lr decay
0.65 (B) / 0.75 (L, H), base lr 5e-4 (B) / 1e-3 (L, H) per 256 images at batch 1024, drop path
0.1 / 0.2 / 0.3 (B / L / H), 100 (B) / 50 (L, H) epochs, 5 warmup epochs then cosine.
Arguments: model=<variant>, epochs=<int> (default per size as above), runlocal (Fashion-MNIST, a
small ViT, minutes on 2 CPU cores). Sizes MAE does not fine-tune (Ti, S, ...) take B's values.
"""
from configs import common
from configs import supervised

# MAE's FINETUNE.md per model size (sizes it does not list use B's values).
LAYER_DECAY = {'L': 0.75, 'H': 0.75}
DROP_PATH = {'L': 0.2, 'H': 0.3}
BASE_LR = {'L': 1e-3, 'H': 1e-3}
EPOCHS = {'L': 50, 'H': 50}


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=0, runlocal=False)
  size = arg.model.partition('/')[0]
  epochs = arg.epochs or EPOCHS.get(size, 100)
  c = supervised.get_config(f'model={arg.model},epochs={epochs}')
  with c.unlocked():
    # models_vit.py's pos_embed is an nn.Parameter: the pre-trained table is trained on.
    c.model.posemb = 'learn'
    c.model.pool = 'gap'
    c.model.fc_norm = True
    c.model.head_init_std = 2e-5  # main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
    c.model.drop_path = DROP_PATH.get(size, 0.1)
    c.optim.layer_decay = LAYER_DECAY.get(size, 0.65)
    c.optim.base_lr = BASE_LR.get(size, 5e-4)
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
