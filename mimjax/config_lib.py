"""The full config: its schema assembled (`base_config`), config.json round trips, and
`--config.x.y` flag parsing."""
import contextlib
import json
import re
import sys

from absl import flags

from mimjax import registry
from mimjax import schema
from mimjax import workdir as workdir_lib


def base_config():
  """Every field mimjax reads, with its default: `schema.py`'s core sections and the own section
  (`config_fields`) of every framework and plug-in in the registry. Recipes override values,
  never add keys."""
  owned = ((c.name, c.config_fields()) for c in (*registry.FRAMEWORKS.values(), *registry.PLUGINS))
  return schema.assemble([(name, section) for name, section in owned if section is not None])


def to_json(config):
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text):
  """Rebuilds a locked ConfigDict from `to_json` output, on top of the current defaults
  (`schema.merged`: a workdir written by an older mimjax still loads; an unknown key is an error
  that names it)."""
  return schema.merged(base_config(), json.loads(text))


def read_config(workdir):
  """The locked config a mimjax.train run wrote to WORKDIR/config.json (local or gs://)."""
  return schema.merged(base_config(), workdir_lib.read_json(workdir))


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
        '--print_config --print_all lists every key.')
    message = f'{name} is not a config key; {suggestion}'
  except flags.Error as e:
    message = str(e)
    if 'Traceback (most recent call last)' in message:
      # ml_collections quotes the traceback of the recipe's get_config: keep the flag, the cause.
      lines = message.strip().splitlines()
      message = f'{lines[0].rstrip(":")}: {lines[-1]}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)
