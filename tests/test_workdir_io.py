"""The workdir path layer (`mimjax.workdir_io`): URLs stay URLs, a gs:// workdir keeps the whole
run in the bucket (slow: a GCS emulator), a read-only or offline workdir is one line naming the
cause and the fix, and the workdir lock: one run at a time, a lock appears whole, a stale one of a
dead process is taken over, an unreadable one never."""
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import pytest
from etils import epath

from conftest import ROOT
from conftest import TINY_DECODER
from conftest import config_flags
from conftest import free_port
from conftest import one_line_error
from conftest import tiny_overrides
from mimjax import errors
from mimjax import export
from mimjax import train
from mimjax import workdir_io


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  assert str(workdir_io.path('gs://bucket/run', 'checkpoints')) == 'gs://bucket/run/checkpoints'
  assert str(workdir_io.path('s3://b/r', 'metrics.jsonl')) == 's3://b/r/metrics.jsonl'
  monkeypatch.chdir(tmp_path)
  assert str(workdir_io.path('run', 'config.json')) == str(tmp_path / 'run' / 'config.json')


_BUCKET = 'mimjax-test'


# gcp-storage-emulator's command line, with the one header it leaves out added: GCS sends each
# object's generation (x-goog-generation) with its download, and TensorStore reads Orbax's OCDBT
# manifests by it ("Malformed StorageGeneration" without it).
_EMULATOR = textwrap.dedent('''
    import sys
    from gcp_storage_emulator.handlers import objects
    plain_download = objects.download
    def download(request, response, storage, *args, **kwargs):
      try:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
        response['x-goog-generation'] = obj['generation']
      except Exception:  # a missing object: the plain handler answers 404
        pass
      return plain_download(request, response, storage, *args, **kwargs)
    objects.download = download  # before the server module builds its routes from it
    from gcp_storage_emulator import __main__ as cli
    sys.exit(cli.main(sys.argv[1:]))
''')


