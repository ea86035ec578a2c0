"""Pod and reliability plumbing: the workdir path layer, crash-safe metrics, the workdir lock,
SIGTERM / preemption stops, the shared-workdir check, process-0 dataset preparation, SLURM device
binding and the local launcher's Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

from jax._src import clusters
import numpy as np
import pytest

from conftest import ROOT, TINY_DECODER, config_flags, tiny_overrides
from mimjax import checkpoint as checkpoint_lib
from mimjax import distributed
from mimjax import errors
from mimjax import metrics_writer
from mimjax import train
from mimjax import workdir_io


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _write_lines(path, lines):
  with open(path, 'w') as f:
    f.write(''.join(lines))


# ------------------------------------------------------------------ path layer


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  assert str(workdir_io.path('gs://bucket/run', 'checkpoints')) == 'gs://bucket/run/checkpoints'
  assert str(workdir_io.path('s3://b/r', 'metrics.jsonl')) == 's3://b/r/metrics.jsonl'
  monkeypatch.chdir(tmp_path)
  assert str(workdir_io.path('run', 'config.json')) == str(tmp_path / 'run' / 'config.json')


# ------------------------------------------------------------------ a gs:// workdir (GCS emulator)

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
  url = f'http://127.0.0.1:{_free_port()}'
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


# ------------------------------------------------------------------ metrics.jsonl (issue 18.1)


def test_a_crash_between_truncate_and_rewrite_keeps_the_metrics_history(tmp_path, monkeypatch):
  """The resume rewrite dies after writing its temporary file: the history is untouched."""
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in range(1, 9)]
  _write_lines(path, lines)

  def crash(*args):
    raise KeyboardInterrupt('kill -9 stand-in')

  monkeypatch.setattr(os, 'replace', crash)
  with pytest.raises(KeyboardInterrupt):
    metrics_writer.MetricsWriter(str(tmp_path), 10, 4, progress_bar=False)
  monkeypatch.undo()
  assert path.read_text() == ''.join(lines)
  writer = metrics_writer.MetricsWriter(str(tmp_path), 10, 4, progress_bar=False)  # the rerun
  writer.close()
  assert [r['step'] for r in _records(tmp_path)] == [1, 2, 3, 4]


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
  _write_lines(tmp_path / 'metrics.jsonl',
               ['{"step": 1, "loss": 2.0}\n', '{"step": 2, "loss": 1.5}\n', '{"step": 3, "lo'])
  writer = metrics_writer.MetricsWriter(str(tmp_path), 10, 3, progress_bar=False)
  writer.write(3, {'loss': 1.25})
  writer.close()
  assert _records(tmp_path) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5},
                                {'step': 3, 'loss': 1.25}]
  assert 'torn last line' in capsys.readouterr().out


def test_a_damaged_line_inside_the_history_is_an_error(tmp_path):
  _write_lines(tmp_path / 'metrics.jsonl', ['{"step": 1}\n', 'garbage\n', '{"step": 2}\n'])
  with pytest.raises(errors.CheckpointError, match='Line 2 of'):
    metrics_writer.MetricsWriter(str(tmp_path), 10, 2, progress_bar=False)


# ------------------------------------------------------------------ workdir lock (issue 18.2)


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


# ------------------------------------------------------------------ SIGTERM exit status


def test_the_preempted_exit_status_is_what_a_sigterm_kill_reports():
  killed = subprocess.Popen(['sleep', '60'])
  killed.terminate()
  assert 128 - killed.wait() == train.PREEMPTED_EXIT_CODE  # Popen reports -15; a shell 143


# ------------------------------------------------------------------ SLURM device binding

_SLURM = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[001-002]', 'SLURM_NTASKS': '16',
          'SLURM_PROCID': '11', 'SLURM_LOCALID': '3', 'SLURM_STEP_NUM_NODES': '2'}


@pytest.mark.parametrize('visible, expected', [
    ('3', [0]),  # srun --gpu-bind=single:1 (launch/slurm_gpu.sbatch): one GPU, ordinal 0
    ('0,1,2,3,4,5,6,7', [3]),  # no binding: every GPU of the node, JAX picks SLURM_LOCALID
])
def test_each_slurm_task_gets_a_device_it_can_see(monkeypatch, visible, expected):
  for key, value in {**_SLURM, 'CUDA_VISIBLE_DEVICES': visible}.items():
    monkeypatch.setenv(key, value)
  ids = distributed.slurm_local_device_ids()
  address, count, process_id, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, ids, None, None)
  assert (address, count, process_id) == ('gpu001:61586', 16, 11)  # 4242 % 4096 + 61440
  assert list(local) == expected
  assert all(i < len(visible.split(',')) for i in local)


# Stand-ins for SLURM's commands. srun starts 2 tasks on node gpu001 as `--gpu-bind=single:1`
# does (each task sees only its own GPU) or, without that flag, each seeing all 4 GPUs; `python`
# records the environment and arguments a task's trainer would start with, then exits $PROBE_EXIT.
_FAKE_SLURM = {
    'srun': """#!/usr/bin/env bash
