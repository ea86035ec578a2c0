"""End-to-end training: loss goes down, outputs appear, resume reproduces, bad input is refused,
a non-finite update stops the run before it is checkpointed, and a stopped run exits 130 / 143."""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, TINY_DECODER, config_flags, load_config, run_module, tiny_overrides
from conftest import checkpoint_steps, metrics_records, set_fields
from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import errors
from mimjax import train
from mimjax import train_step as train_step_lib
from test_train_step import LinearRegression


def test_tiny_run_writes_everything_and_learns(tiny_mae_config, tmp_path):
  with tiny_mae_config.unlocked():
    tiny_mae_config.total_steps = 30
    tiny_mae_config.checkpoint.every_steps = 15
    tiny_mae_config.log.images_every_steps = 30
    tiny_mae_config.optim.base_lr = 4e-3
  workdir = str(tmp_path)
  final = train.train(tiny_mae_config, workdir)
  records = metrics_records(workdir)
  assert [r['step'] for r in records] == list(range(1, 31))
  for key in ('loss', 'loss_mae', 'lr', 'images_per_sec', 'grad_norm'):
    assert key in records[-1]
  assert np.mean([r['loss'] for r in records[-5:]]) < np.mean([r['loss'] for r in records[:5]])
  assert final['step'] == 30
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['15', '30']
  assert os.path.exists(os.path.join(workdir, 'images', 'reconstruction_norm_pix_0000030.png'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  saved = config_lib.from_json(open(os.path.join(workdir, 'config.json')).read())
  assert saved.model.variant == 'mu/4' and saved.total_steps == 30


def test_resume_after_crash_matches_uninterrupted(tiny_mae_config, tmp_path):
  """Crash after the step-3 checkpoint (simulated by deleting the later one), rerun, compare."""
  full = train.train(tiny_mae_config, str(tmp_path / 'full'))
  crashed = str(tmp_path / 'crashed')
  shutil.copytree(tmp_path / 'full', crashed)  # the same run, crashed before its step-6 save
  shutil.rmtree(os.path.join(crashed, 'checkpoints', '6'))
  resumed = train.train(tiny_mae_config, crashed)
  assert resumed['step'] == full['step'] == 6
  for key in ('loss', 'grad_norm', 'lr'):
    np.testing.assert_allclose(resumed[key], full[key], rtol=1e-6)
  # metrics.jsonl holds each step once, the resumed steps replacing the crashed run's.
  assert [r['step'] for r in metrics_records(crashed)] == list(range(1, 7))


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """A 12-step run logging every 4 steps, never interrupted: (config, workdir)."""
  config = load_config('configs/mae.py:runlocal', **tiny_overrides(**TINY_DECODER, **{
      'total_steps': 12, 'log.every_steps': 4, 'checkpoint.every_steps': 12}))
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  train.train(config, workdir)
  return config, workdir


@pytest.mark.parametrize('signum,stop', [(signal.SIGINT, train.Stopped),
                                         (signal.SIGTERM, train.Preempted)])
def test_a_signal_between_log_steps_saves_and_the_rerun_logs_the_straight_run(
    straight_run, tmp_path, monkeypatch, signum, stop):
  """A real Ctrl-C or SIGTERM while step 6 runs (logs every 4): the run checkpoints step 6 with
  its open log interval, exits 128 + signal, and the rerun's log equals the straight run's."""
  config, straight = straight_run
  config = copy.deepcopy(config)
  real_batches = train.pipeline.train_batches

  def batches_that_signal(config, start_step):
    for i, batch in enumerate(real_batches(config, start_step)):
      if i == 5:  # drawn by step 6 (step 1 gets the batch drawn before the loop)
        os.kill(os.getpid(), signum)
      yield batch

  interrupted = str(tmp_path / 'interrupted')
  handler_before = signal.getsignal(signum)
  with monkeypatch.context() as patch:
    patch.setattr(train.pipeline, 'train_batches', batches_that_signal)
    with pytest.raises(stop) as stopped:
      train.train(config, interrupted)
  assert (stopped.value.step, stopped.value.exit_code) == (6, 128 + signum)  # not 0: not finished
  assert signal.getsignal(signum) == handler_before  # the trainer's handler removed
  ckpt = checkpoint_lib.Checkpointer(interrupted)
  assert ckpt.latest_step() == 6
  assert ckpt.read_meta(6)['open_interval']['steps'] == 2
  ckpt.close()
  assert [r['step'] for r in metrics_records(interrupted)] == [4]

  train.train(config, interrupted)
  a, b = metrics_records(straight), metrics_records(interrupted)
  assert [r['step'] for r in b] == [r['step'] for r in a] == [4, 8, 12]
  for key in ('loss', 'grad_norm', 'lr'):
    assert [r[key] for r in b] == [r[key] for r in a], key  # the same float32 sums


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_stops_at_once_and_writes_nothing(tiny_mae_config, tmp_path,
                                                                   monkeypatch, signum):
  """The signal lands while start-up draws the first batch: the run stops there (it once went on
  to train to the end), with 130 / 143, and the workdir is never created."""
  def batches_that_interrupt(config, start_step):
    os.kill(os.getpid(), signum)
    yield from ()

  monkeypatch.setattr(train.pipeline, 'train_batches', batches_that_interrupt)
  with pytest.raises(train.Stopped) as stopped:
    train.train(tiny_mae_config, str(tmp_path / 'run'))
  assert (stopped.value.step, stopped.value.exit_code) == (None, 128 + signum)
  assert 'nothing was written' in str(stopped.value)
  assert not (tmp_path / 'run').exists()
  assert signal.getsignal(signum) == signal.default_int_handler if signum == signal.SIGINT else (
      signal.getsignal(signum) == signal.SIG_DFL)  # handlers restored


def _catches(pid, signum):
  """Whether process `pid` has a handler for `signum` (Linux: the SigCgt mask of /proc)."""
  with open(f'/proc/{pid}/status') as f:
    caught = next(line for line in f if line.startswith('SigCgt:')).split()[1]
  return bool(int(caught, 16) >> (signum - 1) & 1)


@pytest.mark.slow  # a subprocess; Linux only (/proc)
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_imports_stops_at_once_and_writes_nothing(tmp_path, signum):
  """The real command, signalled as soon as it takes SIGTERM (the first lines of mimjax/train.py,
  before JAX and TensorFlow are imported): one line, 130 / 143, no KeyboardInterrupt traceback,
  no workdir (a Ctrl-C there once printed a traceback)."""
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'mimjax.train', '--config', 'configs/mae.py:runlocal',
       f'--workdir={workdir}'], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not _catches(proc.pid, signal.SIGTERM):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.005)
  with open(f'/proc/{proc.pid}/maps') as f:
    loaded = f.read()
  proc.send_signal(signum)
  assert 'tensorflow' not in loaded and 'jaxlib' not in loaded  # still importing
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signum, err
  name = signal.Signals(signum).name
  assert err.strip().splitlines() == [f'{name}: stopped during start-up; nothing was written.']
  assert 'Traceback' not in err and out == '' and not workdir.exists()


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(monkeypatch, capsys):
  """The first Ctrl-C of a writing run asks for a checkpoint at the end of the step; the second
  ends the process at once (os._exit: no KeyboardInterrupt traceback, no waiting) with 130."""
  exits = []
  monkeypatch.setattr(os, '_exit', exits.append)
  with train._StopRequest() as request:  # pylint: disable=protected-access
    request.writing = True
    os.kill(os.getpid(), signal.SIGINT)
    assert request.reached(1) and exits == []
    os.kill(os.getpid(), signal.SIGINT)
  assert exits == [130]
  err = capsys.readouterr().err
  assert 'saving a checkpoint at the end of this step' in err and 'SIGINT again: exiting now' in err


