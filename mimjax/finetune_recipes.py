r"""End-to-end fine-tuning of a pre-trained encoder, as each pre-training method's paper ran it.

The recipe table is a library fact: `mimjax.evaluate --protocol finetune` picks the recipe the
pre-training run's framework names (`Framework.finetune_recipe`), `interop/hub` exports the same
values as a timm command, and `configs/finetune.py` is the user-facing recipe that calls `config`.

Every recipe is MAE's `main_finetune.py` with the arguments of its FINETUNE.md (the supervised
framework: mixup 0.8, cutmix 1.0, label smoothing 0.1, RandAugment m9-mstd0.5, random erasing
0.25; `models_vit.py`'s global pool into a fresh `fc_norm`, the pre-trained final norm dropped;
head trunc-normal std 2e-5; the position embedding trained; AdamW (0.9, 0.999), weight decay
0.05; warmup then cosine), with the values in which the method's own fine-tuning differs:

  recipe=mae          MAE FINETUNE.md: layer decay 0.65 (B) / 0.75 (L, H), base lr 5e-4 (B) /
                      1e-3 (L, H) per 256 at batch 1024, drop path 0.1 / 0.2 / 0.3 (B / L / H),
                      100 (B) / 50 (L, H) epochs, 5 warmup epochs.
  recipe=mae_lut,     LUT's docs/FINETUNE.md and MTO's Table 4 (= MAE's paper Table 9): base lr
  recipe=mae_mto      1e-3 per 256, layer decay 0.75.
  recipe=simmim,      SimMIM's simmim_finetune__vit_base yaml: base lr 1.25e-3 per 512 at batch
  recipe=simmim_mto   2048 (5e-3), layer decay 0.65, 20 warmup epochs from 1e-6, min lr 1e-6,
                      gradient clipping 5.
  recipe=distill,     naver-ai/dtm docs/Evaluation.md: lr 5e-4 at batch 1024 unscaled, layer decay
  recipe=distill_dtm  0.65, 10 warmup epochs from 1e-6 (the paper's Table J).

docs/recipes.md lists every value against the papers and the reference code. Sizes MAE does not
fine-tune (Ti, S, ...) take B's values; the other recipes are their papers' ViT-B values at every
size.
"""
from mimjax import config_lib
from mimjax import recipe_lib

# MAE's FINETUNE.md per model size (sizes it does not list use B's values).
LAYER_DECAY = {'L': 0.75, 'H': 0.75}
DROP_PATH = {'L': 0.2, 'H': 0.3}
BASE_LR = {'L': 1e-3, 'H': 1e-3}
EPOCHS = {'L': 50, 'H': 50}

# What each method's fine-tuning changes in MAE's ViT-B recipe: (config key -> value, warmup
# epochs). LUT and MAE + MTO, SimMIM and SimMIM + MTO, distill and DTM share one recipe each.
_MAE_TABLE9 = ({'optim.base_lr': 1e-3, 'optim.layer_decay': 0.75}, 5)
_SIMMIM = ({'batch_size': 2048, 'optim.base_lr': 1.25e-3, 'optim.lr_base_batch': 512,
            'optim.layer_decay': 0.65, 'optim.warmup_init_lr': 1e-6, 'optim.min_lr': 1e-6,
            'optim.grad_clip': 5.0}, 20)
_DTM = ({'optim.base_lr': 5e-4, 'optim.lr_base_batch': 1024, 'optim.layer_decay': 0.65,
         'optim.warmup_init_lr': 1e-6}, 10)
RECIPES = {'mae': ({}, 5), 'mae_lut': _MAE_TABLE9, 'mae_mto': _MAE_TABLE9, 'simmim': _SIMMIM,
           'simmim_mto': _SIMMIM, 'distill': _DTM, 'distill_dtm': _DTM}


def from_arg(arg=None):
  """`config` of a `configs/finetune.py:ARG` argument string, e.g. 'model=L/16,recipe=simmim'."""
  arg = recipe_lib.parse_arg(arg, model='B/16', recipe='mae', epochs=0, runlocal=False)
  return config(arg.model, arg.recipe, arg.epochs, arg.runlocal)


def config(model='B/16', recipe='mae', epochs=0, runlocal=False):
  """The fine-tuning config of a `model` variant under `recipe` for `epochs` (0: MAE's per size);
  `runlocal`: Fashion-MNIST, a small ViT, minutes on 2 CPU cores."""
  if recipe not in RECIPES:
    raise ValueError(f'Unknown fine-tuning recipe {recipe!r}; choose one of {sorted(RECIPES)}.')
  size = model.partition('/')[0]
  epochs = epochs or EPOCHS.get(size, 100)
  c = config_lib.base_config()
  c.framework = 'supervised'
  c.model.variant = model
  # models_vit.py's pos_embed is an nn.Parameter: the pre-trained table is trained on.
  c.model.posemb = 'learn'
  c.model.pool = 'gap'
  c.model.fc_norm = True
  c.model.num_classes = 1000
  c.model.weight_init = 'timm'  # timm's VisionTransformer: trunc_normal_(std=.02) on every Linear
  c.model.head_init_std = 2e-5  # main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
  c.model.drop_path = DROP_PATH.get(size, 0.1)
  recipe_lib.apply_moto_stem(c)
  c.batch_size = 1024
  c.optim.layer_decay = LAYER_DECAY.get(size, 0.65)
  c.optim.base_lr = BASE_LR.get(size, 5e-4)
  c.optim.lr_base_batch = 256
  c.optim.min_lr = 1e-6
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.data.augment = 'deit'  # RandAugment m9-mstd0.5 and random erasing 0.25: the schema's values
  c.data.crop_scale = (0.08, 1.0)
  c.data.repeated_aug = 1  # MAE's main_finetune.py samples with a plain DistributedSampler
  c.init.format = 'mimjax'
  c.log.images_every_steps = 0
  changes, warmup_epochs = RECIPES[recipe]
  for key, value in changes.items():
    section, _, field = key.rpartition('.')
    (c[section] if section else c)[field] = value
  c.total_steps = recipe_lib.steps_for_epochs(epochs, 'imagenet2012', c.batch_size)
  c.warmup_steps = recipe_lib.steps_for_epochs(warmup_epochs, 'imagenet2012', c.batch_size)
  c.eval.every_steps = recipe_lib.steps_for_epochs(5, 'imagenet2012', c.batch_size)
  if runlocal:
    recipe_lib.apply_runlocal(c)
    c.model.num_classes = 10
    c.model.drop_path = 0.0
    c.optim.base_lr = 2e-3  # peak 1e-3 at batch 128
    c.optim.lr_base_batch = 256
    c.optim.warmup_init_lr = 0.0
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
  c.lock()
  return c