bound=0
while [[ "$1" == --* ]]; do [[ "$1" == --gpu-bind=single:1 ]] && bound=1; shift; done
status=0
for i in 0 1; do
  visible=0,1,2,3; [[ $bound == 1 ]] && visible=$i
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 SLURM_STEP_NODELIST=gpu001 \\
    SLURM_STEP_NUM_NODES=1 CUDA_VISIBLE_DEVICES=$visible "$@" || status=$?
done
exit $status
""",
    'python': """#!/usr/bin/env bash
python3 -c 'import json, os, sys; json.dump(dict(env=dict(os.environ), argv=sys.argv[1:]), \\
  open(os.path.join(os.environ["PROBE_DIR"], "task_" + os.environ["SLURM_PROCID"]), "w"))' "$@"
exit "${PROBE_EXIT:-0}"
""",
    'scontrol': 'echo "$@" >> "$PROBE_DIR/scontrol.log"\n',
}


def test_the_sbatch_script_gives_each_task_a_device_it_sees_and_requeues_on_143(tmp_path,
                                                                              monkeypatch):
  """launch/slurm_gpu.sbatch run under stand-in srun / scontrol: each task's environment (bound to
  one GPU) makes JAX's SLURM detection pick that task's process id and local device 0, the only
  ordinal it can see; a run that exits 143 (preempted) requeues the job."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in _FAKE_SLURM.items():
    (bin_dir / name).write_text(text if text.startswith('#!') else '#!/usr/bin/env bash\n' + text)
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', PROBE_DIR=str(tmp_path),
             SLURM_JOB_ID='4242', SLURM_SUBMIT_DIR=ROOT)
  script = ['bash', 'launch/slurm_gpu.sbatch', '--config', 'configs/mae.py', '--workdir', '/w']
  assert subprocess.run(script, cwd=ROOT, env=env, timeout=120).returncode == 0
  assert not (tmp_path / 'scontrol.log').exists()
  for i in range(2):
    task = json.loads((tmp_path / f'task_{i}').read_text())
    assert task['argv'][-1] == '--config.distributed.num_processes=-1'
    assert '--xla_gpu_enable_latency_hiding_scheduler=true' in task['env']['XLA_FLAGS']
    assert task['env']['CUDA_VISIBLE_DEVICES'] == str(i)  # only its own GPU
    for key in [k for k in os.environ if k.startswith('SLURM_')]:
      monkeypatch.delenv(key)
    for key, value in task['env'].items():
      if key.startswith('SLURM_') or key == 'CUDA_VISIBLE_DEVICES':
        monkeypatch.setenv(key, value)
    local = distributed.slurm_local_device_ids()  # what mimjax.distributed.initialize passes
    address, count, process_id, local = (
        clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, local, None,
                                                                 None))
    assert (address, count, process_id, list(local)) == ('gpu001:61586', 2, i, [0])

  preempted = subprocess.run(script, cwd=ROOT, env=dict(env, PROBE_EXIT='143'), timeout=120,
                             capture_output=True, text=True)
  assert preempted.returncode == 143, preempted.stderr
  assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242\n'


# ------------------------------------------------------------------ several processes

