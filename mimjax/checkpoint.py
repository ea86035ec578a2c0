"""Orbax checkpoints of the train state plus a JSON record of the run (data position, model).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when the
write has finished), so a crash or Ctrl-C mid-save leaves the previous checkpoint intact. Restores
take target shardings, so a run can resume on a different mesh or device count.
"""
import jax
import numpy as np
import orbax.checkpoint as ocp

from mimjax import errors
from mimjax import optim
from mimjax import workdir_io



def param_shapes(params):
  """{'encoder/embedding/kernel': [4, 4, 3, 128], ...} for comparing architectures."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {optim.path_str(path): list(np.shape(leaf)) for path, leaf in flat}


class Checkpointer:
  """Keeps the last `keep` checkpoints under WORKDIR/checkpoints/<step>/{state,meta}."""

  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = workdir_io.path(workdir, 'checkpoints')  # a gs:// URL stays a URL
    # create=False: opening a workdir to read it never creates anything; the first save makes
    # checkpoints/ inside the (existing) workdir.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self):
    return self.manager.latest_step()

  def read_meta(self, step):
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
      raise errors.CheckpointError(
          f'Checkpoint {step} in {self.directory} cannot be read ({type(e).__name__}: {e}). '
          f'If it is damaged, move {self.directory / str(step)} away to resume from '
          'the one before, or start in a new --workdir.') from e
    return restored['meta']

  def check_compatible(self, step, params_abstract, framework):
    """Raises CheckpointError when checkpoint `step` holds a different model."""
    meta = self.read_meta(step)
    saved = meta.get('param_shapes', {})
    current = param_shapes(params_abstract)
    if meta.get('framework') != framework or saved != current:
      missing = sorted(set(current) - set(saved))[:3]
      extra = sorted(set(saved) - set(current))[:3]
      changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])[:3]
      details = '; '.join(filter(None, [
          f'framework {meta.get("framework")!r} vs {framework!r}'
          if meta.get('framework') != framework else '',
          f'params only in this config: {missing}' if missing else '',
          f'params only in the checkpoint: {extra}' if extra else '',
          'different shapes: ' + ', '.join(f'{k} {saved[k]} vs {current[k]}' for k in changed)
          if changed else '']))
      raise errors.CheckpointError(
          f'The workdir holds a checkpoint (step {step}) of a different model than this config '
          f'({details}). Use a new --workdir, or the config that wrote {self.directory}.')
    return meta

  def save(self, step, state, meta):
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

  def restore(self, step, abstract_state):
    """Restores the state at `step` onto the shardings carried by `abstract_state`."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise errors.CheckpointError(
          f'Checkpoint {step} in {self.directory} cannot be restored ({type(e).__name__}: {e}). '
          f'If it is damaged, move {self.directory / str(step)} away to resume from '
          'the one before, or start in a new --workdir.') from e
    return restored['state']

  def restore_params(self, step):
    """Only `params` of the state at `step`, as host numpy arrays (no mesh, no model needed).

    For export and for starting new runs from a checkpoint's weights.
    """
    path = self.directory / str(step) / 'state'
    try:
      checkpointer = ocp.PyTreeCheckpointer()
      saved = checkpointer.metadata(path).item_metadata['params']
      item = {'params': jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), saved)}
      restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                            item)
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:
      raise errors.CheckpointError(f'The params of checkpoint {step} in {self.directory} cannot be read '
                                   f'({type(e).__name__}: {e}).') from e
    return restored['params']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def restore_params(workdir, step=None):
  """Trained params of the checkpoint at `step` (default: latest) in `workdir`, as numpy."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise errors.CheckpointError(f'No checkpoint in {ckpt.directory}; train into {workdir} first.')
    return ckpt.restore_params(step)
  finally:
    ckpt.close()
