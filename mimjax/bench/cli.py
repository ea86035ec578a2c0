"""absl flags for the bench commands, both as programs and called from Python.

A command defines its flags in `define_flags(flag_values)`. Run as a program (`run`), they go on
absl's global FLAGS and `app.run` parses them like every mimjax CLI (`--help`, one `error:` line
for a bad value); a caller in the same process (the device check running the benchmark, the
tests) parses a list of flags on a private FlagValues (`parse`), so two calls never collide on the
global one. Either way the command receives a namespace of its own flags only.
"""
import types

from absl import app
from absl import flags
from absl import logging

from mimjax import config_lib


class _FloatListParser(flags.ListParser):
  """'0.5,2' -> [0.5, 2.0]; '' -> []."""

  def parse(self, argument):
    return [float(x) for x in super().parse(argument)]


def define_float_list(name, default, help_text, flag_values):
  """A comma-separated list of floats flag (absl has lists of strings only)."""
  flags.DEFINE(_FloatListParser(), name, default, help_text, flag_values=flag_values,
               serializer=flags.CsvListSerializer(','))


def require_subset(name, choices, flag_values):
  """Refuses list flag --name when it holds anything outside `choices`, naming what."""

  def check(values):
    unknown = sorted(set(values) - set(choices))
    if unknown:
      raise flags.ValidationError(f'--{name} {unknown}: choose from {tuple(choices)}')
    return True

  flags.register_validator(name, check, flag_values=flag_values)


def flag_names(define_flags):
  """The names of the flags `define_flags` defines (absl's own flags are not among them)."""
  own = flags.FlagValues()
  define_flags(own)
  return list(own)


def namespace(define_flags, flag_values):
  """The parsed values of `define_flags`'s flags in `flag_values`, as attributes."""
  return types.SimpleNamespace(
      **{name: flag_values[name].value for name in flag_names(define_flags)})


def parse(define_flags, argv, program='mimjax'):
  """`argv` (flags only, no program name) parsed on a private FlagValues; raises flags.Error."""
  own = flags.FlagValues()
  define_flags(own)
  own([program, *argv])
  return namespace(define_flags, own)


def run(define_flags, main):
  """The `python -m` entry: defines the flags on FLAGS, parses sys.argv and calls main(namespace)
  (its return value is for Python callers; app.run would take it for an exit status)."""
  define_flags(flags.FLAGS)

  def app_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:  # JAX and Orbax are chatty at absl's INFO
      logging.set_verbosity(logging.WARNING)
    main(namespace(define_flags, flags.FLAGS))

  app.run(app_main, flags_parser=config_lib.parse_flags)