@pytest.fixture
def gcs_emulator():
  """(url, env): an in-memory GCS emulator (PyPI gcp-storage-emulator) holding bucket _BUCKET, and
  the environment that points every library of a gs:// workdir at it: epath on its fsspec backend
  (gcsfs; tf.io.gfile's GCS client has a fixed endpoint) and TensorStore, which writes Orbax's
  arrays, with a test token instead of a metadata-server lookup."""
  pytest.importorskip('gcp_storage_emulator')
  pytest.importorskip('gcsfs')
  url = f'http://127.0.0.1:{free_port()}'
  server = subprocess.Popen(
      [sys.executable, '-c', _EMULATOR, 'start', '--port', url.rsplit(':', 1)[1],
       '--in-memory', '--default-bucket', _BUCKET, '--quiet'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while True:
      try:
        urllib.request.urlopen(url + '/', timeout=5).close()
        break
      except OSError:
        assert time.time() < deadline and server.poll() is None, 'the emulator did not start'
        time.sleep(0.2)
    env = dict(STORAGE_EMULATOR_HOST=url, EPATH_USE_TF='false', TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator')
    yield url, env
  finally:
    server.terminate()
    server.wait()


def _bucket_objects(url, prefix):
  """The object names under `prefix`, read over the emulator's JSON API (not the path layer)."""
  query = urllib.parse.urlencode(dict(prefix=prefix))
  with urllib.request.urlopen(f'{url}/storage/v1/b/{_BUCKET}/o?{query}') as r:
    return sorted(item['name'] for item in json.load(r).get('items', []))


def _bucket_object(url, name, method='GET'):
  quoted = urllib.parse.quote(name, safe='')
  request = urllib.request.Request(f'{url}/storage/v1/b/{_BUCKET}/o/{quoted}?alt=media',
                                   method=method)
  with urllib.request.urlopen(request) as r:
    return r.read()


@pytest.mark.slow  # two trainer runs in fresh processes: ~3 minutes on 2 busy cores
def test_a_gs_workdir_keeps_the_run_in_the_bucket_and_a_rerun_resumes_from_it(gcs_emulator,
                                                                             tmp_path):
  """The real trainer on gs://: checkpoints, metrics, config and images are objects in the
  bucket, nothing lands on the local disk (the old `abspath` bug wrote ./gs:/...); after losing
  the last checkpoint the rerun resumes from the bucket's step-3 checkpoint and logs the first
  run's steps 4-6 again; `mimjax.evaluate` reads the run from the bucket and writes its JSON
  there."""
  url, emulator_env = gcs_emulator
  overrides = tiny_overrides(**TINY_DECODER, **{'log.images_every_steps': 3,
                                                 'log.tensorboard': False})
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3', **emulator_env)
  local = tmp_path / 'cwd'
  local.mkdir()

  def run(*args):
    result = subprocess.run([sys.executable, '-m', *args, f'--workdir=gs://{_BUCKET}/run'],
                            cwd=local, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout

  def train_on_gs():
    return run('mimjax.train', '--config', 'configs/mae.py:runlocal', *config_flags(overrides))

  train_on_gs()
  names = _bucket_objects(url, 'run/')
  for name in ('run/config.json', 'run/metrics.jsonl',
               'run/images/reconstruction_norm_pix_0000003.png',
               'run/images/reconstruction_norm_pix_0000006.png',
               'run/checkpoints/3/checksums.json', 'run/checkpoints/6/checksums.json'):
    assert name in names, (name, names)
  assert any(n.startswith('run/checkpoints/6/state/') for n in names), names
  assert 'run/lock.json' not in names  # released at the end
  assert os.listdir(local) == []  # nothing written to the local disk
  read = lambda name: _bucket_object(url, name).decode()
  first = [json.loads(line) for line in read('run/metrics.jsonl').splitlines()]
  assert [r['step'] for r in first] == [1, 2, 3, 4, 5, 6]
  assert json.loads(read('run/config.json'))['total_steps'] == 6
  png = _bucket_object(url, 'run/images/reconstruction_norm_pix_0000006.png')
  assert png[:8] == b'\x89PNG\r\n\x1a\n'

  for name in names:  # lose the step-6 checkpoint: the rerun must resume from step 3 in the bucket
    if name.startswith('run/checkpoints/6/'):
      _bucket_object(url, name, method='DELETE')
  output = train_on_gs()
  assert f'Resuming from checkpoint 3 in gs://{_BUCKET}/run/checkpoints' in output, output
  again = [json.loads(line) for line in read('run/metrics.jsonl').splitlines()]
  assert [r['step'] for r in again] == [1, 2, 3, 4, 5, 6]
  for key in ('loss', 'grad_norm', 'lr'):
    assert [r[key] for r in again] == [r[key] for r in first], key
  assert 'run/checkpoints/6/checksums.json' in _bucket_objects(url, 'run/checkpoints/6/')

  run('mimjax.evaluate', '--protocol=knn')
  [knn] = json.loads(read('run/eval_knn.json'))['results']  # one entry: default options, step 6
  assert knn['step'] == 6 and 0 <= knn['top1'] <= 1, knn
  assert os.listdir(local) == []


def test_read_only_workdir(tiny_mae_config, tmp_path, monkeypatch):
  """A read-only parent (simulated: tests run as root, for whom chmod does not bite)."""
  parent = str(tmp_path / 'readonly')
  os.mkdir(parent)
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: p != parent and real_access(p, mode))
  with pytest.raises(errors.ConfigError) as e:
    train.train(tiny_mae_config, os.path.join(parent, 'run'))
  one_line_error(e, 'cannot be created', 'is not writable')
  assert os.listdir(parent) == []


def _offline_store(monkeypatch):
  """gs:// as on a machine without network: every request fails the way TensorFlow's GCS client
  fails offline (the error of issue 32), and every write or mkdir on a gs:// path is recorded."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpath = epath.gpath._GPath  # pylint: disable=protected-access

  def offline(self, *args, **kwargs):
    raise tf.errors.FailedPreconditionError(
        None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve "
        f"hostname', error details: Could not resolve host: www.googleapis.com\n\t when reading "
        f'metadata of {self}')

  writes = []
  monkeypatch.setattr(gpath, 'exists', offline)
  for name in ('mkdir', 'write_text', 'write_bytes', 'open'):
    monkeypatch.setattr(gpath, name, lambda self, *a, _name=name, **k: writes.append((_name, self)))
  return writes


def test_an_offline_gs_workdir_is_one_line_naming_the_cause_and_the_fix(tiny_mae_config, tmp_path,
                                                                        monkeypatch, capsys):
  """train (as its command line reports it), and evaluate / export (which read the workdir's
  config first): one `error:` line with the cause and the fix, no traceback, nothing written."""
  writes = _offline_store(monkeypatch)
  with pytest.raises(SystemExit) as e, errors.reported():
    train.train(tiny_mae_config, 'gs://mimjax-offline/run')
  assert e.value.code == 1
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: --workdir gs://mimjax-offline/run '
                                                 'cannot be reached'), err
  assert 'Could not resolve host' in lines[0] and 'gcloud auth' in lines[0]
  assert 'Traceback' not in err
  with pytest.raises(errors.CheckpointError) as e:
    export.export_checkpoint('gs://mimjax-offline/run', str(tmp_path / 'enc.npz'), fmt='npz')
  one_line_error(e, 'cannot be reached', 'FailedPreconditionError', 'local --workdir')
  assert writes == [] and os.listdir(tmp_path) == []


def _lock_of(pid, host=None):
  import socket  # pylint: disable=g-import-not-at-top
  return json.dumps(dict(host=host or socket.gethostname(), pid=pid, started='earlier', nonce=7))


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(tmp_path):
  first = workdir_io.WorkdirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(errors.CheckpointError, match=f'pid {os.getpid()}'):
    workdir_io.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / workdir_io.LOCK_NAME).exists()
  # A lock held on another host (pid unknown here) is never taken over.
  (tmp_path / workdir_io.LOCK_NAME).write_text(_lock_of(1, host='other-host'))
  with pytest.raises(errors.CheckpointError, match='host other-host'):
    workdir_io.WorkdirLock(str(tmp_path)).acquire()


def test_an_empty_or_unparsable_lock_is_never_taken_over(tmp_path):
  """Its holder is unknown (mimjax writes a lock whole), so it is refused and left in place."""
  lock = tmp_path / workdir_io.LOCK_NAME
  for text in ('', '{"host": "a", "pi', '[]'):
    lock.write_text(text)
    with pytest.raises(errors.CheckpointError, match='holds no lock record .* delete that file'):
      workdir_io.WorkdirLock(str(tmp_path)).acquire()
    assert lock.read_text() == text


def test_the_lock_appears_with_its_whole_record(tmp_path, monkeypatch):
  """Whenever the lock's name comes into being (an exclusive create or a link), the file already
  holds the holder record: a run starting in between reads a live lock, never an empty one."""
  lock = str(tmp_path / workdir_io.LOCK_NAME)
  seen = []
  real_open, real_link = os.open, os.link

  def watch(result, name):
    if str(name) == lock:
      seen.append(workdir_io.read_holder(lock))
    return result

  monkeypatch.setattr(os, 'open', lambda p, *a, **k: watch(real_open(p, *a, **k), p))
  monkeypatch.setattr(os, 'link', lambda src, dst, **k: watch(real_link(src, dst, **k), dst))
  holder = workdir_io.WorkdirLock(str(tmp_path)).acquire()
  assert seen == [holder]
  assert os.listdir(tmp_path) == [workdir_io.LOCK_NAME]  # no private file left behind


def test_a_run_refuses_a_workdir_held_by_a_live_process(tiny_mae_config, tmp_path):
  holder = subprocess.Popen(['sleep', '60'])
  try:
    (tmp_path / workdir_io.LOCK_NAME).write_text(_lock_of(holder.pid))
    with pytest.raises(errors.CheckpointError, match=f'pid {holder.pid}'):
      train.train(tiny_mae_config, str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert sorted(os.listdir(tmp_path)) == [workdir_io.LOCK_NAME]  # nothing else written


def test_a_stale_lock_from_a_dead_process_does_not_block_a_resume(trained):
  """A kill -9 after the step-3 checkpoint left its lock behind; the rerun trains step 4."""
  config, workdir = trained
  dead = subprocess.Popen(['true'])
  dead.wait()
  lock = os.path.join(workdir, workdir_io.LOCK_NAME)
  with open(lock, 'w') as f:
    f.write(_lock_of(dead.pid))
  with config.unlocked():
    config.total_steps, config.resume.accept_changes = 4, 'total_steps'
  assert train.train(config, workdir)['step'] == 4
  assert not os.path.exists(lock)  # released at the end
