"""An encoder as a timm model folder (`--format hub`) and its fine-tuning command for timm train.py.

The folder has the layout timm reads from the Hugging Face hub and from `local-dir:`: config.json
(`architecture`, `model_args`, a `pretrained_cfg` with this model's input size, mean, std, crop and
interpolation), model.safetensors and a model card (README.md). So
`timm.create_model('local-dir:DIR', pretrained=True)` rebuilds the model without mimjax, and
`timm.data.resolve_data_config({}, model=model)` gives its transforms. The same folder uploaded to
the hub loads with `hf-hub:USER/NAME`.
"""
import json
import os
import shlex

from configs import finetune as finetune_recipe
from mimjax import errors
from mimjax.data import sources
from mimjax.interop import timm as timm_lib
from mimjax.models import vit

COMMAND_FILE = 'finetune_timm.sh'


def label_names(config):
  """The dataset's class names from its TFDS metadata, or None when it has no `label` names or is
  not prepared on this machine (an export needs the weights, not the data)."""
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


def finetune_args(config, out_dir, names):
  """timm train.py arguments that fine-tune the export with MAE's recipe (He et al., 2022, A.1).

  The same recipe as configs/finetune.py: AdamW (0.9, 0.999), weight decay 0.05, base lr per 256
  images (scaled linearly to the global batch; 1024 in the paper = 8 processes x 128), layer-wise
  lr decay, drop path and epochs per model size (5e-4, 0.65, 0.1, 100 for B), 5 warmup epochs then
  cosine to 1e-6, RandAugment m9, mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25,
  average pooling (after the exported final norm: timm has no MAE-style norm swap on loading).
  """
  size = config.model.variant.partition('/')[0]
  in_chans = config.data.channels
  dataset = [] if config.data.name == 'imagenet2012' else [
      '--dataset', f'tfds/{config.data.name}', '--dataset-download',
      '--val-split', config.data.eval_split]
  return [
      '--model', f'local-dir:{os.path.abspath(out_dir)}', '--pretrained',
      '--data-dir', 'DATA_DIR', *dataset,
      '--num-classes', str(len(names)) if names else 'NUM_CLASSES',
      *(['--in-chans', str(in_chans)] if in_chans != 3 else []),
      '--gp', 'avg', '--epochs', str(finetune_recipe.EPOCHS.get(size, 100)),
      '--warmup-epochs', '5', '-b', '128',
      '--opt', 'adamw', '--opt-betas', '0.9', '0.999', '--weight-decay', '0.05',
      '--lr-base', str(finetune_recipe.BASE_LR.get(size, 5e-4)), '--lr-base-size', '256',
      '--lr-base-scale', 'linear',
      '--min-lr', '1e-6', '--sched', 'cosine',
      '--layer-decay', str(finetune_recipe.LAYER_DECAY.get(size, 0.65)),
      '--drop-path', str(finetune_recipe.DROP_PATH.get(size, 0.1)),
      '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--remode', 'pixel',
      '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1',
  ]


def finetune_command(args):
  """The shell command line (timm's train.py is in its repository, not in the pip package)."""
  return 'python train.py ' + ' '.join(shlex.quote(a) for a in args)


def _model_card(config, hub_config, source, command):
  framework, step = config.framework, source.get('step')
  cfg = hub_config['pretrained_cfg']
  return f"""---
library_name: timm
pipeline_tag: image-feature-extraction
tags: [timm, mimjax, {framework}, masked-image-modeling]
---
# mimjax {framework} ViT ({config.model.variant}), step {step}

A ViT encoder pre-trained with mimjax's `{framework}` framework on `{config.data.name}`
(`{config.data.train_split}`), exported from `{source.get('workdir')}` at step {step}. Only the
encoder is here (no decoder or plug-in heads); `num_classes` is {cfg['num_classes']}.

Input: {cfg['input_size'][1]}x{cfg['input_size'][2]} px, {cfg['input_size'][0]} channels,
mean {cfg['mean']}, std {cfg['std']}, bicubic resize, centre crop {cfg['crop_pct']}.

```python
import timm
model = timm.create_model('local-dir:THIS_FOLDER', pretrained=True)  # or hf-hub:USER/NAME
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```

Fine-tune with timm's `train.py` and MAE's fine-tuning recipe (also in `{COMMAND_FILE}`; set the
data directory, and `--num-classes` for your labels):

```
{command}
```
"""


def export_hub(config, encoder_params, out_dir, source):
  """Writes the timm model folder `out_dir`; returns (config.json dict, fine-tuning command)."""
  grid = config.data.image_size // vit.parse_variant(config.model.variant)['patch_size']
  table = timm_lib.position_embedding(encoder_params, grid)
  in_chans = int(encoder_params['embedding']['kernel'].shape[2])
  model_args = timm_lib.timm_kwargs(config.model, config.data.image_size, in_chans)
  model_args.pop('num_classes')  # the top-level num_classes, which train.py's --num-classes sets
  names = label_names(config)
  hub_config = dict(architecture=timm_lib.TIMM_MODEL, num_classes=config.model.num_classes,
                    num_features=model_args['embed_dim'], model_args=model_args,
                    pretrained_cfg=pretrained_cfg(config, in_chans, names),
                    mimjax=dict(source, framework=config.framework, variant=config.model.variant))
  os.makedirs(out_dir, exist_ok=True)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(timm_lib.to_timm(encoder_params, table), os.path.join(out_dir, 'model.safetensors'))
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hub_config, f, indent=2)
  command = finetune_command(finetune_args(config, out_dir, names))
  with open(os.path.join(out_dir, COMMAND_FILE), 'w') as f:
    f.write('# Fine-tunes this export with timm train.py (MAE recipe); set DATA_DIR.\n'
            f'{command}\n')
  with open(os.path.join(out_dir, 'README.md'), 'w') as f:
    f.write(_model_card(config, hub_config, source, command))
  return hub_config, command
