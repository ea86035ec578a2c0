"""A user's workflows as the user runs them: install, discover and check a config."""
import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import optax
import pytest

from conftest import ROOT, TINY_DECODER, config_flags, load_config, tiny_overrides
from configs import common
from mimjax import console
from mimjax import recipe_lib
from mimjax import startup
from mimjax import train

_TINY = tiny_overrides(**TINY_DECODER)


def _leaf_keys(tree, prefix=''):
  keys = []
  for key in tree.keys():
    if hasattr(tree[key], 'keys'):
      keys += _leaf_keys(tree[key], f'{prefix}{key}.')
    else:
      keys.append(prefix + key)
  return keys


def _tree(workdir):
  """{relative path: (size, mtime)} of everything under `workdir`."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, workdir)] = (os.path.getsize(path), os.path.getmtime(path))
  return out


def test_print_config_lists_every_field_with_its_value():
  config = load_config('configs/simmim.py:runlocal', **{'batch_size': 48})
  lines = startup.format_config(config).splitlines()
  values = {}
  for line in lines:
    key, _, value = line.partition(' = ')
    values[key] = ast.literal_eval(value)
  assert sorted(values) == sorted(_leaf_keys(common.base_config()))
  assert values['batch_size'] == 48 and values['framework'] == 'simmim'
  assert values['data.name'] == config.data.name and values['mesh.data'] == config.mesh.data
  shown = startup.format_config(config, everything=False).splitlines()
  assert shown[-1] == ('# not read by this run, not shown (--print_all shows them): distill, dtm, '
                       'lut, mae, mto, supervised, tokenprop')
  assert 'simmim.mask_ratio = 0.6' in shown and 'data.name = ' + repr(config.data.name) in shown
  assert not [line for line in shown[:-1] if line.startswith(('mae.', 'distill.', 'lut.'))]
  with config.unlocked():
    config.framework, config.mae.target = 'mae', 'teacher'  # MAE reads the distill teacher's
  assert 'distill.teacher' in startup.format_config(config, everything=False)


def test_shipped_recipe_is_found_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = os.path.join(ROOT, 'configs', 'mae.py')
  for spec in ('configs/mae.py:runlocal', 'mae:runlocal'):
    path, _, arg = startup.resolve_config_path(spec).rpartition(':')
    assert os.path.samefile(path, shipped) and arg == 'runlocal'
  assert os.path.samefile(startup.resolve_config_path('mae'), shipped)
  own = tmp_path / 'mine.py'
  own.write_text('')
  assert startup.resolve_config_path('mine.py:x') == 'mine.py:x'  # a path that exists wins
  assert startup.resolve_config_argv(['p', '--config', 'simmim', '--config.seed=1'])[2] == \
      os.path.join(ROOT, 'configs', 'simmim.py')
  with pytest.raises(SystemExit, match=r'error: no config file .*maee.*mae, mae_lut'):
    startup.resolve_config_path('configs/maee.py')


def test_config_help_names_every_recipe_and_the_override_syntax():
  shipped = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs'))
                   if f.endswith('.py') and f not in ('__init__.py', 'common.py'))
  assert recipe_lib.recipe_names() == shipped
  text = startup.config_help()
  assert '--config.KEY=VALUE' in text
  assert all(f'\n  {name}: ' in text for name in shipped)  # one line per recipe
  assert startup.recipe_arguments('mae') == 'model=B/16, epochs=800, runlocal'
  assert startup.recipe_arguments('mae_mto') == startup.recipe_arguments('mae')  # as it delegates


def test_dry_run_prints_the_summary_and_writes_nothing(tmp_path, capsys):
  config = load_config('configs/mae.py:runlocal', **dict(_TINY, **{'optim.accum_steps': 2}))
  workdir = str(tmp_path / 'run')
  assert train.train(config, workdir, dry_run=True) is None
  assert not os.path.exists(workdir)
  out = capsys.readouterr().out
  # mu/4 encoder on 28 px RGB: patch embedding 4*4*3*32+32, cls 32, one block (2 LayerNorms 2*64,
  # qkv 3*(32*32+32), proj 32*32+32, MLP 32*128+128+128*32+32), final LayerNorm 64; sin-cos
  # positions are not parameters.
  encoder = 4 * 4 * 3 * 32 + 32 + 32 + 2 * 64 + 3 * (32 * 32 + 32) + 32 * 32 + 32 + \
      32 * 128 + 128 + 128 * 32 + 32 + 64
  assert f'encoder {encoder:,}' in out
  assert 'batch: 16 global, 16 per host, 2 accumulation steps of 8' in out
  assert 'steps: 6 (0.19 epochs)' in out  # 6 steps * 16 / 512 examples
  assert 'data: fashion_mnist: train[:512] (512 examples)' in out
  assert "mesh {'data': 1, 'fsdp': 1}" in out and f'workdir: {workdir}' in out
  assert out.strip().endswith('starting fresh')


def test_dry_run_on_a_trained_workdir_says_resuming_and_changes_nothing(trained, capsys):
  config, workdir = trained  # 3 steps, checkpoint 3
  before = _tree(workdir)
  capsys.readouterr()
  with config.unlocked():
    config.total_steps = 9
    config.resume.accept_changes = 'total_steps'  # extending a run is a deliberate change
  train.train(config, workdir, dry_run=True)
  assert 'resuming from step 3' in capsys.readouterr().out
  assert _tree(workdir) == before


def _venv_with_mimjax(tmp_path, editable=False):
  """A fresh venv (system site-packages keep it offline) with mimjax pip-installed from a copy."""
  source = tmp_path / 'src'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', '__pycache__', '.pytest_cache', 'workdirs', 'RESULTS*', 'build', '*.egg-info'))
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-index', '--no-build-isolation',
                  *(['-e'] if editable else []), str(source)], check=True, timeout=600)
  return python, source


def _clean_env():
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  return env


@pytest.mark.slow
def test_pip_install_then_train_from_another_directory(tmp_path):
  python, source = _venv_with_mimjax(tmp_path)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  where = subprocess.run([python, '-c', 'import mimjax, configs; print(mimjax.__file__); '
                          'print(configs.__file__)'], cwd=elsewhere, env=_clean_env(),
                         capture_output=True, text=True, check=True).stdout.split()
  assert all(str(tmp_path / 'venv') in p for p in where)  # the installed copy, not a checkout
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [python, '-m', 'mimjax.train', '--config', 'configs/mae.py:runlocal', '--workdir',
       str(workdir), *config_flags(dict(_TINY, total_steps=3))],
      cwd=elsewhere, env=_clean_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'starting fresh' in result.stdout
  with open(workdir / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]
  assert not os.listdir(elsewhere)
  before = _tree(workdir)
  dry = subprocess.run(
      [python, '-m', 'mimjax.train', '--config', 'mae:runlocal', '--workdir', str(workdir),
       '--dry_run', *config_flags(dict(_TINY, total_steps=6)),
       '--config.resume.accept_changes=total_steps'],  # extending a run is a deliberate change
      cwd=elsewhere, env=_clean_env(), capture_output=True, text=True, timeout=900)
  assert dry.returncode == 0, dry.stderr[-3000:]
  assert 'resuming from step 3' in dry.stdout and _tree(workdir) == before
  shutil.rmtree(source)  # nothing may depend on the source tree after `pip install .`
  printed = subprocess.run([python, '-m', 'mimjax.train', '--config', 'simmim', '--print_config',
                            '--config.batch_size=24'], cwd=elsewhere, env=_clean_env(),
                           capture_output=True, text=True, timeout=600)
  assert printed.returncode == 0, printed.stderr[-3000:]
  assert 'batch_size = 24' in printed.stdout.splitlines()
  assert "framework = 'simmim'" in printed.stdout.splitlines()
  helped = subprocess.run([python, '-m', 'mimjax.train', '--help'], cwd=elsewhere,
                          env=_clean_env(), capture_output=True, text=True, timeout=600)
  assert all(name in helped.stdout for name in ('mae_lut', 'simmim_mto', '--config.KEY=VALUE',
                                                '--print_config', '--dry_run'))
  assert not os.listdir(elsewhere)


@pytest.mark.slow
def test_editable_install_imports_the_source_tree(tmp_path):
  python, source = _venv_with_mimjax(tmp_path, editable=True)
  where = subprocess.run([python, '-c', 'import mimjax, configs.mae; print(mimjax.__file__); '
                          'print(configs.mae.__file__)'], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, check=True).stdout.split()
  assert where == [str(source / 'mimjax' / '__init__.py'), str(source / 'configs' / 'mae.py')]


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_logged_lr_is_the_logged_steps_lr(tmp_path, accum_steps):
  """Logging every 3 steps of 6, warmup 2 then cosine: each logged lr is optax's schedule at the
  logged step's update (not the interval's mean), with or without gradient accumulation (one
  update per step, whatever the micro-batches)."""
  config = load_config('configs/mae.py:runlocal', **dict(_TINY, **{
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


def _console(args, returncode=0):
  """stdout and stderr of `python -m mimjax.<args>` interleaved, as a terminal shows them (the
  user's environment: TensorFlow's log level left unset)."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  done = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=dict(env, PYTHONPATH=ROOT),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  assert done.returncode == returncode, done.stdout[-3000:]
  return done.stdout.splitlines()


