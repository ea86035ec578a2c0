"""Workdir reads and writes on local disks and object stores (gs://, s3://) through `etils.epath`.

Orbax reads the same paths, so checkpoints, metrics.jsonl, config.json, eval JSON and images of a
`gs://bucket/run` workdir all land in the bucket. Local paths are made absolute; URLs never are.
"""
import json
import os
import socket
import sys
import time

from absl import logging
from etils import epath

from mimjax import errors

LOCK_NAME = 'lock.json'


def is_url(path):
  """True for object-store paths such as gs://bucket/run."""
  return '://' in str(path)


def path(workdir, *parts):
  """An epath.Path of WORKDIR/parts: absolute for a local path, untouched for a URL."""
  workdir = str(workdir)
  base = epath.Path(workdir if is_url(workdir) else os.path.abspath(workdir))
  return base.joinpath(*parts)


def check_reachable(workdir):
  """CheckpointError unless the object store of a URL workdir answers (a local path: nothing to
  do). Only reads (does WORKDIR exist?), so an offline or unauthorised store is one message
  before anything is read or written, not a client library's traceback at the first write."""
  if not is_url(workdir):
    return
  try:
    path(workdir).exists()
  except Exception as e:  # each backend (tf.io.gfile, gcsfs, s3fs) raises its own types
    raise errors.CheckpointError(
        f'--workdir {workdir} cannot be reached ({errors.reason(e)}). Check the network '
        'connection and the credentials for that store (for gs://: gcloud auth '
        'application-default login), or use a local --workdir.') from e


def check_creatable_dir(directory, flag, fix):
  """ConfigError unless `directory` is, or can be created as, a directory this process writes:
  its nearest existing ancestor must be a writable directory (not a file, not read-only)."""
  path = os.path.abspath(directory)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise errors.ConfigError(f'{flag} {directory}: {path} is a file, not a directory; {fix}.')
  if not os.access(path, os.W_OK | os.X_OK):
    what = 'is not writable' if path == os.path.abspath(directory) else (
        f'cannot be created: {path} is not writable')
    raise errors.ConfigError(f'{flag} {directory} {what}; {fix} (or fix its permissions / '
                             'mount).')


def write_atomic(target, text):
  """Replaces `target` with `text` so a crash leaves the old or the new file, never a torn one.

  Locally: a temporary file in the same directory, fsync, rename. An object store replaces an
  object atomically on upload, so there the object is written directly.
  """
  target = epath.Path(target)
  if is_url(target):
    target.write_text(text)
    return
  tmp = f'{target}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)
  directory = os.open(os.path.dirname(str(target)), os.O_RDONLY)
  try:
    os.fsync(directory)  # the rename itself survives a power cut
  finally:
    os.close(directory)


def read_jsonl(target):
  """The records of a JSON-lines file; a torn last line (a crash mid-write) is dropped with a
  warning, a damaged line elsewhere is an error."""
  try:
    text = epath.Path(target).read_text()
  except (OSError, UnicodeDecodeError) as e:  # a directory, invalid UTF-8, unreadable
    raise errors.CheckpointError(
        f'{target} cannot be read as JSON lines ({type(e).__name__}: {str(e)[:120]}); fix it or '
        'move it away (losing that history) to resume.') from e
  lines = [line for line in text.splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        logging.warning('Dropping the torn last line of %s (a crash mid-write): %r', target, line)
        print(f'warning: dropped the torn last line of {target}', flush=True)
        break
      raise errors.CheckpointError(
          f'Line {i + 1} of {target} is not JSON ({e}); fix or delete that line to resume.') from e
  return records


class JsonLines:
  """A JSON-lines file that grows one record at a time, complete on storage after every record.

  A local file is appended to and flushed. An object (gs://) cannot be appended to, so after each
  record the whole text is uploaded again, replacing the object at once (tf.io.gfile re-uploads a
  GCS file whole at every flush too); a log has one record per log interval, so this stays small.
  """

  def __init__(self, target, records=()):
    """Continues `target` from `records` (what it holds now)."""
    self.target = epath.Path(target)
    self._lines = [json.dumps(r) + '\n' for r in records] if is_url(target) else None
    self._file = None if is_url(target) else open(str(target), 'a')

  def append(self, record):
    line = json.dumps(record) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    self.target.write_text(''.join(self._lines))

  def close(self):
    if self._file is not None:
      self._file.close()


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _holder():
  """This process as a lock holder; the nonce is a positive int32, broadcast to other hosts."""
  nonce = int.from_bytes(os.urandom(4), 'little') % (2**31 - 1) + 1
  return dict(host=socket.gethostname(), pid=os.getpid(),
              started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), nonce=nonce)


