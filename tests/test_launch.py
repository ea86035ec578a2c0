"""Launchers: shellcheck-clean, their dry runs print the commands they would run, the Colab
notebook executes end to end (on CPU, with a tiny config), the SLURM script under stand-in srun /
scontrol binds each task to a device it sees and requeues a preempted job, and (slow) Ctrl-C to
the local multi-process launcher checkpoints both trainers at one step and the rerun resumes."""
import copy
import json
import os
import re
import shlex
import signal
import subprocess
import time

from jax._src import clusters
import numpy as np
import pytest

from conftest import ROOT
from conftest import config_flags
from conftest import metrics_records
from conftest import tiny_overrides
from mimjax import checkpoint as checkpoint_lib
from mimjax import distributed
from mimjax import train

SCRIPTS = ['launch/tpu_pod.sh', 'launch/slurm_gpu.sbatch', 'launch/local_multiprocess.sh']
TRAIN = ['--config', 'configs/mae.py:model=B/16', '--workdir', 'gs://bucket/my run']


def _dry_run(script, *args, **env):
  result = subprocess.run(['bash', script, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck_clean(script):
  result = subprocess.run(['shellcheck', '--severity=style', script], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_pod_dry_run_runs_the_trainer_on_all_workers():
  lines = _dry_run('launch/tpu_pod.sh', '--dry-run', 'my-v4-32', 'us-central2-b', *TRAIN)
  assert all(line.startswith('gcloud compute tpus tpu-vm ') for line in lines)
  assert all('--worker=all' in line and '--zone=us-central2-b' in line for line in lines)
  # Undo the printout's quoting, then the remote shell's: the trainer gets the flags unchanged.
  train = shlex.split(lines[-1])
  assert train[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v4-32']
  (command,) = [a.removeprefix('--command=') for a in train if a.startswith('--command=')]
  remote = shlex.split(command)
  assert remote[:3] == ['cd', 'mimjax', '&&']
  # Detached (survives a dropped ssh session), with the Python 3.11 venv's interpreter.
  assert remote[4:7] == ['setsid', 'nohup', '~/mimjax_venv/bin/python']
  start = remote.index('mimjax.train') + 1
  assert remote[start - 2:start] == ['-m', 'mimjax.train']
  assert remote[start:] == TRAIN + ['--config.distributed.num_processes=-1', '>', 'train.log',
                                    '2>&1', '<', '/dev/null', '&']
  (setup,) = [a for a in shlex.split(lines[-2]) if a.startswith('--command=')]
  assert 'uv venv -q --python 3.11 ~/mimjax_venv' in setup  # TPU images ship Python 3.10
  assert len(_dry_run('launch/tpu_pod.sh', 'my-v4-32', 'zone', *TRAIN, DRY_RUN='1',
                      SETUP='0')) == len(lines) - 1  # no pip install


def test_slurm_dry_run_is_one_srun_of_the_trainer():
  (line,) = _dry_run('launch/slurm_gpu.sbatch', *TRAIN, DRY_RUN='1')
  args = shlex.split(line)
  assert args[0] == 'srun'
  start = args.index('mimjax.train') + 1
  assert args[start:] == TRAIN + ['--config.distributed.num_processes=-1']
  with open(os.path.join(ROOT, 'launch/slurm_gpu.sbatch')) as f:
    text = f.read()
  gpus = re.search(r'#SBATCH --gpus-per-node=(\d+)', text).group(1)
  assert f'#SBATCH --ntasks-per-node={gpus}' in text  # one process per GPU


def test_local_multiprocess_dry_run_gives_each_process_its_id():
  lines = _dry_run('launch/local_multiprocess.sh', '--dry-run', '3', *TRAIN)
  assert len(lines) == 3
  coordinators = {re.search(r'MIMJAX_COORDINATOR=(\S+)', line).group(1) for line in lines}
  assert len(coordinators) == 1 and re.fullmatch(r'127\.0\.0\.1:\d+', coordinators.pop())
  for i, line in enumerate(lines):
    args = shlex.split(line)
    assert args[2:4] == ['MIMJAX_NUM_PROCESSES=3', f'MIMJAX_PROCESS_ID={i}']
    assert args[args.index('mimjax.train') + 1:] == TRAIN + ['>', f'./process_{i}.log']
  bad = subprocess.run(['bash', 'launch/local_multiprocess.sh', 'two'], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and 'usage' in bad.stderr


def _doc_commands(path):
  """The commands in the ```bash blocks of a Markdown file (continuations joined, comments
  dropped), each as a list of words."""
  with open(os.path.join(ROOT, path)) as f:
    blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
  lines = '\n'.join(blocks).replace('\\\n', ' ').splitlines()
  return [words for words in map(lambda line: shlex.split(line, comments=True), lines) if words]


# Commands of docs/scale.md that need the network and a cloud project (not run here).
_EXTERNAL = {('tfds', 'build'), ('export', 'TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets'),
             ('gcloud', 'compute')}


def test_every_launcher_command_in_scale_md_dry_runs_with_its_training_flags():
  """Each launcher command of docs/scale.md, as written, succeeds as a dry run and hands the
  trainer its flags unchanged; the rest are the known cloud commands."""
  ran = []
  for words in _doc_commands('docs/scale.md'):
    if words[0] == 'sbatch':  # sbatch OPTIONS SCRIPT FLAGS: the script's own dry run
      script = next(w for w in words if w.startswith('launch/'))
      flags = words[words.index(script) + 1:]
      printed = _dry_run(script, *flags, DRY_RUN='1')
    elif words[0].startswith('launch/'):
      script, flags = words[0], words[1:]
      printed = _dry_run(script, '--dry-run', *flags)
      flags = flags[1:] if script == 'launch/local_multiprocess.sh' else flags[2:]  # N / TPU ZONE
    else:
      assert tuple(words[:2]) in _EXTERNAL, words
      continue
    # The last printed command starts the trainer (for the TPU, inside --command='...').
    trainer = shlex.split(printed[-1])
    if script == 'launch/tpu_pod.sh':
      trainer = shlex.split(trainer[-1].removeprefix('--command='))
    start = trainer.index('mimjax.train') + 1
    assert trainer[start:start + len(flags)] == flags, (words, printed[-1])
    ran.append(script)
  assert sorted(ran) == sorted(SCRIPTS)


@pytest.mark.slow  # executes every notebook cell: a training run and its evaluation
def test_colab_notebook_runs_end_to_end(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('MIMJAX_SKIP_INSTALL', '1')
  monkeypatch.setenv('MIMJAX_COLAB_TINY', '1')
  monkeypatch.setenv('MIMJAX_COLAB_WORKDIR', str(tmp_path))
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '3')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  notebook = nbformat.read(os.path.join(ROOT, 'launch/colab.ipynb'), as_version=4)
  install, configure = notebook.cells[1], notebook.cells[3]
  # Cell by cell, each run twice where a user re-runs it: install, configure, install again.
  notebook.cells[4:4] = [nbformat.from_dict(dict(copy.deepcopy(c), id=f'{c.id}-again'))
                         for c in (install, configure)]
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  for cell in (install, notebook.cells[4]):
    printed = ''.join(o.get('text', '') for o in cell.outputs)
    # CPU runtime, CPU JAX; TensorFlow is installed here (as on Colab), so tensorflow-cpu is not.
    assert printed.startswith('runtime: cpu; JAX: jax==0.10.2; requirements: ')
    assert 'tensorflow-cpu' not in printed and 'tensorflow-datasets==' in printed
  assert any('image/png' in o.get('data', {}) for o in notebook.cells[-1].outputs)
  with open(tmp_path / 'eval_knn.json') as f:
    (result,) = json.load(f)['results']
  assert result['step'] == 4 and result['test_examples'] == 128
  assert 0.0 <= result['top1'] <= 1.0 and 0.0 <= result['random_init']['top1'] <= 1.0


def test_slurm_gpu_settings_are_flags_this_jaxlib_knows():
  """The launcher's GPU settings block, evaluated, starts JAX: XLA aborts on an unknown flag."""
  with open(os.path.join(ROOT, 'launch/slurm_gpu.sbatch')) as f:
    text = f.read()
  caller = '--xla_gpu_enable_latency_hiding_scheduler=false'
  block = re.search(r'# --- BEGIN GPU runtime settings.*?# --- END GPU runtime settings',
                    text, re.S).group(0)
  probe = ('import os, jax; jax.numpy.ones(2).block_until_ready(); '
           'print(os.environ["XLA_FLAGS"]); print(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])')
  result = subprocess.run(['bash', '-c', f'set -eu\n{block}\nexec python3 -c \'{probe}\''],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, XLA_FLAGS=caller))
  assert result.returncode == 0, result.stderr[-2000:]
  flags, fraction = result.stdout.split('\n')[:2]
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags
  assert flags.endswith(caller)  # the caller's flags come last, so they win
  assert fraction == '0.9'


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
    while not (stopped / 'metrics.jsonl').exists() or len(metrics_records(stopped)) < 3:
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
  a, b = metrics_records(tmp_path / 'straight'), metrics_records(stopped)
  assert [r['step'] for r in b] == [r['step'] for r in a] == list(range(1, 41))
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6)
