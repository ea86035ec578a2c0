"""Multi-host start-up: `jax.distributed.initialize` from config.distributed or the environment."""
import os

import jax


def initialize(config):
  """Joins the processes of a multi-host run; a no-op for a single process.

  TPU pods and SLURM jobs are detected by JAX itself (config.distributed.num_processes = -1 asks
  for that); elsewhere give coordinator_address, num_processes and process_id explicitly (the
  local multi-process launcher sets them per process).
  """
  d = config.distributed
  if d.num_processes == 0 and 'MIMJAX_NUM_PROCESSES' not in os.environ:
    return
  if d.num_processes == -1:
    jax.distributed.initialize()
    return
  num_processes = int(os.environ.get('MIMJAX_NUM_PROCESSES', d.num_processes))
  process_id = int(os.environ.get('MIMJAX_PROCESS_ID', d.process_id))
  address = os.environ.get('MIMJAX_COORDINATOR', d.coordinator_address)
  if not address or process_id < 0:
    raise ValueError('Multi-process runs need distributed.coordinator_address and '
                     'distributed.process_id (or MIMJAX_COORDINATOR / MIMJAX_PROCESS_ID).')
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)