def _is_stale(holder):
  """A lock left by a process of this host that no longer runs (a kill -9, a crash)."""
  return holder.get('host') == socket.gethostname() and not _pid_alive(int(holder.get('pid', -1)))


def read_holder(lock):
  """The holder recorded in a lock file: None when there is no lock file, '' when it holds no
  holder record (empty, not JSON: not a lock this mimjax wrote, since it writes each at once)."""
  try:
    holder = json.loads(epath.Path(lock).read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return ''
  return holder if isinstance(holder, dict) else ''


class WorkdirLock:
  """WORKDIR/lock.json while a run uses the workdir: a second run refuses, naming the holder.

  A local lock appears whole or not at all: its content is written to a private file first, which
  is then hard-linked to the lock's name (create-exclusive). A lock whose process is gone (same
  host, pid not running) is stale and taken over, so a run killed with kill -9 still resumes; an
  empty or unparsable lock is never taken over (its holder is unknown). The lock records a nonce
  that the other hosts of a multi-host run read back to prove they see the same workdir.
  """

  def __init__(self, workdir):
    self.file = path(workdir, LOCK_NAME)
    self.holder = None

  def acquire(self):
    """Takes the lock; CheckpointError when another live run (or an unknown one) holds it."""
    holder = _holder()
    text = json.dumps(holder)
    for _ in range(3):
      if self._create(text, holder['nonce']):
        self.holder = holder
        return holder
      current = read_holder(self.file)
      if current is None:
        continue  # released between our attempt and the read: try again
      if current == '':
        raise errors.CheckpointError(
            f'{self.file} exists but holds no lock record (it is empty or not JSON), so whether '
            'a run uses this workdir is unknown. If none does, delete that file and re-run.')
      if not _is_stale(current):
        raise errors.CheckpointError(
            f'The workdir is in use by another run (host {current.get("host")}, pid '
            f'{current.get("pid")}, started {current.get("started")}); {self.file} is its lock. '
            'Wait for that run to end or stop it, or use another --workdir. If that run is gone '
            '(its host was lost), delete the lock file.')
      self._remove_stale(current, holder['nonce'])
    raise errors.CheckpointError(f'Could not take the workdir lock {self.file}; retry.')

  def _create(self, text, nonce):
    """Creates the lock file with `text` only if it does not exist (atomic on a local
    filesystem: the content is complete before the name appears)."""
    if is_url(self.file):
      if self.file.exists():
        return False
      self.file.write_text(text)
      return True
    private = f'{self.file}.{nonce}.new'
    with open(private, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(private, str(self.file))
    except FileExistsError:
      return False
    finally:
      os.unlink(private)
    return True

  def _remove_stale(self, stale, nonce):
    """Removes the stale lock `stale`, and only it: a live lock another run put in its place
    meanwhile is put back."""
    print(f'warning: taking over the stale lock {self.file} of a run that is gone ({stale})',
          file=sys.stderr, flush=True)
    if is_url(self.file):
      self.file.unlink(missing_ok=True)
      return
    aside = f'{self.file}.{nonce}.stale'
    try:
      os.rename(str(self.file), aside)
    except FileNotFoundError:
      return  # another run removed it first
    if read_holder(aside) != stale:
      try:
        os.link(aside, str(self.file))
      except FileExistsError:
        pass
    os.unlink(aside)

  def release(self):
    """Removes the lock if this run still holds it."""
    if self.holder is None:
      return
    current = read_holder(self.file)
    if current and current.get('nonce') == self.holder['nonce']:
      self.file.unlink(missing_ok=True)
    self.holder = None
