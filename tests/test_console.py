"""console: what a user reads in the terminal. `--help` and a short run print their meaning and no
library banner or cache warning, and the filter of TensorFlow's import banners keeps every other
stderr line."""
import os
import re
import subprocess
import sys

from conftest import ROOT, TINY_DECODER, config_flags, tiny_overrides
from mimjax import console

_TINY = tiny_overrides(**TINY_DECODER)


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
