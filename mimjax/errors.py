"""Every error mimjax reports to a user; a leaf module that imports nothing of mimjax.

Each CLI catches `MimjaxError` alone and prints `error: <message>` without a traceback, so every
message must name the problem and the fix on its own.
"""
import contextlib
import sys


class MimjaxError(Exception):
  """Base of the errors a command reports as one `error:` line."""


class ConfigError(MimjaxError, ValueError):
  """An impossible or meaningless config; the message names the key and the fix."""


class CheckpointError(MimjaxError, RuntimeError):
  """A workdir or checkpoint that cannot be opened, restored or continued."""


class DatasetError(MimjaxError, ValueError):
  """A dataset, split or image source that cannot feed this config."""


class InteropError(MimjaxError, ValueError):
  """Weights that cannot cross between mimjax and another library (timm, MAE, CLIP)."""


class NonFiniteError(MimjaxError, RuntimeError):
  """Training produced NaN/Inf; the update was not applied, the last good checkpoint is intact."""


def require(ok, key, value, rule):
  """Raises ConfigError `config.KEY=VALUE: RULE.` unless `ok`; RULE names the valid values (a
  NaN fails every comparison, so `require(x >= 0, ...)` refuses it too)."""
  if not ok:
    raise ConfigError(f'config.{key}={value!r}: {rule}.')


def require_choice(key, value, choices):
  """Raises ConfigError unless `value` is one of `choices`, listing them."""
  require(value in choices, key, value, f'use one of {", ".join(map(repr, choices))}')


@contextlib.contextmanager
def reported():
  """Ends the program with `error: <message>` (stderr, exit status 1) on any MimjaxError."""
  try:
    yield
  except MimjaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
