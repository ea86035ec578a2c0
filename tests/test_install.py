"""pip install: mimjax and its recipes installed into a fresh virtual environment train, resume
and answer `--print_config` / `--help` from another directory, with no source tree; an editable
install imports the source tree."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_DECODER, config_flags, file_tree, tiny_overrides

_TINY = tiny_overrides(**TINY_DECODER)


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
  before = file_tree(workdir)
  dry = subprocess.run(
      [python, '-m', 'mimjax.train', '--config', 'mae:runlocal', '--workdir', str(workdir),
       '--dry_run', *config_flags(dict(_TINY, total_steps=6)),
       '--config.resume.accept_changes=total_steps'],  # extending a run is a deliberate change
      cwd=elsewhere, env=_clean_env(), capture_output=True, text=True, timeout=900)
  assert dry.returncode == 0, dry.stderr[-3000:]
  assert 'resuming from step 3' in dry.stdout and file_tree(workdir) == before
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