# Joins a 2-process run (gloo) through mimjax.distributed, then runs one check.
_WORKER = textwrap.dedent('''
    import sys
    import ml_collections
    from mimjax import distributed, errors
    distributed.initialize(ml_collections.ConfigDict(dict(distributed=dict(
        num_processes=0, process_id=-1, coordinator_address=''))))
    import jax
    with errors.reported():
      if sys.argv[1] == 'claim':
        distributed.claim_workdir(sys.argv[2])
        print('CLAIMED')
      else:
        from mimjax.data import sources
        prepare = sources.LocalFashionMNIST.download_and_prepare
        def traced(self, *a, **k):
          print(f'PREPARING on process {jax.process_index()}', flush=True)
          return prepare(self, *a, **k)
        sources.LocalFashionMNIST.download_and_prepare = traced
        builder = sources.get_builder('fashion_mnist', sys.argv[2])
        print('EXAMPLES', builder.info.splits['train'].num_examples, flush=True)
        if jax.process_index() == 0:  # a reopen by one host alone (the start-up summary) must
          sources.get_builder('fashion_mnist', sys.argv[2])  # not wait for the others
          print('REOPENED', flush=True)
''')


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(args_of_process, timeout=300):
  """(returncode, output) of each of two processes running _WORKER with its own args."""
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = []
  for i, args in enumerate(args_of_process):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3',
               MIMJAX_COORDINATOR=coordinator, MIMJAX_NUM_PROCESSES='2', MIMJAX_PROCESS_ID=str(i))
    env.pop('XLA_FLAGS', None)
    procs.append(subprocess.Popen([sys.executable, '-c', _WORKER, *args], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


@pytest.mark.slow  # two JAX processes: ~30 s on 2 busy cores
def test_a_workdir_not_shared_by_every_host_stops_both_with_an_error(tmp_path):
  results = _two_processes([['claim', str(tmp_path / 'host0')], ['claim', str(tmp_path / 'host1')]])
  for code, output in results:
    assert code == 1 and 'not one directory shared by every host' in output, output
  assert not (tmp_path / 'host1').exists()  # only process 0 creates the workdir
  assert not (tmp_path / 'host0' / workdir_io.LOCK_NAME).exists()  # and gives the lock back
  shared = _two_processes([['claim', str(tmp_path / 'shared')]] * 2)
  assert [code for code, _ in shared] == [0, 0] and all('CLAIMED' in o for _, o in shared)


@pytest.mark.slow  # process 0 prepares Fashion-MNIST (60k examples): minutes on busy cores
def test_process_0_alone_prepares_an_empty_shared_data_dir(tmp_path):
  """Process 1 waits far longer than a gloo collective's 30 s timeout, at a barrier."""
  if not os.path.exists('/usr/share/datasets/fashion-mnist'):
    pytest.skip('needs the Debian dataset-fashion-mnist files')
  results = _two_processes([['prepare', str(tmp_path)]] * 2, timeout=1200)
  for code, output in results:
    assert code == 0 and 'EXAMPLES 60000' in output, output
  assert 'PREPARING on process 0' in results[0][1] and 'REOPENED' in results[0][1]
  assert 'PREPARING' not in results[1][1]


@pytest.mark.slow  # three 2-process runs: ~4 minutes on 2 busy cores
def test_ctrl_c_to_the_launcher_checkpoints_both_processes_at_one_step_and_resumes(tmp_path):
  """SIGINT to launch/local_multiprocess.sh: it sends SIGTERM to both trainers (what SLURM's
  --signal and a TPU maintenance event do), JAX's preemption service stops them at one common
  step with a checkpoint, both exit 143 (requeue), and the rerun ends with the uninterrupted
  2-process run's metrics."""
  overrides = tiny_overrides(**{'mae.decoder_width': 32, 'mae.decoder_depth': 1,
                                'mae.decoder_heads': 2, 'total_steps': 40,
                                'checkpoint.every_steps': 40, 'log.every_steps': 1})
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)

  def launch(workdir, logs):
    return subprocess.Popen(
        ['launch/local_multiprocess.sh', '2', '--config', 'configs/mae.py:runlocal',
         *config_flags(overrides), f'--workdir={workdir}'],
        cwd=ROOT, env=dict(env, LOG_DIR=str(logs)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)

  straight = launch(tmp_path / 'straight', tmp_path / 'logs_straight')
  assert straight.wait(timeout=900) == 0, straight.stdout.read()

  stopped, logs = tmp_path / 'stopped', tmp_path / 'logs_stopped'
  launcher = launch(stopped, logs)
  deadline = time.time() + 1200  # two processes start and compile in ~10 minutes on busy cores
  try:
    while not (stopped / 'metrics.jsonl').exists() or len(_records(stopped)) < 3:
      assert time.time() < deadline and launcher.poll() is None, launcher.stdout.read()
      time.sleep(0.5)
  finally:
    launcher.send_signal(signal.SIGINT)  # also stops both trainers when the wait failed
  assert launcher.wait(timeout=300) == 130, launcher.stdout.read()
  said = launcher.stdout.read()
  for i in range(2):
    assert f'process {i} exited with status {train.PREEMPTED_EXIT_CODE}' in said, said
  outputs = [(logs / f'process_{i}.log').read_text() for i in range(2)]
  steps = [int(o.split('Stopped at step ')[1].split(';')[0]) for o in outputs]
  assert steps[0] == steps[1] < 40, outputs
  ckpt = checkpoint_lib.Checkpointer(str(stopped))
  assert ckpt.latest_step() == steps[0]
  ckpt.close()

  rerun = launch(stopped, logs)
  assert rerun.wait(timeout=900) == 0, rerun.stdout.read()
  a, b = _records(tmp_path / 'straight'), _records(stopped)
  assert [r['step'] for r in b] == [r['step'] for r in a] == list(range(1, 41))
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6)
