"""Orbax checkpoints of the train state plus a JSON record of the run (data position, model).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when the
write has finished), so a crash or Ctrl-C mid-save leaves the previous checkpoint intact. Every
save's outcome is checked (a failed one stops the run with one message); a finalised save gets
SHA-256 checksums of its files, verified before the checkpoint is read again. Restores take target
shardings, so a run can resume on a different mesh or device count.
"""
import hashlib
import json
import logging
import os
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from mimjax import console
from mimjax import errors
from mimjax import train_step
from mimjax import tree_util
from mimjax import workdir_io

CHECKSUMS = 'checksums.json'


def _files(directory, prefix=''):
  """(relative path, epath) of every file under `directory`, listed name by name: epath's fsspec
  backend (gcsfs) yields `walk` roots without their gs://, which no longer lie under `directory`."""
  for child in directory.iterdir():
    if child.is_dir():
      yield from _files(child, f'{prefix}{child.name}/')
    else:
      yield f'{prefix}{child.name}', child


def _digests(directory):
  """{relative path: sha256 hex} of every file under `directory` (an epath) but the checksum
  file."""
  digests = {}
  for rel, path in _files(directory):
    if rel == CHECKSUMS:
      continue
    sha = hashlib.sha256()
    with path.open('rb') as f:
      for chunk in iter(lambda: f.read(1 << 22), b''):  # pylint: disable=cell-var-from-loop
        sha.update(chunk)
    digests[rel] = sha.hexdigest()
  return digests


def _damage(directory):
  """Why a checkpoint does not verify against its checksums, or None when it does. A missing or
  unreadable checksum file counts as damage: such a checkpoint cannot be verified (a crash between
  Orbax's rename and the checksum write, a file deleted or overwritten since)."""
  path = directory / CHECKSUMS
  try:
    expected = json.loads(path.read_text())
  except FileNotFoundError:
    return f'{CHECKSUMS} is missing, so its files cannot be verified'
  except (OSError, ValueError):  # a directory, invalid UTF-8, not JSON
    expected = None
  if not isinstance(expected, dict):
    return f'{CHECKSUMS} is not the checksum record mimjax writes, so its files cannot be verified'
  actual = _digests(directory)
  damaged = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
  if not damaged:
    return None
  shown = ', '.join(damaged[:3]) + (f' and {len(damaged) - 3} more' * (len(damaged) > 3))
  return f'{shown} no longer match the checksums written when it was saved'


def check_config(config):
  """The `config.checkpoint` fields: a save cadence and a number of checkpoints to keep."""
  c = config.checkpoint
  errors.require(c.every_steps >= 1, 'checkpoint.every_steps', c.every_steps,
                 'use a positive number of steps (the last step is always saved)')
  errors.require(c.keep >= 1, 'checkpoint.keep', c.keep,
                 'keep at least 1 checkpoint (a run must be able to resume)')


class _WithoutOrbax(logging.Filter):
  """Drops the log records of Orbax's own modules, and asyncio's "Task exception was never
  retrieved" about Orbax's write coroutines (logged when a failed save's tasks are collected)."""

  def filter(self, record):
    orbax = f'{os.sep}orbax{os.sep}'
    return orbax not in record.pathname and orbax not in record.getMessage()


def quiet_orbax_logs():
  """Silences Orbax's logging (a failed save logs every background thread's traceback, hundreds
  of lines); mimjax reports each checkpoint failure itself, as one line naming the cause."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_WithoutOrbax())


def param_shapes(params):
  """{'encoder/embedding/kernel': [4, 4, 3, 128], ...} for comparing architectures."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tree_util.path_str(path): list(np.shape(leaf)) for path, leaf in flat}


