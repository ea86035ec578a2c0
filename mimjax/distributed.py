"""Multi-host start-up: `jax.distributed.initialize` from config.distributed or the environment,
and the start-up checks that every host sees the same workdir."""
import itertools
import os

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mimjax import errors
from mimjax import workdir_io


def slurm_local_device_ids(environ=None):
  """[0] for a SLURM task bound to one GPU (srun --gpu-bind=single:1), else None (JAX's default).

  JAX's SLURM detection picks the CUDA ordinal SLURM_LOCALID, which only exists when a task sees
  every GPU of its node; a task bound to one GPU sees it as ordinal 0.
  """
  environ = os.environ if environ is None else environ
  visible = [d for d in environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if 'SLURM_JOB_ID' in environ and 'SLURM_LOCALID' in environ and len(visible) == 1:
    return [0]
  return None


def check_config(config):
  """The `config.distributed` fields: process counts and ids are -1 (detect), 0 or positive."""
  d = config.distributed
  errors.require(d.num_processes >= -1, 'distributed.num_processes', d.num_processes,
                 'use 0 (one process), -1 (detect: TPU pod, SLURM) or the number of processes')
  errors.require(d.process_id >= -1, 'distributed.process_id', d.process_id,
                 "use this process's index, or -1 to take it from the environment")


def initialize(config):
  """Joins the processes of a multi-host run; a no-op for a single process.

  TPU pods and SLURM jobs are detected by JAX itself (config.distributed.num_processes = -1 asks
  for that); elsewhere give coordinator_address, num_processes and process_id explicitly (the
  local multi-process launcher sets them per process).
  """
  check_config(config)
  d = config.distributed
  if d.num_processes == 0 and 'MIMJAX_NUM_PROCESSES' not in os.environ:
    return
  if d.num_processes == -1:
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids())
    return
  num_processes = int(os.environ.get('MIMJAX_NUM_PROCESSES', d.num_processes))
  process_id = int(os.environ.get('MIMJAX_PROCESS_ID', d.process_id))
  address = os.environ.get('MIMJAX_COORDINATOR', d.coordinator_address)
  if not address or process_id < 0:
    raise errors.ConfigError('Multi-process runs need distributed.coordinator_address and '
                     'distributed.process_id (or MIMJAX_COORDINATOR / MIMJAX_PROCESS_ID).')
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)


def check_same_on_all_hosts(value, message):
  """ConfigError on every host unless all hosts pass the same int `value`; `message` may name
  the values seen with {values}. A no-op for one process."""
  if jax.process_count() == 1:
    return
  values = [int(v) for v in multihost_utils.process_allgather(np.int32(value))]
  if len(set(values)) > 1:
    raise errors.ConfigError(message.format(values=values))


def claim_workdir(workdir):
  """Creates the workdir and takes its lock on process 0; the other hosts must read the lock back.

  A workdir that is not shared (a local path on a pod) stops every host here with one error
  instead of hanging at the first checkpoint. Returns the lock (held by process 0 only).
  """
  lock = workdir_io.WorkdirLock(workdir)
  error, nonce = None, 0
  if jax.process_index() == 0:
    try:
      workdir_io.path(workdir).mkdir(parents=True, exist_ok=True)
      nonce = lock.acquire()['nonce']
    except errors.MimjaxError as e:
      error = e
  if jax.process_count() == 1:
    if error:
      raise error
    return lock
  nonce = int(multihost_utils.broadcast_one_to_all(np.int32(nonce)))
  if error:
    raise error
  if not nonce:
    raise errors.CheckpointError('Process 0 could not take the workdir; its log says why.')
  holder = workdir_io.read_holder(lock.file)
  sees = int(bool(holder) and holder.get('nonce') == nonce)
  seen = [int(v) for v in multihost_utils.process_allgather(np.int32(sees))]
  if not all(seen):
    lock.release()
    blind = [i for i, v in enumerate(seen) if not v]
    raise errors.ConfigError(
        f'Processes {blind} do not see {lock.file}, which process 0 just wrote: --workdir '
        f'{workdir} is not one directory shared by every host. Use a gs:// bucket or a shared '
        'filesystem.')
  return lock


# Preparing a large dataset takes hours; the others wait that long at the barrier.
_PROCESS_0_FIRST_TIMEOUT_S = 12 * 3600
_barriers = itertools.count()


def process_0_first(fn):
  """fn() on process 0, then on the other processes once it has returned there (e.g. preparing a
  dataset in a shared directory exactly once); a MimjaxError on process 0 stops every host.

  The wait is a coordination-service barrier: a collective (gloo, NCCL) times out in seconds.
  """
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except errors.MimjaxError as e:
      error = e
  ocp.multihost.sync_global_processes(f'mimjax_process_0_first_{next(_barriers)}',
                                      timeout=_PROCESS_0_FIRST_TIMEOUT_S)
  failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
  if error:
    raise error
  if failed:
    raise errors.DatasetError('Process 0 could not prepare the dataset; its log says why.')
  return result if jax.process_index() == 0 else fn()
