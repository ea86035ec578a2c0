"""The one validation phase: every check a config must pass before a run writes anything.

`validate` is pure (fields, framework, plug-ins and the capabilities they need); `check_run` adds
what a training run reads (the dataset and its splits) and the device mesh. The trainer calls
`check_run` first, then reads every remaining input (checkpoint, first batch, teacher and
pre-trained weights) before it creates the workdir.
"""
import importlib.util
import os

from mimjax import errors
from mimjax import optim
from mimjax import registry
from mimjax import sharding
from mimjax import workdir_io
from mimjax.data import features
from mimjax.frameworks import base
from mimjax.models import vit

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
INIT_FORMATS = ('timm', 'mae', 'mimjax')


def validate(config):
  """Fails fast, naming the key and the fix, on settings that cannot work together."""
  check_fields(config)
  check_contract(config)


def check_fields(config):
  """Values that are wrong whatever the framework."""
  if config.framework not in registry.FRAMEWORKS:
    raise errors.ConfigError(f'config.framework={config.framework!r} is unknown; choose one of '
                             f'{sorted(registry.FRAMEWORKS)}.')
  try:
    patch = vit.parse_variant(config.model.variant)['patch_size']
  except ValueError as e:
    raise errors.ConfigError(f'config.model.variant: {e}') from e
  size = config.data.image_size
  if size % patch:
    raise errors.ConfigError(
        f'config.data.image_size={size} is not a multiple of the patch size {patch} of model '
        f'{config.model.variant!r}; use a multiple of {patch} '
        f'(e.g. {size // patch * patch or patch}).')
  if config.batch_size % config.optim.accum_steps:
    raise errors.ConfigError(f'config.batch_size={config.batch_size} is not divisible by '
                             f'config.optim.accum_steps={config.optim.accum_steps}.')
  if config.total_steps < 1:
    raise errors.ConfigError(f'config.total_steps must be positive, got {config.total_steps}.')
  if not 0 <= config.mae.mask_ratio < 1:
    raise errors.ConfigError(
        f'config.mae.mask_ratio must be in [0, 1), got {config.mae.mask_ratio}.')
  if config.model.dtype not in DTYPES:
    raise errors.ConfigError(f'config.model.dtype={config.model.dtype!r}; use one of {DTYPES} '
                             '(auto: bfloat16 on GPU/TPU, float32 on CPU).')
  if config.init.format not in INIT_FORMATS:
    raise errors.ConfigError(
        f'config.init.format={config.init.format!r}; use timm (a timm ViT state dict), mae (an '
        'official MAE checkpoint) or mimjax (a mimjax workdir).')
  if not 0 < config.optim.layer_decay <= 1:
    raise errors.ConfigError(f'config.optim.layer_decay must be in (0, 1] (1 = off), got '
                      f'{config.optim.layer_decay}.')
  if config.data.repeated_aug < 1:
    raise errors.ConfigError(f'config.data.repeated_aug must be >= 1 (1 = off), got '
                             f'{config.data.repeated_aug}.')
  if config.optim.schedule not in ('cosine', 'multistep'):
    raise errors.ConfigError(f'config.optim.schedule={config.optim.schedule!r}; use "cosine" or '
                             '"multistep" (with config.optim.milestones).')
  if config.model.tokenizer_norm not in ('none', 'moto'):
    raise errors.ConfigError(
        f'config.model.tokenizer_norm={config.model.tokenizer_norm!r}; use "none" or "moto".')
  if config.model.head_init_std < 0:
    raise errors.ConfigError(f'config.model.head_init_std={config.model.head_init_std} must be '
                             '>= 0 (0 = a zero head; MAE fine-tuning uses 2e-5).')
  moto = config.model.moto
  if config.model.tokenizer_norm == 'moto' and (
      moto.stem_stride < 1 or patch % moto.stem_stride
      or (moto.stem_stride > 1 and not moto.stem_channels)):
    raise errors.ConfigError(
        f'config.model.moto.stem_stride={moto.stem_stride} must be >= 1, divide the patch size '
        f'{patch} and, above 1, have a stem (model.moto.stem_channels > 0); use 1 or a divisor.')
  for key, value, choices in (('model.rel_pos', config.model.rel_pos, vit.RELPOS),
                              ('model.weight_init', config.model.weight_init, vit.INITS),
                              ('optim.lr_scaling', config.optim.lr_scaling, optim.LR_SCALINGS)):
    if value not in choices:
      raise errors.ConfigError(f'config.{key}={value!r}; use one of {choices}.')
  if config.log.wandb and importlib.util.find_spec('wandb') is None:
    raise errors.ConfigError("config.log.wandb=True, but wandb is not installed; pip install "
                             "'mimjax[wandb]' (or wandb), or set config.log.wandb=False.")
  if config.eval.every_steps < 0:
    raise errors.ConfigError(f'config.eval.every_steps must be >= 0 (0 = off), got '
                             f'{config.eval.every_steps}.')


