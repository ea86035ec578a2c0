"""The one validation phase: every check a config must pass before a run writes anything.

`validate` is pure (fields, framework, plug-ins and the capabilities they need); `check_run` adds
what a training run reads (the dataset and its splits) and the device mesh. The trainer calls
`check_run` first, then reads every remaining input (checkpoint, first batch, teacher and
pre-trained weights) before it creates the workdir.
"""
import importlib.util
import math

from mimjax import checkpoint as checkpoint_lib
from mimjax import distributed
from mimjax import errors
from mimjax import optim
from mimjax import registry
from mimjax import sharding
from mimjax import workdir_io
from mimjax.data import features
from mimjax.eval import evaluator
from mimjax.frameworks import base
from mimjax.models import vit

INIT_FORMATS = ('timm', 'mae', 'mimjax')


def validate(config):
  """Fails fast, naming the key and the fix, on settings that cannot work together: one pass over
  the owners' checks (OWNER_CHECKS), then the framework's and its plug-ins' (`check_contract`)."""
  check_finite(config)
  for check in OWNER_CHECKS:
    check(config)
  check_contract(config)


def _leaves(tree, prefix=''):
  """(dotted key, value) of every field of a ConfigDict."""
  for key, value in tree.items():
    if hasattr(value, 'items'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def check_finite(config):
  """No number anywhere in the config is NaN or infinite (no field has a meaning for them)."""
  for key, value in _leaves(config):
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, float) and not math.isfinite(v):
        raise errors.ConfigError(f'config.{key}={value!r}: use finite numbers.')


def check_run_fields(config):
  """The fields the trainer itself owns: framework, run length, logging, evaluation, init."""
  errors.require_choice('framework', config.framework, sorted(registry.FRAMEWORKS))
  errors.require(config.batch_size >= 1, 'batch_size', config.batch_size,
                 'use a positive global batch size')
  errors.require(config.total_steps >= 1, 'total_steps', config.total_steps,
                 'use a positive number of steps')
  log = config.log
  errors.require(log.every_steps >= 1, 'log.every_steps', log.every_steps,
                 'use a positive number of steps')
  errors.require(log.images_every_steps >= 0, 'log.images_every_steps', log.images_every_steps,
                 'use >= 0 (0 = no pictures)')
  if log.wandb and importlib.util.find_spec('wandb') is None:
    raise errors.ConfigError("config.log.wandb=True, but wandb is not installed; pip install "
                             "'mimjax[wandb]' (or wandb), or set config.log.wandb=False.")
  errors.require_choice('init.format', config.init.format, INIT_FORMATS)
  errors.require(config.init.step >= -1, 'init.step', config.init.step,
                 'use a checkpoint step, or -1 for the latest')
  check_eval_fields(config)


def check_eval_fields(config):
  """The `config.eval` fields a run stores for in-training and offline evaluation."""
  e = config.eval
  errors.require(e.every_steps >= 0, 'eval.every_steps', e.every_steps, 'use >= 0 (0 = off)')
  evaluator.check_names(config)
  errors.require(e.batch_size >= 1, 'eval.batch_size', e.batch_size, 'use a positive batch size')
  errors.require(len(e.knn_k) >= 1 and all(isinstance(k, int) and k >= 1 for k in e.knn_k),
                 'eval.knn_k', tuple(e.knn_k), 'give one or more positive integer neighbour counts')
  errors.require(e.knn_temperature > 0, 'eval.knn_temperature', e.knn_temperature,
                 'use a positive temperature (0.07 in DINO / MAE)')
  errors.require(e.analysis_examples >= 1, 'eval.analysis_examples', e.analysis_examples,
                 'use a positive number of images')
  lin = e.linear
  for key in ('epochs', 'batch_size'):
    errors.require(lin[key] >= 1, f'eval.linear.{key}', lin[key], 'use a positive integer')
  errors.require(0 <= lin.warmup_epochs <= lin.epochs, 'eval.linear.warmup_epochs',
                 lin.warmup_epochs, f'use 0 to eval.linear.epochs={lin.epochs}')
  errors.require(len(lin.base_lrs) >= 1 and min(lin.base_lrs) > 0, 'eval.linear.base_lrs',
                 tuple(lin.base_lrs), 'give one or more positive learning rates')
  errors.require(0 <= lin.momentum < 1, 'eval.linear.momentum', lin.momentum,
                 'use a momentum in [0, 1)')
  errors.require(lin.weight_decay >= 0, 'eval.linear.weight_decay', lin.weight_decay,
                 'use a value >= 0')
  errors.require(lin.trust_coefficient > 0, 'eval.linear.trust_coefficient',
                 lin.trust_coefficient, "use a positive coefficient (MAE's LARS: 0.001)")
  lo, hi = (tuple(lin.crop_scale) + (math.nan, math.nan))[:2]
  errors.require(len(lin.crop_scale) == 2 and 0 < lo <= hi <= 1, 'eval.linear.crop_scale',
                 tuple(lin.crop_scale), 'give (min, max) area fractions with 0 < min <= max <= 1')


# Each owner checks its own fields; `validate` calls these in order, before the framework's and the
# plug-ins' checks (which may assume the sections below are sane), and before anything is written.
OWNER_CHECKS = (
    check_run_fields,  # top level, log.*, init.*, eval.*
    vit.check_config,  # model.* and the image size the patches tile
    features.check_config,  # data.*
    optim.check_config,  # optim.* and warmup_steps
    checkpoint_lib.check_config,  # checkpoint.*
    sharding.check_config,  # mesh.*
    distributed.check_config,  # distributed.*
)


def provided(config):
  """The CAPABILITIES open to plug-ins: the framework's, plus a second view from the data."""
  framework = registry.FRAMEWORKS[config.framework]
  two_views = 'image2' in features.outputs(config.data.augment)
  return framework.provides(config) | ({'second_view'} if two_views else set())


def check_contract(config):
  """The framework's own checks, each enabled plug-in's, and every capability a plug-in needs."""
  framework = registry.FRAMEWORKS[config.framework]
  evaluator.check_contract(config, framework)
  if 'knn_monitor' in evaluator.in_loop(config, framework):
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
  """The kNN monitor's subset sizes (when it runs in the loop: `evaluator.in_loop`)."""
  monitor = config.eval.knn_monitor
  for key in ('bank_examples', 'query_examples', 'k'):
    errors.require(monitor[key] >= 1, f'eval.knn_monitor.{key}', monitor[key],
                   'use a positive integer')
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
    if 'knn_monitor' in evaluator.in_loop(config, registry.FRAMEWORKS[config.framework]):
      pipeline.num_classes(config)  # the kNN monitor needs labels (its sizes: data/fit.py)
  return mesh


def check_workdir(workdir):
  """Refuses a local workdir this process cannot create or write, or an object-store URL whose
  store does not answer (offline, no credentials), before anything is read or written."""
  if workdir_io.is_url(workdir):
    workdir_io.check_reachable(workdir)
  else:
    workdir_io.check_creatable_dir(workdir, '--workdir', 'choose another --workdir')
