"""What recipes share, and how the library finds them.

A recipe (`configs/NAME.py`) is a `get_config(arg)` that starts from `config_lib.base_config()` and
sets values. The helpers it uses live here, in the package, because the library builds one recipe
itself (`finetune_recipes`, for `mimjax.evaluate --protocol finetune`): `parse_arg` for the
`NAME.py:ARG` string, `steps_for_epochs`, `apply_runlocal` (any config shrunk to a run that
finishes on 2 CPU cores in minutes on the offline default data, Fashion-MNIST) and MoTo's stem
per size. The shipped recipes are files the library reads by name (`recipe_config`), as `--config`
reads a file: the package imports no recipe module.
"""
import importlib.util
import pathlib

import ml_collections

IMAGENET_TRAIN_SIZE = 1_281_167

# Known dataset sizes, for turning a recipe in epochs into steps.
TRAIN_EXAMPLES = {
    'imagenet2012': IMAGENET_TRAIN_SIZE,
    'fashion_mnist': 60_000,
    'cifar10': 50_000,
    'imagenette': 9_469,
}

# MoTo's stem (channels, stride) per size, chosen so that MoTo adds Table 2's parameters to DeiT-S
# (+0.4M: 0.396M) and DeiT-B (+0.3M: 0.296M); see `mimjax/models/moto.py`. Other sizes keep the
# schema's default (16 channels at stride 1).
MOTO_STEM = {'S': (28, 2), 'B': (18, 2)}

# An argument string item that makes `parse_arg` raise RecipeArguments: how --help lists each
# recipe's arguments without a second list to keep in step with the recipe.
ARGUMENTS_PROBE = '__arguments__'


class RecipeArguments(Exception):
  """Raised by `parse_arg` for ARGUMENTS_PROBE, carrying the recipe's argument defaults."""

  def __init__(self, defaults):
    super().__init__(defaults)
    self.defaults = defaults


def parse_arg(arg, **defaults):
  """Parses 'key=value,flag' strings from `--config file.py:ARG` into a ConfigDict.

  Only keys named in `defaults` are accepted; values are converted to the default's type, and a
  bare word sets a boolean default to True.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  if ARGUMENTS_PROBE in arg.split(','):
    raise RecipeArguments(defaults)
  for item in arg.split(','):
    if not item:
      continue
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(
          f'Unknown config argument {key!r}; this config accepts: {", ".join(sorted(defaults))}.')
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f'Config argument {key!r} needs a value, e.g. {key}={default}.')
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      result[key] = value
    else:
      result[key] = type(default)(value)
  return result


def steps_for_epochs(epochs, dataset, batch_size):
  """Number of optimizer steps in `epochs` passes over `dataset` at `batch_size`."""
  return max(1, int(round(epochs * TRAIN_EXAMPLES[dataset] / batch_size)))


def apply_moto_stem(c):
  """Sets `c.model.moto`'s stem to MOTO_STEM's for the size of `c.model.variant`, if it has one."""
  stem = MOTO_STEM.get(c.model.variant.partition('/')[0])
  if stem:
    c.model.moto.stem_channels, c.model.moto.stem_stride = stem


def apply_runlocal(c):
  """Shrinks `c` in place to the offline default: Fashion-MNIST, a small ViT, minutes on a CPU."""
  c.data.name = 'fashion_mnist'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 28
  c.data.mean = (0.286, 0.286, 0.286)
  c.data.std = (0.353, 0.353, 0.353)
  c.data.crop_scale = (0.35, 1.0)
  c.data.shuffle_buffer = 60_000
  c.data.eval_crop_fraction = 1.0
  c.data.cache = True
  c.model.variant = 'pico/4'
  c.model.dtype = 'float32'
  c.batch_size = 128
  c.total_steps = 1500
  c.warmup_steps = 100
  c.checkpoint.every_steps = 500
  c.log.every_steps = 25
  c.log.images_every_steps = 500
  c.eval.knn_monitor.bank_examples = 2_000  # small: the monitor is a progress signal
  c.eval.knn_monitor.query_examples = 1_000
  c.eval.linear.optimizer = 'sgd'  # LARS's trust ratio moves too little in a few hundred steps
  c.eval.linear.train_split = 'train[:10000]'  # a small probe budget: minutes on a CPU
  c.eval.linear.holdout_split = 'train[58000:]'
  c.eval.linear.crop_scale = (0.35, 1.0)  # as pre-training: 28-pixel images lose too much below
  c.eval.linear.batch_size = 256
  c.eval.linear.epochs = 10
  c.eval.linear.warmup_epochs = 1
  c.eval.linear.base_lrs = (0.1, 0.4, 1.6)
  return c


def recipes_dir():
  """The folder of the shipped recipes: `configs/` of the checkout or of the installed package
  (found without importing it)."""
  return pathlib.Path(next(iter(importlib.util.find_spec('configs').submodule_search_locations)))


def recipe_names():
  """The shipped recipes: every configs/NAME.py but the shared helpers (common.py)."""
  return sorted(p.stem for p in recipes_dir().glob('*.py') if p.stem not in ('__init__', 'common'))


def recipe_config(name, arg=None):
  """`get_config(arg)` of shipped recipe `name`, its file loaded as `--config` loads one."""
  path = recipes_dir() / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'mimjax_recipe_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