def test_help_and_a_short_run_print_what_they_mean_and_no_banner(tmp_path):
  """What a user reads before training starts: `--help` from its first line, and a 3-step runlocal
  (monitor on: it reads the eval split in part) exactly its summary before the first progress
  line; no library banner, no TensorFlow cache warning, no line twice."""
  helped = _console(['mimjax.train', '--help'], returncode=1)  # absl's --help exits with 1
  assert helped[0].startswith('Train any mimjax framework')  # nothing printed before the help
  ran = _console(['mimjax.train', '--config', 'mae:runlocal', '--workdir', str(tmp_path / 'run'),
                  *config_flags(dict(_TINY, total_steps=3, **{
                      'eval.every_steps': 3, 'eval.knn_monitor.bank_examples': 64,
                      'eval.knn_monitor.query_examples': 64, 'eval.knn_monitor.k': 5}))])
  first_step = next(i for i, line in enumerate(ran) if line.startswith('step 1/3'))
  assert [line.split(':')[0] for line in ran[:first_step]] == [
      'framework', 'devices', 'parameters', 'batch', 'steps', 'warning', 'data', 'workdir',
      'starting fresh'], ran[:first_step]
  assert 'warmup_steps=2 is 67% of total_steps=3' in ran[5]
  for output in (helped, ran):
    shown = [line for line in output if line.strip()]
    assert len(shown) == len(set(shown)), output
    assert not [line for line in output if re.search(
        r'absl::InitializeLog|oneDNN|cpu_feature_guard|did not fully read', line)], output


def test_import_banners_are_dropped_and_other_stderr_lines_kept(capfd):
  real = 'W0000 00:00:1796649663.740163    8336 cache.cc:912] a real warning\n'
  with console.stderr_filtered(console.BANNERS):  # what `import tensorflow` writes to fd 2
    os.write(2, (
        'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n'
        'I0000 00:00:1796649663.740163    8336 port.cc:153] oneDNN custom operations are on.\n'
        + real + 'I0000 00:00:1796649663.89    8336 cpu_feature_guard.cc:227] This TensorFlow\n'
        'To enable the following instructions: AVX2 AVX512F, in other operations, rebuild\n'
        'a plain line\n').encode())
  assert capfd.readouterr().err == real + 'a plain line\n'
