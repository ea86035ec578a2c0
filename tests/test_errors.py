"""`mimjax.errors`: `reason`, the cause an `error:` line names, takes the system cause (a full disk,
a missing file) from anywhere in the exception chain, but not a handled one."""
import errno

from mimjax import errors


def test_reason_takes_only_system_causes_from_the_chain():
  # A handled FileNotFoundError deep in the chain is not why the outer error happened.
  try:
    try:
      raise FileNotFoundError(errno.ENOENT, 'No such file or directory', 'optional.json')
    except FileNotFoundError:
      raise ValueError('bad value') from None
  except ValueError as e:
    outer = e
  outer.__context__ = FileNotFoundError(errno.ENOENT, 'No such file or directory')
  assert errors.reason(outer) == 'ValueError: bad value'
  # A system cause anywhere in the chain comes first.
  full = OSError(errno.ENOSPC, 'No space left on device')
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = full
  assert errors.reason(wrapped) == 'No space left on device; RuntimeError: save failed'
  # The exception's own strerror stays.
  assert errors.reason(FileNotFoundError(errno.ENOENT, 'No such file or directory')).startswith(
      'No such file or directory')