class Checkpointer:
  """Keeps the last `keep` checkpoints under WORKDIR/checkpoints/<step>/{state,meta}."""

  def __init__(self, workdir, keep=3, async_save=True):
    workdir_io.check_reachable(workdir)  # an offline store: one message, not Orbax's traceback
    self.directory = workdir_io.path(workdir, 'checkpoints')  # a gs:// URL stays a URL
    # create=False: opening a workdir to read it never creates anything; the first save makes
    # checkpoints/ inside the (existing) workdir.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))
    self.async_save = async_save
    self._pending = None  # the step whose (async) save has not been checked yet
    self.last_saved = self.manager.latest_step()  # the newest complete, checksummed save
    self._verified = set()  # steps checked (or warned about) once already

  def latest_step(self):
    return self.manager.latest_step()

  def _step_dir(self, step):
    return self.directory / str(step)

  def resolve_step(self, step=None):
    """`step` (default: the latest) when this workdir holds it; CheckpointError otherwise."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise errors.CheckpointError(f'No checkpoint in {self.directory}; train first.')
    self.check_exists(step)
    return int(step)

  def check_exists(self, step):
    """Raises CheckpointError naming the steps that exist when there is no checkpoint `step`."""
    steps = sorted(self.manager.all_steps())
    if step not in steps:
      raise errors.CheckpointError(
          f'There is no checkpoint {step} in {self.directory}; it holds '
          f'{"steps " + ", ".join(map(str, steps)) if steps else "no checkpoints"}.')

  def verify(self, step):
    """Checks checkpoint `step` against the checksums written when its save was finalised.

    A damaged checkpoint, or one whose checksums are missing or unreadable, raises CheckpointError
    naming the cause and the newest earlier checkpoint that verifies: it is never read unverified.
    """
    if step in self._verified:
      return
    self.check_exists(step)
    damage = _damage(self._step_dir(step))
    if damage is None:
      self._verified.add(step)
      return
    earlier = [s for s in sorted(self.manager.all_steps(), reverse=True)
               if s < step and _damage(self._step_dir(s)) is None]
    path = self._step_dir(step)
    fix = (f'Checkpoint {earlier[0]} verifies: move the damaged one away (mv {path} '
           f'{path}.damaged) and re-run to resume from step {earlier[0]}'
           if earlier else 'No earlier checkpoint verifies; start again in a new --workdir')
    raise errors.CheckpointError(
        f'Checkpoint {step} in {self.directory} is damaged: {damage}. {fix}.')

  def read_meta(self, step):
    self.check_exists(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
      raise errors.CheckpointError(
          f'Checkpoint {step} in {self.directory} cannot be read ({errors.reason(e)}). '
          f'If it is damaged, move {self._step_dir(step)} away to resume from '
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
    """Starts saving `state` at `step`, after checking the previous save's outcome."""
    self._settle()
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    if not self.async_save:
      self._settle()

  def poll(self):
    """Checks a finished background save at once (cheap; call every step): a failure stops the
    run at the step where it is seen, not at the next save or at exit."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._settle()

  def _settle(self):
    """Waits for the pending save; raises CheckpointError if it failed, else checksums it."""
    if self._pending is None:
      return
    step = self._pending
    try:
      self.manager.wait_until_finished()
      if not (self._step_dir(step) / 'state').is_dir():
        raise OSError(f'Orbax did not finalise {self._step_dir(step)}')
      if jax.process_index() == 0:
        workdir_io.write_atomic(self._step_dir(step) / CHECKSUMS,
                                json.dumps(_digests(self._step_dir(step)), indent=1,
                                           sort_keys=True))
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    self._pending, self.last_saved = None, step

  def _fail(self, e):
    """Raises the one message of a failed save, after removing what it left: Orbax's temporary
    directory (it holds the space a full disk needs) and a step Orbax renamed into place but
    that never got its checksums (it could not be verified, so it would block the resume)."""
    step, self._pending = self._pending, None
    if step is not None and jax.process_index() == 0:
      # A failed commit leaves its sibling writers running; they would refill the directory.
      for thread in threading.enumerate():
        if type(thread).__module__.startswith('orbax') and thread is not threading.current_thread():
          thread.join(timeout=60)
      leftovers = list(self.directory.glob(f'{step}.orbax-checkpoint-tmp*'))
      if (self._step_dir(step)).exists() and not (self._step_dir(step) / CHECKSUMS).exists():
        leftovers.append(self._step_dir(step))
      for leftover in leftovers:
        try:
          leftover.rmtree()
        except OSError:
          pass  # the message below still names the cause; the rerun ignores a tmp directory
    kept = (f'the last complete checkpoint is step {self.last_saved}'
            if self.last_saved is not None else 'no checkpoint was completed')
    raise errors.CheckpointError(
        f'Saving checkpoint {step} to {self.directory} failed ({errors.reason(e)}); training '
        f'stopped and {kept}. Fix the cause (e.g. free disk space) and re-run the same command '
        'to resume.') from e

  def restore(self, step, abstract_state):
    """Restores the state at `step` onto the shardings carried by `abstract_state`."""
    self.verify(step)
    # A float16 state (see train_step.LossScale) from a checkpoint written without a loss scale
    # (an older mimjax): the rest restores, and the scale starts at its initial value.
    loss_scale = getattr(abstract_state, 'loss_scale', None)
    fresh_scale = loss_scale is not None and not self.restore_host(step, 'loss_scale')
    if fresh_scale:
      abstract_state = abstract_state.replace(loss_scale=None)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))['state']
      if fresh_scale:
        state = state.replace(loss_scale=jax.tree_util.tree_map(
            lambda a, v: jax.device_put(v, a.sharding), loss_scale,
            train_step.LossScale.create()))
      return state
    except Exception as e:
      raise errors.CheckpointError(
          f'Checkpoint {step} in {self.directory} cannot be restored ({errors.reason(e)}). '
          f'If it is damaged, move {self._step_dir(step)} away to resume from '
          'the one before, or start in a new --workdir.') from e

  # Orbax looks for the step's _CHECKPOINT_METADATA in the item directory read here and warns that
  # it is missing: it lives one level up, and the item's own metadata is what is read.
  @console.without_log_messages('Metadata file does not exist')
  def restore_host(self, step, item):
    """One top-level `item` of the state at `step` ('params', 'model_state') as numpy arrays;
    {} when the state holds none (e.g. a run without non-trained state)."""
    self.verify(step)
    path = self._step_dir(step) / 'state'
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
                                   f'be read ({errors.reason(e)}).') from e
    return restored[item]

  def wait(self):
    self._settle()

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
