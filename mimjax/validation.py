"""The one validation phase: every check a config must pass before a run writes anything."""
from mimjax import errors
from mimjax import registry
from mimjax.models import vit


def validate(config):
  """Fails fast, naming the key, on settings that cannot work together."""
  if config.framework not in registry.FRAMEWORKS:
    raise errors.ConfigError(f'config.framework={config.framework!r} is unknown; choose one of '
                      f'{sorted(registry.FRAMEWORKS)}.')
  try:
    patch = vit.parse_variant(config.model.variant)['patch_size']
  except ValueError as e:
    raise errors.ConfigError(f'config.model.variant: {e}') from e
  if config.data.image_size % patch:
    raise errors.ConfigError(f'config.data.image_size={config.data.image_size} is not a multiple of the '
                      f'patch size {patch} of model {config.model.variant!r}; use a multiple of '
                      f'{patch} (e.g. {config.data.image_size // patch * patch or patch}).')
  if config.batch_size % config.optim.accum_steps:
    raise errors.ConfigError(f'config.batch_size={config.batch_size} is not divisible by '
                      f'config.optim.accum_steps={config.optim.accum_steps}.')
  if config.total_steps < 1:
    raise errors.ConfigError(f'config.total_steps must be positive, got {config.total_steps}.')
  if not 0 <= config.mae.mask_ratio < 1:
    raise errors.ConfigError(f'config.mae.mask_ratio must be in [0, 1), got {config.mae.mask_ratio}.')
  if config.model.dtype not in ('float32', 'bfloat16', 'float16'):
    raise errors.ConfigError(f'config.model.dtype={config.model.dtype!r}; use float32 or bfloat16.')
  if config.init.format not in ('timm', 'mae', 'mimjax'):
    raise errors.ConfigError(f'config.init.format={config.init.format!r}; use timm (a timm ViT state '
                      'dict), mae (an official MAE checkpoint) or mimjax (a mimjax workdir).')
  if not 0 < config.optim.layer_decay <= 1:
    raise errors.ConfigError(f'config.optim.layer_decay must be in (0, 1] (1 = off), got '
                      f'{config.optim.layer_decay}.')
  if config.model.tokenizer_norm not in ('none', 'moto'):
    raise errors.ConfigError(f'config.model.tokenizer_norm={config.model.tokenizer_norm!r}; use "none" '
                      'or "moto".')
  for key, value, choices in (('model.rel_pos', config.model.rel_pos, vit.RELPOS),
                              ('model.weight_init', config.model.weight_init, vit.INITS),
                              ('optim.lr_scaling', config.optim.lr_scaling, ('linear', 'sqrt'))):
    if value not in choices:
      raise errors.ConfigError(f'config.{key}={value!r}; use one of {choices}.')
  if config.eval.every_steps < 0:
    raise errors.ConfigError(f'config.eval.every_steps must be >= 0 (0 = off), got '
                      f'{config.eval.every_steps}.')
  framework = registry.FRAMEWORKS[config.framework]
  if config.eval.every_steps and not framework.best_metric:
    raise errors.ConfigError(f'config.eval.every_steps={config.eval.every_steps}, but framework '
                      f'{config.framework!r} has no held-out evaluation; set eval.every_steps=0.')
  framework.check_config(config)
  for plugin in registry.enabled_plugins(config):
    plugin.check_config(config, framework)