@pytest.mark.slow
def test_ctrl_c_then_rerun_reproduces_uninterrupted_run(tmp_path):
  """The issue's acceptance test: interrupt the real command, rerun it, compare final metrics."""
  overrides = tiny_overrides(**{
      'total_steps': 40, 'checkpoint.every_steps': 10, 'log.every_steps': 5,
      'mae.decoder_width': 32, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2})
  args = ['mimjax.train', '--config', 'configs/mae.py:runlocal', *config_flags(overrides)]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')

  straight = run_module(args + [f'--workdir={tmp_path / "straight"}'])
  assert straight.returncode == 0, straight.stderr[-2000:]

  workdir = tmp_path / 'interrupted'
  proc = subprocess.Popen([sys.executable, '-m', *args, f'--workdir={workdir}'], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300  # interrupt once training logs (step 5), well before step 40
  while not (workdir / 'metrics.jsonl').exists() or not (workdir / 'metrics.jsonl').stat().st_size:
    assert time.time() < deadline, 'the interrupted run never logged'
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  assert 'checkpoint saved' in err
  interrupted_at = metrics_records(workdir)[-1]['step']
  assert interrupted_at < 40

  rerun = run_module(args + [f'--workdir={workdir}'])
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert 'Resuming from checkpoint' in rerun.stdout
  a, b = metrics_records(tmp_path / 'straight'), metrics_records(workdir)
  assert [r['step'] for r in b] == [r['step'] for r in a]
  for key in ('loss', 'grad_norm', 'lr'):
    np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, err_msg=key)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(trained):
  tiny_mae_config, workdir = trained
  before = {p: os.path.getmtime(os.path.join(dp, p))
            for dp, _, ps in os.walk(workdir + '/checkpoints') for p in ps}
  with tiny_mae_config.unlocked():
    tiny_mae_config.total_steps = 6
    tiny_mae_config.optim.base_lr = 1e39  # valid, but overflows float32: infinite updates
    tiny_mae_config.resume.accept_changes = 'total_steps,optim.base_lr'
  with pytest.raises(errors.NonFiniteError, match='last good checkpoint .step 3. .* intact'):
    train.train(tiny_mae_config, workdir)
  after = {p: os.path.getmtime(os.path.join(dp, p))
           for dp, _, ps in os.walk(workdir + '/checkpoints') for p in ps}
  assert after == before  # nothing in the good checkpoint was rewritten
  ckpt = checkpoint_lib.Checkpointer(workdir)
  assert ckpt.latest_step() == 3
  ckpt.close()


