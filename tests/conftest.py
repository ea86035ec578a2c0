"""Shared test helpers: tiny configs on the real offline Fashion-MNIST, subprocess runners."""
import atexit
import copy
import importlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

# torch / torchvision (via timm, open_clip) abort the process when imported after TensorFlow
# (their bundled LLVMs clash); loading them first, when installed, makes the order safe.
try:
  import timm  # noqa: F401  pylint: disable=unused-import
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# JAX's persistent compilation cache for this pytest run and every subprocess it starts (they
# inherit the environment): most runs compile the same few tiny-ViT programs, so each is compiled
# once per session. It only skips XLA's compile of an identical program; tracing, and so every
# `_cache_size()` recompilation check, is unaffected (test_harness.py holds that). A fresh
# directory per session unless MIMJAX_TEST_XLA_CACHE names one to keep across runs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = (
      os.environ.get('MIMJAX_TEST_XLA_CACHE') or tempfile.mkdtemp(prefix='mimjax-xla-cache-'))
  if 'MIMJAX_TEST_XLA_CACHE' not in os.environ:
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

# XLA:CPU's LLVM backend at optimisation level 0 for the tests and their subprocesses: the suite's
# programs are tiny ViTs that compile for seconds and run for milliseconds, and level 0 compiles
# them much faster (tests/test_mto.py: 85 -> 55 CPU s). The HLO passes, and so every program's
# meaning, are XLA's default; only the generated machine code is less optimised (and sums may
# round in another order). MIMJAX_TEST_XLA_OPT=default keeps XLA's default level.
if os.environ.get('MIMJAX_TEST_XLA_OPT') != 'default':
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()


def load_config(spec, **overrides):
  """`configs/<name>.py:<arg>` -> unlocked-then-relocked ConfigDict with dotted-key overrides."""
  name, _, arg = spec.partition(':')
  module = importlib.import_module('configs.' + os.path.basename(name).removesuffix('.py'))
  config = module.get_config(arg or None)
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  return config


def tiny_overrides(**extra):
  """A MAE-sized-for-tests run: mu/4 ViT, small batches, a slice of the train split."""
  base = {
      'model.variant': 'mu/4', 'batch_size': 16, 'total_steps': 6, 'warmup_steps': 2,
      'data.train_split': 'train[:512]', 'data.eval_split': 'test[:256]',
      'data.shuffle_buffer': 512, 'checkpoint.every_steps': 3, 'log.every_steps': 1,
      'log.images_every_steps': 0, 'log.progress_bar': False, 'eval.batch_size': 64,
      'eval.linear.train_split': 'train[:512]', 'eval.linear.holdout_split': 'train[512:640]',
      'eval.linear.batch_size': 64, 'eval.linear.epochs': 2,
  }
  base.update(extra)
  return base


TINY_DECODER = {'mae.decoder_width': 32, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2}


@pytest.fixture
def tiny_mae_config():
  return load_config('configs/mae.py:runlocal', **tiny_overrides(**TINY_DECODER))


@pytest.fixture(scope='session')
def tiny_mae_run(tmp_path_factory):
  """One 3-step tiny MAE run (checkpoint at step 3) trained once per session: (config, workdir).
  Read it only; a test that resumes, damages or extends a run takes `trained` (a copy)."""
  from mimjax import train  # pylint: disable=import-outside-toplevel
  config = load_config('configs/mae.py:runlocal', **tiny_overrides(**TINY_DECODER, total_steps=3))
  workdir = str(tmp_path_factory.mktemp('tiny_mae_run') / 'run')
  train.train(config, workdir)
  return config, workdir


@pytest.fixture
def trained(tiny_mae_run, tmp_path):
  """A private copy of `tiny_mae_run` (config, workdir) that the test may change."""
  config, workdir = tiny_mae_run
  shutil.copytree(workdir, tmp_path / 'run')
  return copy.deepcopy(config), str(tmp_path / 'run')


def run_module(args, env=None, timeout=600, input_signal=None):
  """Runs `python -m <args>` from the repo root; returns CompletedProcess with text output."""
  full_env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3', **(env or {}))
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=full_env, timeout=timeout,
                        capture_output=True, text=True)


def config_flags(overrides):
  return [f'--config.{k}={",".join(map(str, v)) if isinstance(v, tuple) else v}'
          for k, v in overrides.items()]


def set_fields(config, **values):
  """Sets dotted keys of `config` (unlocked for the change) in place; returns `config`."""
  with config.unlocked():
    config.update_from_flattened_dict(values)
  return config


def file_tree(workdir):
  """{relative path: (size, mtime)} of everything under `workdir`."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, workdir)] = (os.path.getsize(path), os.path.getmtime(path))
  return out


def checkpoint_steps(workdir):
  """The steps of the checkpoints a workdir holds, as Orbax lists them (sorted)."""
  from mimjax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint_lib.Checkpointer(workdir)
  try:
    return sorted(ckpt.manager.all_steps())
  finally:
    ckpt.close()


def metrics_records(workdir):
  """The records of a workdir's metrics.jsonl, one dict a line."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def one_line_error(e, *parts):
  """The error caught in `e` (pytest.raises) is one line holding every one of `parts`."""
  message = str(e.value)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, message


def damages(target):
  """Ways `target` (a JSON or JSON-lines file of a workdir or checkpoint) is found damaged:
  {name: damage}."""
  def directory():
    os.remove(target)
    os.mkdir(target)
  return {'not JSON': lambda: open(target, 'w').write('{"step": 3, "conf\n{}\n'),
          'a list': lambda: open(target, 'w').write('[1, 2]\n'),
          'invalid UTF-8': lambda: open(target, 'wb').write(b'\xff\xfe{}\n'),
          'a directory': directory}


def restore_file(target, good):
  """Puts `target` back as the bytes `good`, after any of `damages(target)`."""
  if os.path.isdir(target):
    os.rmdir(target)
  open(target, 'wb').write(good)


def free_port():
  """A TCP port on 127.0.0.1 that is free now (for a coordinator or a local server)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


HAS_WANDB = importlib.util.find_spec('wandb') is not None
# The kNN monitor of the `watched` run: bank and query sizes, k.
BANK, QUERIES, K = 256, 128, 5
# A tiny MAE (norm_pix_loss, as the recipe) evaluated by the kNN monitor at steps 3 and 6.
WATCHED = tiny_overrides(**{
    'mae.decoder_width': 32, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2,
    'eval.every_steps': 3, 'eval.knn_monitor.bank_examples': BANK,
    'eval.knn_monitor.query_examples': QUERIES, 'eval.knn_monitor.k': K,
    'log.images_every_steps': 6})


@pytest.fixture(scope='session')
def watched(tmp_path_factory):
  """A trained workdir (W&B on, offline, when wandb is installed) with the kNN monitor's records,
  its grids and W&B files, trained once per session for the monitor, grid, evaluation and W&B
  tests. Read it only; a test that changes it works on a copy."""
  from mimjax import train  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('watched'))
  config = load_config('configs/mae.py:runlocal', **WATCHED, **{'log.wandb': HAS_WANDB})
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('WANDB_MODE', 'offline')
    mp.setenv('WANDB_SILENT', 'true')
    train.train(config, workdir)
  return workdir
