"""Several processes (`mimjax.distributed`): each SLURM task gets a device it can see, a workdir
not shared by every host stops all of them with one error, and process 0 alone prepares an empty
shared data dir while the others wait (slow: two real JAX processes joined over gloo)."""
import os
import subprocess
import sys
import textwrap

from jax._src import clusters
import pytest

from conftest import ROOT
from conftest import free_port
from mimjax import distributed
from mimjax import workdir_io


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


def _two_processes(args_of_process, timeout=300):
  """(returncode, output) of each of two processes running _WORKER with its own args."""
  coordinator = f'127.0.0.1:{free_port()}'
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
