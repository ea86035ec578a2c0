"""An encoder as a timm model folder (`--format hub`) and its fine-tuning command for timm train.py.

The folder has the layout timm reads from the Hugging Face hub and from `local-dir:`: config.json
(`architecture`, `model_args`, a `pretrained_cfg` with this model's input size, mean, std, crop and
interpolation), model.safetensors, a model card (README.md) and finetune_timm.sh. So
`timm.create_model('local-dir:DIR', pretrained=True)` rebuilds the model without mimjax, and
`timm.data.resolve_data_config({}, model=model)` gives its transforms. The same folder uploaded to
the hub loads with `hf-hub:USER/NAME`; nothing in it names a path of the machine that wrote it.
An encoder with relative position bias (BEiT / DTM backbones) becomes a timm `Beit` folder.
"""
import json
import os
import shlex

from mimjax import errors
from mimjax import finetune_recipes
from mimjax.interop import beit as beit_lib
from mimjax.interop import timm as timm_lib
from mimjax.interop import torch_files
from mimjax.models import vit

COMMAND_FILE = 'finetune_timm.sh'
FILES = ('config.json', 'model.safetensors', 'README.md', COMMAND_FILE)
# timm's train.py is in its repository, not in the pip package: the one of the pinned release.
TIMM_TRAIN_PY = 'https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/train.py'
# RandAugment as MAE's fine-tuning (rand-m9-mstd0.5-inc1) with the sampled magnitude capped at 9
# (`mmax9`; timm's default cap is 10): at magnitude 10 timm's increasing posterize keeps 0 bits,
# which Pillow >= 13 refuses (`ValueError: bits must be between or equal to 1 and 8`, about 1
# image in 600); at 9 it keeps 1. The cap moves only the draws above 9 of N(9, 0.5^2).
RAND_AUGMENT = 'rand-m9-mstd0.5-inc1-mmax9'
# timm's names of mimjax's sizes (same width, depth, heads and MLP), for config.json.
_TIMM_SIZES = {'Ti': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large', 'H': 'huge'}


def label_names(config):
  """The dataset's class names from its TFDS metadata, or None when it has no `label` names or is
  not prepared on this machine (an export needs the weights, not the data)."""
  from mimjax.data import sources  # pylint: disable=g-import-not-at-top  # loads TensorFlow
  try:
    builder = sources.get_builder(config.data.name, config.data.data_dir, download=False)
  except errors.DatasetError:
    return None
  features = builder.info.features
  names = getattr(features['label'], 'names', None) if 'label' in features else None
  return list(names) if names else None


def pretrained_cfg(config, in_chans, names):
  """timm's `pretrained_cfg` of the export: the evaluation transform mimjax uses for this model."""
  size = config.data.image_size
  cfg = dict(input_size=[in_chans, size, size], fixed_input_size=True,
             mean=list(config.data.mean), std=list(config.data.std),
             crop_pct=config.data.eval_crop_fraction, crop_mode='center',
             interpolation='bicubic', num_classes=config.model.num_classes,
             first_conv='patch_embed.proj', classifier='head')
  if names and config.model.num_classes == len(names):
    cfg['label_names'] = names
  return cfg


def architecture(config, beit):
  """timm's registered model name for config.json's `architecture`.

  timm builds `architecture` with `model_args` on top, so the name selects the class and the
  model_args every dimension; the name is timm's model of the same size where timm has one
  (`vit_small_patch16_224` for S/16, `beit_large_patch16_224` for a BEiT L/16) and otherwise
  timm's smallest model of the class, so it never claims a larger model than the folder holds.
  """
  kw = vit.parse_variant(config.model.variant)
  size = _TIMM_SIZES.get(config.model.variant.partition('/')[0])
  if beit:
    return (f'beit_{size}_patch16_224' if size in ('base', 'large') and kw['patch_size'] == 16
            else beit_lib.TIMM_MODEL)
  known = {('tiny', 16), ('small', 16), ('base', 16), ('large', 16), ('huge', 14), ('small', 32),
           ('base', 32), ('large', 32), ('small', 8), ('base', 8), ('large', 14)}
  if (size, kw['patch_size']) in known:
    return f'vit_{size}_patch{kw["patch_size"]}_224'
  return 'vit_tiny_patch16_224'


def finetune_args(config, names, recipe):
  """timm train.py arguments (all but `--model`) that fine-tune the export with the recipe of the
  run's pre-training method, `recipe` (a `finetune_recipes.RECIPES` key, as the run's framework
  names it: MAE's for mae and supervised runs, LUT's / MTO's, SimMIM's, DTM's for the others).

  The values are those of that recipe's config (`finetune_recipes.config(model, recipe)`):
  AdamW betas, weight decay, base lr per its reference batch (scaled linearly to the global
  batch), layer-wise lr decay, drop path, epochs per model size, warmup epochs and start lr, the
  cosine floor and gradient clipping; `-b` is the recipe's global batch on 8 processes (MAE's
  1024 = 8 x 128). The augmentation is the recipes' shared one: RandAugment m9 (RAND_AUGMENT),
  mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25; average pooling (after the
  exported final norm: timm has no MAE-style norm swap on loading).
  """
  size = config.model.variant.partition('/')[0]
  ft = finetune_recipes.config(config.model.variant, recipe)
  optim = ft.optim
  in_chans = config.data.channels
  dataset = [] if config.data.name == 'imagenet2012' else [
      '--dataset', f'tfds/{config.data.name}', '--dataset-download',
      '--val-split', config.data.eval_split]
  return [
      '--pretrained', '--data-dir', 'DATA_DIR', *dataset,
      '--num-classes', str(len(names)) if names else 'NUM_CLASSES',
      *(['--in-chans', str(in_chans)] if in_chans != 3 else []),
      '--gp', 'avg', '--epochs', str(finetune_recipes.EPOCHS.get(size, 100)),
      '--warmup-epochs', str(finetune_recipes.RECIPES[recipe][1]),
      '--warmup-lr', str(optim.warmup_init_lr), '-b', str(ft.batch_size // 8),
      '--opt', 'adamw', '--opt-betas', str(optim.b1), str(optim.b2),
      '--weight-decay', str(optim.weight_decay),
      '--lr-base', str(optim.base_lr), '--lr-base-size', str(optim.lr_base_batch),
      '--lr-base-scale', 'linear',
      '--min-lr', str(optim.min_lr), '--sched', 'cosine',
      '--layer-decay', str(optim.layer_decay),
      '--drop-path', str(ft.model.drop_path),
      *(['--clip-grad', str(optim.grad_clip)] if optim.grad_clip else []),
      '--aa', RAND_AUGMENT, '--reprob', '0.25', '--remode', 'pixel',
      '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1',
  ]


def finetune_command(model, args):
  """The shell command line: timm's train.py (TIMM_TRAIN_PY) with `--model model` (a shell word,
  quoted by the caller: the folder is a `$HERE` expansion in finetune_timm.sh) and `args`."""
  return f'python train.py --model {model} ' + ' '.join(shlex.quote(a) for a in args)


def _model_card(config, hub_config, source, command, recipe):
  framework, step = config.framework, source.get('step')
  cfg = hub_config['pretrained_cfg']
  workdir = os.path.basename(os.path.normpath(source['workdir'])) if source.get('workdir') else None
  origin = f'run `{workdir}`' if workdir else 'a mimjax run'
  return f"""---
library_name: timm
pipeline_tag: image-feature-extraction
tags: [timm, mimjax, {framework}, masked-image-modeling]
---
# mimjax {framework} ViT ({config.model.variant}), step {step}

A ViT encoder (timm `{hub_config['architecture']}` class with this folder's `model_args`)
pre-trained with mimjax's `{framework}` framework on `{config.data.name}`
(`{config.data.train_split}`), exported from {origin} at step {step}. Only the encoder is here
(no decoder or plug-in heads); `num_classes` is {cfg['num_classes']}.

Input: {cfg['input_size'][1]}x{cfg['input_size'][2]} px, {cfg['input_size'][0]} channels,
mean {cfg['mean']}, std {cfg['std']}, bicubic resize, centre crop {cfg['crop_pct']}.

```python
import timm
model = timm.create_model('local-dir:THIS_FOLDER', pretrained=True)  # or hf-hub:USER/NAME
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```

Fine-tune with the `train.py` of timm 1.0.31 ({TIMM_TRAIN_PY}) and the `{recipe}` fine-tuning
recipe of mimjax (`mimjax/finetune_recipes.py`; `sh {COMMAND_FILE}` runs it on this folder; set
the data directory, `--num-classes` for your labels, and add `--device cpu` on a machine without a
CUDA GPU):

```
{command}
```
"""


def export_hub(config, encoder_params, out_dir, source, recipe, staging=None):
  """Writes the files of the timm model folder `out_dir` into `staging` (default: `out_dir`
  itself); returns (config.json dict, fine-tuning command).

  The command names `out_dir` by its absolute path (to print); the files in the folder never do.
  Nothing is written when the encoder cannot be a timm model (InteropError).
  """
  staging = staging or out_dir
  beit = beit_lib.is_beit(config.model)
  grid = vit.grid_size(config.model, config.data.image_size)
  in_chans = int(encoder_params['embedding']['kernel'].shape[2])
  model_args = (beit_lib if beit else timm_lib).timm_kwargs(config.model, config.data.image_size,
                                                             in_chans)
  model_args.pop('num_classes')  # the top-level num_classes, which train.py's --num-classes sets
  if beit:
    table = (timm_lib.position_embedding(encoder_params, grid)
             if config.model.posemb != 'none' else None)
    weights = beit_lib.to_beit(encoder_params, table)
  else:
    weights = timm_lib.to_timm(encoder_params, timm_lib.position_embedding(encoder_params, grid))
  names = label_names(config)
  published = {k: v for k, v in source.items() if k != 'workdir'}
  hub_config = dict(architecture=architecture(config, beit),
                    num_classes=config.model.num_classes,
                    num_features=model_args['embed_dim'], model_args=model_args,
                    pretrained_cfg=pretrained_cfg(config, in_chans, names),
                    mimjax=dict(published, framework=config.framework,
                                variant=config.model.variant))
  if os.path.isfile(out_dir):
    raise errors.ConfigError(f'--out {out_dir} is a file; --format hub writes a folder.')
  os.makedirs(staging, exist_ok=True)
  torch_files.save_safetensors(weights, os.path.join(staging, 'model.safetensors'))
  with open(os.path.join(staging, 'config.json'), 'w') as f:
    json.dump(hub_config, f, indent=2)
  args = finetune_args(config, names, recipe)
  with open(os.path.join(staging, COMMAND_FILE), 'w') as f:
    f.write(f'# Fine-tunes this folder with the {recipe} recipe '
            '(mimjax/finetune_recipes.py): run it in a\n# checkout of timm 1.0.31 '
            f'({TIMM_TRAIN_PY}) with DATA_DIR set; add --device cpu without a CUDA GPU.\n'
            'HERE="$(cd "$(dirname "$0")" && pwd)"\n'
            + finetune_command('"local-dir:$HERE"', args) + '\n')
  with open(os.path.join(staging, 'README.md'), 'w') as f:
    f.write(_model_card(config, hub_config, source,
                        finetune_command('hf-hub:USER/NAME', args), recipe))
  return hub_config, finetune_command(shlex.quote(f'local-dir:{os.path.abspath(out_dir)}'), args)