def provided(config):
  """The CAPABILITIES open to plug-ins: the framework's, plus a second view from the data."""
  framework = registry.FRAMEWORKS[config.framework]
  two_views = 'image2' in features.outputs(config.data.augment)
  return framework.provides(config) | ({'second_view'} if two_views else set())


def check_contract(config):
  """The framework's own checks, each enabled plug-in's, and every capability a plug-in needs."""
  framework = registry.FRAMEWORKS[config.framework]
  if config.eval.every_steps and not framework.best_metric:
    check_knn_monitor(config)
  framework.check_config(config)
  available = provided(config)
  for plugin in registry.enabled_plugins(config):
    plugin.check_config(config)
    for capability, fix in plugin.requires(config).items():
      if capability not in available:
        raise errors.ConfigError(
            f'config.{plugin.name}.enabled: {plugin.name} needs {base.CAPABILITIES[capability]}, '
            f'which framework {config.framework!r} does not provide under this config; {fix}.')


def check_knn_monitor(config):
  """The kNN monitor's subset sizes (self-supervised frameworks with eval.every_steps)."""
  monitor = config.eval.knn_monitor
  for key in ('bank_examples', 'query_examples', 'k'):
    if monitor[key] < 1:
      raise errors.ConfigError(f'config.eval.knn_monitor.{key} must be positive, got '
                               f'{monitor[key]}.')
  if monitor.k > monitor.bank_examples:
    raise errors.ConfigError(
        f'config.eval.knn_monitor.k={monitor.k} neighbours need at least as many bank images, but '
        f'bank_examples={monitor.bank_examples}; lower k or raise bank_examples.')


def check_run(config):
  """`validate`, the dataset splits a training run reads, and the device mesh; returns the mesh."""
  # Imported here: the data pipeline brings TensorFlow, which `validate` (and the benchmark) must
  # not need.
  from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  validate(config)
  pipeline.check_splits(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divides(config.batch_size // config.optim.accum_steps, mesh,
                               'batch_size / optim.accum_steps')
  if config.eval.every_steps:
    sharding.check_batch_divides(config.eval.batch_size, mesh, 'eval.batch_size')
    if not registry.FRAMEWORKS[config.framework].best_metric:
      pipeline.num_classes(config)  # the kNN monitor needs labels (its sizes: data/fit.py)
  return mesh


def check_workdir(workdir):
  """Refuses a local workdir this process cannot create or write, before anything is read or
  written (an object-store URL is checked by its first write)."""
  if workdir_io.is_url(workdir):
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise errors.ConfigError(f'--workdir {workdir}: {path} is a file, not a directory; choose '
                             'another --workdir.')
  if not os.access(path, os.W_OK | os.X_OK):
    what = 'is not writable' if path == os.path.abspath(workdir) else (
        f'cannot be created: {path} is not writable')
    raise errors.ConfigError(f'--workdir {workdir} {what}; choose a writable directory (or fix '
                             'its permissions / mount).')
