"""Every error mimjax reports to a user; a leaf module that imports nothing of mimjax.

Each CLI catches `MimjaxError` alone and prints `error: <message>` without a traceback, so every
message must name the problem and the fix on its own.
"""
import contextlib
import errno
import os
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


# Causes a user fixes outside mimjax; a message names one of these first when it is found.
SYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
SYSTEM_CAUSES = tuple(os.strerror(code) for code in SYSTEM_ERRNOS)


def _chain(e):
  """`e`, its causes and contexts, and the members of exception groups, outermost first."""
  seen, queue = set(), [e]
  while queue:
    x = queue.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    yield x
    queue += [x.__cause__, x.__context__, *getattr(x, 'exceptions', ())]


def reason(e):
  """`Type: message` of an exception, first line only and without TensorStore's spec dump; when
  a system cause (a full disk, a read-only mount) is anywhere in its chain, that cause first, so
  no cut can lose it; another OSError's strerror only when it is `e` itself."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ''
  text = text.split(' [source locations=')[0].split('{"')[0].rstrip(' :;,')
  shown = f'{type(e).__name__}: {text[:300]}'
  for x in _chain(e):
    # Another OSError's text counts only as `e` itself: one deeper in the chain may be an
    # incidental error that was handled (a missing optional file), not why `e` happened.
    if isinstance(x, OSError) and x.strerror and (x is e or x.errno in SYSTEM_ERRNOS):
      return x.strerror if x.strerror in shown else f'{x.strerror}; {shown}'
    cause = next((c for c in SYSTEM_CAUSES if c in str(x)), None)
    if cause:
      return cause if cause in shown else f'{cause}; {shown}'
  return shown


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