def test_checkpoint_of_a_different_model_is_refused(trained):
  config, workdir = trained
  config_before = open(os.path.join(workdir, 'config.json')).read()
  with config.unlocked():
    config.model.variant = 'pico/4'
    config.total_steps = 6
  with pytest.raises(errors.CheckpointError, match='different model.*new --workdir'):
    train.train(config, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == config_before


def test_unknown_config_argument_is_refused():
  with pytest.raises(ValueError, match="Unknown config argument 'runlokal'"):
    load_config('configs/mae.py:runlokal')


def test_image_size_not_multiple_of_patch(tiny_mae_config, tmp_path):
  with tiny_mae_config.unlocked():
    tiny_mae_config.data.image_size = 30
  with pytest.raises(errors.ConfigError, match='image_size=30: use a positive multiple of the'):
    train.train(tiny_mae_config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_batch_that_does_not_divide_over_devices(tmp_path):
  overrides = tiny_overrides(batch_size=10)
  result = run_module(['mimjax.train', '--config', 'configs/mae.py:runlocal',
                       *config_flags(overrides), f'--workdir={tmp_path}'],
                      env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert result.returncode == 1
  assert 'batch_size / optim.accum_steps 10 does not divide over the 4 devices' in result.stderr
  assert 'multiple of 4' in result.stderr


def test_gradient_accumulation_matches_full_batch(tiny_mae_config):
  """Two micro-batches of 8 give exactly the update of one batch of 16 (mean of equal means)."""
  rng = np.random.RandomState(0)
  batch = {'x': jnp.asarray(rng.randn(16, 5), jnp.float32),
           'y': jnp.asarray(rng.randn(16), jnp.float32)}
  results = []
  for accum in (1, 2):
    config = copy.deepcopy(tiny_mae_config)
    with config.unlocked():
      config.optim.accum_steps = accum
    framework = LinearRegression(config)
    init_fn, _, tx, lr = train_step_lib.build(framework, config, batch)
    step = jax.jit(train_step_lib.make_train_step(framework, tx, lr, accum))
    state = init_fn()
    for _ in range(3):
      state, metrics = step(state, batch)
    results.append((state.params['encoder']['kernel'], metrics['loss']))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_the_start_up_signal_handler_ends_where_training_takes_over(monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mimjax import train  # pylint: disable=g-import-not-at-top
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for hosts in (1, 2):
      monkeypatch.setattr(jax, 'process_count', lambda h=hosts: h)
      for signum in saved:
        signal.signal(signum, train._stop_during_start_up)  # pylint: disable=protected-access
      with train._StopRequest():  # pylint: disable=protected-access
        pass
      assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
      if hosts == 1:  # several hosts leave SIGTERM to JAX's preemption service
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  finally:
    for signum, handler in saved.items():
      signal.signal(signum, handler)


def test_nan_params_are_never_checkpointed_and_no_step_none(tiny_mae_config, tmp_path):
  """A learning rate that passes validation but overflows float32 (1e39): an infinite update."""
  config = set_fields(tiny_mae_config, **{'optim.base_lr': 1e39, 'warmup_steps': 0,
                                          'total_steps': 1, 'checkpoint.every_steps': 1})
  with pytest.raises(errors.NonFiniteError) as e:
    train.train(config, str(tmp_path))
  assert 'step None' not in str(e.value)
  assert 'No checkpoint had been saved yet' in str(e.value)
  assert checkpoint_steps(str(tmp_path)) == []


def test_the_preempted_exit_status_is_what_a_sigterm_kill_reports():
  killed = subprocess.Popen(['sleep', '60'])
  killed.terminate()
  assert 128 - killed.wait() == train.PREEMPTED_EXIT_CODE  # Popen reports -15; a shell 143


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_logged_lr_is_the_logged_steps_lr(tmp_path, accum_steps):
  """Logging every 3 steps of 6, warmup 2 then cosine: each logged lr is optax's schedule at the
  logged step's update (not the interval's mean), with or without gradient accumulation (one
  update per step, whatever the micro-batches)."""
  config = load_config('configs/mae.py:runlocal', **dict(tiny_overrides(**TINY_DECODER), **{
      'log.every_steps': 3, 'optim.base_lr': 1e-3, 'optim.lr_base_batch': 16,
      'optim.warmup_init_lr': 0.0, 'optim.min_lr': 0.0, 'optim.accum_steps': accum_steps}))
  train.train(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    logged = {r['step']: r['lr'] for r in map(json.loads, f)}
  # The peak 1e-3 * 16 / 16, warmed up over updates 0..2, then cosine to 0 at update 6.
  schedule = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=1e-3, warmup_steps=2,
                                                decay_steps=6, end_value=0.0)
  # Step 3 applies update 2 (the peak; the interval's mean would be 5e-4), step 6 update 5.
  assert list(logged) == [3, 6]
  np.testing.assert_allclose([logged[3], logged[6]], [schedule(2), schedule(5)], rtol=1e-6)
  np.testing.assert_allclose(logged[6], 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rtol=1e-6)
