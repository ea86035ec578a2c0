"""Workdir reads and writes on local disks and object stores (gs://, s3://) through `etils.epath`.

Orbax reads the same paths, so checkpoints, metrics.jsonl, config.json, eval JSON and images of a
`gs://bucket/run` workdir all land in the bucket. Local paths are made absolute; URLs never are.
"""
import json
import os
import socket
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
  lines = [line for line in epath.Path(target).read_text().splitlines() if line.strip()]
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
  """The holder recorded in a lock file, or None."""
  try:
    return json.loads(lock.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None  # a lock being written or removed right now


class WorkdirLock:
  """WORKDIR/lock.json while a run uses the workdir: a second run refuses, naming the holder.

  A lock whose process is gone (same host, pid not running) is stale and taken over, so a run
  killed with kill -9 still resumes. The lock records a nonce that the other hosts of a
  multi-host run read back to prove they see the same workdir.
  """

  def __init__(self, workdir):
    self.file = path(workdir, LOCK_NAME)
    self.holder = None

  def acquire(self):
    """Takes the lock; CheckpointError when another live run holds it."""
    holder = _holder()
    text = json.dumps(holder)
    for _ in range(2):
      if self._create(text):
        self.holder = holder
        return holder
      current = read_holder(self.file)
      if current is not None and not _is_stale(current):
        raise errors.CheckpointError(
            f'The workdir is in use by another run (host {current.get("host")}, pid '
            f'{current.get("pid")}, started {current.get("started")}); {self.file} is its lock. '
            'Wait for that run to end or stop it, or use another --workdir. If that run is gone '
            '(its host was lost), delete the lock file.')
      print(f'warning: taking over the stale lock {self.file} of a run that is gone '
            f'({current})', flush=True)
      self.file.unlink(missing_ok=True)
    raise errors.CheckpointError(f'Could not take the workdir lock {self.file}; retry.')

  def _create(self, text):
    """Creates the lock file only if it does not exist (atomic on a local filesystem)."""
    if is_url(self.file):
      if self.file.exists():
        return False
      self.file.write_text(text)
      return True
    try:
      fd = os.open(str(self.file), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def release(self):
    """Removes the lock if this run still holds it."""
    if self.holder is None:
      return
    current = read_holder(self.file)
    if current and current.get('nonce') == self.holder['nonce']:
      self.file.unlink(missing_ok=True)
    self.holder = None
