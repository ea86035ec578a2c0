"""Config round-trips through the workdir's config.json."""
import json

import ml_collections

from mimjax import errors


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
        raise errors.ConfigError(f'config.json has unknown key {prefix}{key}; it was written by a '
                                 'different mimjax version.')
      if isinstance(target[key], ml_collections.ConfigDict):
        merge(target[key], value, f'{prefix}{key}.')
      else:
        target[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) \
            if isinstance(value, list) else value
  merge(config, values, '')
  config.lock()
  return config
