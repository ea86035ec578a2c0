"""The one-command accelerator check (`benchmarks/device_check.sh`): its tiny CPU setting end to
end, and the TensorFlow-free benchmark path. Timings are never asserted."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mimjax.bench import cli
from mimjax.bench import device_check


@pytest.fixture
def no_tensorflow(tmp_path):
  """A PYTHONPATH entry whose `tensorflow` package fails to import, as on a TF-free GPU host."""
  fake = tmp_path / 'blocked' / 'tensorflow'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text('raise ImportError("TensorFlow is blocked in this test")\n')
  return str(tmp_path / 'blocked')


def test_benchmark_path_builds_every_case_without_tensorflow(no_tensorflow):
  probe = ('from mimjax.bench import device_check, runner, torch_peer\n'
           'from mimjax import registry\n'
           'for c in runner.CASES:\n'
           '  registry.build(runner.load_config(c.config, "mu/4", 28, 8, "small", "bfloat16"))\n'
           '  runner.synthetic_batch(runner.load_config(c.config, "mu/4", 28, 8, "small", '
           '"bfloat16"))\n')
  result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=f'{no_tensorflow}:{ROOT}'),
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize('argv, message', [
    (['--parts', 'models,speed'], "--parts ['speed']: choose from"),
    (['--set', 'modelz=B/16'], "--set 'modelz' is not a setting"),
    (['--set', 'max_batch=many'], 'max_batch takes a value of type int'),
])
def test_bad_arguments_fail_with_one_line_before_writing(argv, message, tmp_path):
  out = tmp_path / 'check'
  result = subprocess.run([sys.executable, '-m', 'mimjax.bench.device_check', '--out_dir',
                           str(out), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 1
  [line] = result.stderr.strip().splitlines()
  assert line.startswith('error: ') and message in line, line
  assert not out.exists()


def test_set_overrides_are_typed_like_the_settings():
  args = cli.parse(device_check.define_flags, ['--tiny', '--set', 'models=L/16;max_batch=512'])
  assert args.tiny and args.parts == list(device_check.PARTS)
  assert device_check.overrides(args.set) == {'models': 'L/16', 'max_batch': 512}


@pytest.mark.slow  # three subprocesses, ~10 compiles of mu/4 and a torch worker: minutes on 2 cores
def test_tiny_check_end_to_end(tmp_path, no_tensorflow):
  out = tmp_path / 'check'
  # Generous part limits: on the shared 2-core machine one part took 400-600+ s under load. The
  # whole run may use every part's limit, so the test's own limit is their sum plus a margin.
  part_limit_s = 1200
  result = subprocess.run(['bash', 'benchmarks/device_check.sh', str(out), '--tiny',
                           f'--part_timeout_s={part_limit_s}'], cwd=ROOT,
                          capture_output=True, text=True, check=False,
                          timeout=len(device_check.PARTS) * part_limit_s + 300,
                          env=dict(os.environ, PYTHONPATH=no_tensorflow))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  results = json.loads((out / 'device_check.json').read_text())
  parts = results['parts']
  assert list(parts) == list(device_check.PARTS)
  assert not any(p['tensorflow_imported'] for p in parts.values())
  (model,) = parts['models']['result']
  assert (model['model'], model['batch']) == ('mu/4', device_check.TINY['max_batch'])
  cases = {c['name']: c for c in parts['plugins']['result']['cases']}
  assert set(device_check.TINY['plugin_cases'].split(',')) <= set(cases)
  assert cases['distill+dtm']['overhead']['host'] == 'distill'
  assert [p['status'] for p in parts['plugins']['result']['peer']] == ['ok']
  losses = parts['precision']['result']['losses']
  assert len(losses['float32']) == len(losses['bfloat16']) == device_check.TINY['precision_steps']
  assert all(math.isfinite(x) for x in losses['float32'] + losses['bfloat16'])
  text = (out / 'device_check.md').read_text()
  assert '| MAE mu/4 | 8 |' in text and 'PyTorch peer' in text and 'bfloat16 |' in text
