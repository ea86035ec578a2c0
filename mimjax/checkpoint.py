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

  def resolve_step(self, step=None):
    """`step` (default: the latest) when this workdir holds it; CheckpointError otherwise."""
    steps = sorted(self.manager.all_steps())
    step = self.latest_step() if step is None else step
    if step is None or step not in steps:
      raise errors.CheckpointError(
          f'No checkpoint {"" if step is None else step} in {self.directory}; steps there: '
          f'{steps}. Train first, or pass one of them as --step.')
    return int(step)

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
    return self.restore_host(step, 'params')

  def restore_host(self, step, item):
    """One top-level `item` of the state at `step` ('params', 'model_state') as numpy arrays;
    {} when the state holds none (e.g. a run without non-trained state)."""
    path = self.directory / str(step) / 'state'
    try:
      checkpointer = ocp.PyTreeCheckpointer()
      saved = checkpointer.metadata(path).item_metadata.get(item)
      if not saved:
        return {}
      target = {item: jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), saved)}
      restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                            target)
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:
      raise errors.CheckpointError(f'The {item} of checkpoint {step} in {self.directory} cannot '
                                   f'be read ({type(e).__name__}: {e}).') from e
    return restored[item]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def restore(workdir, step=None, item='params'):
  """(`item` of the train state as host numpy arrays, step) of checkpoint `step` (default: the
  latest) in `workdir`; `item` is 'params' or 'model_state', optimizer state is never read."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.resolve_step(step)
    return ckpt.restore_host(step, item), step
  finally:
    ckpt.close()


def restore_params(workdir, step=None):
  """Trained params of the checkpoint at `step` (default: latest) in `workdir`, as numpy."""
  return restore(workdir, step)[0]
