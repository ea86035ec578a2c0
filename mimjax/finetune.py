"""Fine-tuning protocol: the supervised trainer on `finetune_recipes`, started from the run.

A command-level module (it trains), not under `eval/`: `train` imports the in-training
evaluation from `eval/`, so nothing in `eval/` imports `train`.

The recipe (layer-wise lr decay, drop path, mixup, cutmix, label smoothing, warmup + cosine) and
MAE's fine-tuning model (global pool, a fresh fc_norm, head init, learned position embedding) come
from `mimjax/finetune_recipes.py`, the recipe the pre-training run's framework names
(`Framework.finetune_recipe`) unless another is named; the architecture and data come from the
pre-training run, and the encoder is initialised from its checkpoint (`init.format='mimjax'`).
Training writes into WORKDIR/finetune (WORKDIR/finetune_random_init for the baseline), so a second
call resumes. With `label_fraction` (the low-label regime) it trains on a class-stratified subset
of the run's training split (`data.label_fraction`, drawn from the run's seed) and writes into
WORKDIR/finetune[_random_init]_labels<fraction>_step<checkpoint step>: one directory per subset and
checkpoint, so fine-tunes of one run's several checkpoints never resume each other. A given
`total_steps` adds `_steps<N>` and a recipe other than the run's own `_recipe<name>`.
"""
import json

from mimjax import config_lib
from mimjax import finetune_recipes
from mimjax import registry
from mimjax import train
from mimjax import workdir_io
from mimjax.eval import loading

# Pre-training fields the fine-tuning run must share (the encoder's shape and the data).
# model.weight_init belongs here too: 'beit' builds the attention without a key bias.
# The position embedding is not shared: a run's table, fixed or learned, becomes the recipe's
# learned one; nor is the relative position bias: any kind is fine-tuned per block ('block').
SHARED = ('model.variant', 'model.cls_token', 'model.layerscale', 'model.weight_init',
          'model.tokenizer_norm', 'model.moto',
          'data.name', 'data.data_dir', 'data.train_split',
          'data.eval_split', 'data.image_size', 'data.channels', 'data.mean', 'data.std', 'seed')


def recipe_for(pretrain):
  """The `finetune_recipes.RECIPES` key of a pre-training config, as its framework names it."""
  return registry.FRAMEWORKS[pretrain.framework].finetune_recipe(pretrain)


def derive_config(run, recipe=None, total_steps=None, label_fraction=None):
  """The fine-tuning config of `run`: `recipe` (an argument string of configs/finetune.py,
  default model=<the run's variant>, plus runlocal for a Fashion-MNIST run; without `recipe=` the
  run's own, `recipe_for`) with SHARED fields copied from the run and the encoder
  initialised from its checkpoint at `run.step`, trained on the `label_fraction` subset of its
  training split when given. A run without an absolute position embedding
  (posemb 'none', BEiT's relative bias) keeps none; one with a relative position bias (block,
  shared or both) is fine-tuned with one per block, started from its own plus the shared table."""
  pre = run.config
  if recipe is None:
    runlocal = ',runlocal' if pre.data.name == 'fashion_mnist' else ''
    recipe = f'model={pre.model.variant}{runlocal}'
  if not any(item.partition('=')[0] == 'recipe' for item in recipe.split(',')):
    recipe += f',recipe={recipe_for(pre)}'
  config = finetune_recipes.from_arg(recipe)
  with config.unlocked():
    for key in SHARED:
      section, _, field = key.rpartition('.')
      (config[section] if section else config)[field] = (pre[section] if section else pre)[field]
    if pre.model.posemb == 'none':
      config.model.posemb = 'none'
    config.model.rel_pos = 'none' if pre.model.rel_pos == 'none' else 'block'
    config.init.checkpoint = '' if run.random_init else str(workdir_io.path(run.workdir))
    config.init.step = run.step
    config.data.label_fraction = float(label_fraction or 0.0)
    if total_steps:  # the warmup keeps its share of the recipe's steps
      config.warmup_steps = round(config.warmup_steps * int(total_steps) / config.total_steps)
      config.total_steps = int(total_steps)
      config.eval.every_steps = min(config.eval.every_steps, config.total_steps)
      config.checkpoint.every_steps = min(config.checkpoint.every_steps, config.total_steps)
  return config


def planned_config(workdir, step=None, finetune_config=None, total_steps=None,
                   label_fraction=None):
  """The config `protocol` would train for the run in `workdir`, read from its config alone (no
  checkpoint is loaded): `evaluate --protocol finetune --print_config`."""
  run = loading.Run(config_lib.read_config(workdir), None, -1 if step is None else step, workdir)
  return derive_config(run, finetune_config, total_steps, label_fraction)


def _named_recipe(run, finetune_config):
  """The recipe `finetune_config` names (its `recipe=` item) when it is not the run's own."""
  items = dict(item.partition('=')[::2] for item in (finetune_config or '').split(',') if item)
  recipe = items.get('recipe')
  return recipe if recipe and recipe != recipe_for(run.config) else None


def workdir_name(run, label_fraction=None, total_steps=None, finetune_config=None):
  """The directory under the run's workdir that the fine-tuning of `run` trains in: one per
  subset and checkpoint, per step count when `total_steps` is given and per recipe when
  `finetune_config` names another than the run's own, so a fine-tune of another length or recipe
  starts its own run instead of meeting a resume that refuses the changed config."""
  name = 'finetune_random_init' if run.random_init else 'finetune'
  if label_fraction:
    name += f'_labels{label_fraction:g}_step{run.step}'
  if total_steps:
    name += f'_steps{int(total_steps)}'
  recipe = _named_recipe(run, finetune_config)
  return f'{name}_recipe{recipe}' if recipe else name


def protocol(run, finetune_config=None, total_steps=None, label_fraction=None):
  """Fine-tunes the encoder end to end; final / best held-out top-1 of the supervised run."""
  config = derive_config(run, finetune_config, total_steps, label_fraction)
  workdir = str(workdir_io.path(run.workdir, workdir_name(run, label_fraction, total_steps,
                                                             finetune_config)))
  config.log.progress_bar = False
  train.train(config, workdir)
  record = json.loads(workdir_io.path(workdir, f'eval_{config.framework}.json').read_text())
  return dict(top1=record['final']['top1'], top5=record['final']['top5'],
              best_top1=record['best']['top1'], best_step=record['best']['step'],
              steps=config.total_steps, layer_decay=config.optim.layer_decay,
              label_fraction=config.data.label_fraction, batch_size=config.batch_size,
              finetune_workdir=workdir)
