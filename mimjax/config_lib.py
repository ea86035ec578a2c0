"""Config checks at start-up and config round-trips through the workdir's config.json."""
import json

import ml_collections

from mimjax.models import vit


class ConfigError(ValueError):
  """An impossible or meaningless config; the message names the key and the fix."""


def validate(config):
  """Fails fast, naming the key, on settings that cannot work together."""
  from mimjax import frameworks  # pylint: disable=g-import-not-at-top
  if config.framework not in frameworks.FRAMEWORKS:
    raise ConfigError(f'config.framework={config.framework!r} is unknown; choose one of '
                      f'{sorted(frameworks.FRAMEWORKS)}.')
  try:
    patch = vit.parse_variant(config.model.variant)['patch_size']
  except ValueError as e:
    raise ConfigError(f'config.model.variant: {e}') from e
  if config.data.image_size % patch:
    raise ConfigError(f'config.data.image_size={config.data.image_size} is not a multiple of the '
                      f'patch size {patch} of model {config.model.variant!r}; use a multiple of '
                      f'{patch} (e.g. {config.data.image_size // patch * patch or patch}).')
  if config.batch_size % config.optim.accum_steps:
    raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by '
                      f'config.optim.accum_steps={config.optim.accum_steps}.')
  if config.total_steps < 1:
    raise ConfigError(f'config.total_steps must be positive, got {config.total_steps}.')
  if not 0 <= config.mae.mask_ratio < 1:
    raise ConfigError(f'config.mae.mask_ratio must be in [0, 1), got {config.mae.mask_ratio}.')
  if config.model.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConfigError(f'config.model.dtype={config.model.dtype!r}; use float32 or bfloat16.')
  if config.init.format not in ('timm', 'mae', 'mimjax'):
    raise ConfigError(f'config.init.format={config.init.format!r}; use timm (a timm ViT state '
                      'dict), mae (an official MAE checkpoint) or mimjax (a mimjax workdir).')
  if not 0 < config.optim.layer_decay <= 1:
    raise ConfigError(f'config.optim.layer_decay must be in (0, 1] (1 = off), got '
                      f'{config.optim.layer_decay}.')
  if config.model.tokenizer_norm not in ('none', 'moto'):
    raise ConfigError(f'config.model.tokenizer_norm={config.model.tokenizer_norm!r}; use "none" '
                      'or "moto".')
  if config.eval.every_steps < 0:
    raise ConfigError(f'config.eval.every_steps must be >= 0 (0 = off), got '
                      f'{config.eval.every_steps}.')
  framework = frameworks.FRAMEWORKS[config.framework]
  if config.eval.every_steps and not framework.best_metric:
    raise ConfigError(f'config.eval.every_steps={config.eval.every_steps}, but framework '
                      f'{config.framework!r} has no held-out evaluation; set eval.every_steps=0.')
  framework.check_config(config)
  frameworks.check_plugins(config)


def to_json(config):
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text):
  """Rebuilds a locked ConfigDict from `to_json` output, on top of the current defaults.

  Starting from the defaults means a workdir written by an older mimjax still loads; a key the
  current mimjax does not know is an error that names it.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.base_config()
  values = json.loads(text)

  def merge(target, src, prefix):
    for key, value in src.items():
      if key not in target:
        raise ConfigError(f'config.json has unknown key {prefix}{key}; it was written by a '
                          'different mimjax version.')
      if isinstance(target[key], ml_collections.ConfigDict):
        merge(target[key], value, f'{prefix}{key}.')
      else:
        target[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) \
            if isinstance(value, list) else value
  merge(config, values, '')
  config.lock()
  return config
