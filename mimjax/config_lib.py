"""Config round-trips through the workdir's config.json, and `--config.x.y` flag parsing."""
import contextlib
import json
import re
import sys

from absl import flags
import ml_collections

from mimjax import errors
from mimjax import schema


def to_json(config):
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text):
  """Rebuilds a locked ConfigDict from `to_json` output, on top of the current defaults.

  Starting from the defaults means a workdir written by an older mimjax still loads; a key the
  current mimjax does not know is an error that names it.
  """
  config = schema.base_config()
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


def parse_flags(argv, flag_values=None):
  """absl's flag parsing for `app.run(flags_parser=...)`, errors reported as `flag_errors_reported`
  reports them. `flag_values`: absl's FlagValues (default: flags.FLAGS)."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  with flag_errors_reported(argv):
    return flag_values(argv)


@contextlib.contextmanager
def flag_errors_reported(argv):
  """A misspelt `--config.x.y`, a bad flag value or a recipe that refuses its argument in `argv`,
  met while the body parses flags (a config_dict flag parses them when defined), ends in one
  `error:` line naming the flag and the fix, not a traceback."""
  try:
    yield
    return
  except (AttributeError, KeyError) as e:  # ml_collections: unknown key under --config
    text = (str(e.args[0]) if e.args else str(e)).replace('\\', '')
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    given = [a.split('=')[0] for a in argv if key and re.search(rf'\.{key.group(1)}(=|$)', a)]
    name = given[0] if given else f'--config.{key.group(1) if key else text}'
    suggestion = f'did you mean {name.rsplit(".", 1)[0]}.{hint.group(1)}?' if hint else (
        'every key and its default are in mimjax/schema.py.')
    message = f'{name} is not a config key; {suggestion}'
  except flags.Error as e:
    message = str(e)
    if 'Traceback (most recent call last)' in message:
      # ml_collections quotes the traceback of the recipe's get_config: keep the flag, the cause.
      lines = message.strip().splitlines()
      message = f'{lines[0].rstrip(":")}: {lines[-1]}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)
