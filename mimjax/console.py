"""A quiet console: the start-up banners TensorFlow prints on import (one per bundled copy of its
C++ logging library, so each twice: the absl::InitializeLog notice, oneDNN, CPU features) are
dropped; every other line the import prints is passed on, so real warnings still show. Known
empty log warnings of a single call can be dropped too (`without_log_messages`).
"""
import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

BANNERS = re.compile(r'WARNING: All log messages before absl::InitializeLog\(\) is called'
                     r'|I\d{4} [\d:. ]+\d+ (port|cpu_feature_guard)\.cc:\d+\]'
                     r'|To enable the following instructions: ')


@contextlib.contextmanager
def stderr_filtered(pattern):
  """Runs the body with file descriptor 2 (C++ libraries write there directly) captured, then
  writes the captured lines that `pattern` does not match to stderr."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      lines = capture.read().decode(errors='replace').splitlines(keepends=True)
      sys.stderr.write(''.join(line for line in lines if not pattern.match(line)))
      sys.stderr.flush()


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
  """Imports `tensorflow`, whoever imports it first, inside `stderr_filtered(BANNERS)`."""

  def find_spec(self, name, path=None, target=None):
    if name != 'tensorflow':
      return None
    sys.meta_path.remove(self)  # once: the real finders locate the package
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.loader is not None:
      exec_module = spec.loader.exec_module

      def quiet_exec(module):
        with stderr_filtered(BANNERS):
          exec_module(module)
      spec.loader.exec_module = quiet_exec
    return spec


def quiet_tensorflow_import():
  """Makes the process's first `import tensorflow` drop its start-up banners."""
  if 'tensorflow' not in sys.modules and not any(
      isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlow())


class _DropPrefix(logging.Filter):
  def __init__(self, prefix):
    super().__init__()
    self.prefix = prefix

  def filter(self, record):
    return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def without_log_messages(prefix, logger='absl'):
  """Drops the log records of `logger` (absl's: Orbax logs there) that start with `prefix` while
  the body runs; every other record passes."""
  drop = _DropPrefix(prefix)
  logging.getLogger(logger).addFilter(drop)
  try:
    yield
  finally:
    logging.getLogger(logger).removeFilter(drop)
