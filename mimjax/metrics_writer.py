"""Training observability: WORKDIR/metrics.jsonl, TensorBoard events, a terminal progress line and,
with config.log.wandb, a Weights & Biases run.

Only process 0 writes. Values arrive as host scalars at log steps, never inside the train step.
"""
import contextlib
import hashlib
import json
import math
import os
import sys
import time

import jax
import tensorflow as tf
import tqdm

from mimjax import errors
from mimjax import workdir_io


def read_history(workdir, step):
  """The records of WORKDIR/metrics.jsonl up to `step` (the checkpoint a run resumes from), what
  an interrupted run logged after it forgotten. The trainer reads this before it writes anything,
  so a damaged file is one CheckpointError that leaves the workdir as it was."""
  path = workdir_io.path(workdir, 'metrics.jsonl')
  if not path.exists():
    if step:
      print(f'warning: {path} is missing, so the metrics logged before step {step} are lost; '
            f'this run logs from step {step} on.', file=sys.stderr, flush=True)
    return []
  records = workdir_io.read_jsonl(path)
  for i, record in enumerate(records):
    if not isinstance(record, dict) or not isinstance(record.get('step'), int):
      raise errors.CheckpointError(
          f'Record {i + 1} of {path} has no integer "step" ({json.dumps(record)[:80]}); fix or '
          'delete that line (or move the file away, losing the history) to resume.')
  return [r for r in records if r['step'] <= step]


class WandbRun:
  """The Weights & Biases run of a workdir (the optional `wandb` extra; WANDB_MODE=offline keeps it
  on disk). Its id is derived from the workdir, so a resumed training run continues the same W&B
  run; local workdirs keep W&B's files in WORKDIR/wandb."""

  def __init__(self, config, workdir):
    import wandb  # pylint: disable=g-import-not-at-top
    self.wandb = wandb
    url = workdir_io.is_url(workdir)
    where = workdir if url else os.path.abspath(workdir)
    self.run = wandb.init(
        project=config.log.wandb_project, name=os.path.basename(where.rstrip('/')),
        id=hashlib.sha256(where.encode()).hexdigest()[:16], resume='allow',
        dir=None if url else where, config=config.to_dict())

  def log(self, step, scalars):
    self.run.log(scalars, step=int(step))

  def log_image(self, name, step, image):
    self.run.log({name: self.wandb.Image(image)}, step=int(step))

  def finish(self):
    self.run.finish()


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard (unless
  `config.log.tensorboard` is False) and to W&B (when `config.log.wandb`)."""

  def __init__(self, workdir, total_steps, start_step, progress_bar=True, config=None,
               history=None):
    """`history`: `read_history(workdir, start_step)` when the caller has read it already. The
    file is replaced atomically by it, so a crash during this rewrite keeps the whole history."""
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.start_step = start_step
    self.start_time = time.time()
    self.bar = None
    self.wandb = None
    self.failed = False  # a write failed and was reported; `close` then adds no second error
    if not self.active:
      return
    self.workdir = workdir
    path = workdir_io.path(workdir, 'metrics.jsonl')
    kept = read_history(workdir, start_step) if history is None else history
    if kept or path.exists():
      workdir_io.write_atomic(path, ''.join(json.dumps(r) + '\n' for r in kept))
    self.jsonl = workdir_io.JsonLines(path, kept)
    self.tb = (tf.summary.create_file_writer(str(workdir_io.path(workdir, 'tensorboard')))
               if config is None or config.log.tensorboard else None)
    if progress_bar and sys.stderr.isatty():
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)
    if config is not None and config.log.wandb:
      self.wandb = WandbRun(config, workdir)

  @contextlib.contextmanager
  def _writing(self, target, step=None):
    """A failed write of `target` (a full disk, a read-only mount, a lost bucket) as one
    CheckpointError naming the cause first; the checkpoints are written apart and stay."""
    try:
      yield
    except (OSError, tf.errors.OpError) as e:
      self.failed = True
      at = '' if step is None else f' at step {step}'
      raise errors.CheckpointError(
          f'Writing {target}{at} failed ({errors.reason(e)}); training stopped. The checkpoints '
          'are written apart from the logs and are intact: fix the cause (e.g. free disk space) '
          'and re-run the same command to resume from the last complete checkpoint.') from e

  def write(self, step, scalars):
    if not self.active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    with self._writing(self.jsonl.target, step):
      self.jsonl.append(record)
    if self.tb is not None:
      with self._writing(workdir_io.path(self.workdir, 'tensorboard'), step):
        with self.tb.as_default(step=int(step)):
          for key, value in record.items():
            if key != 'step' and math.isfinite(value):
              tf.summary.scalar(key, value)
        self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(step, {k: v for k, v in record.items() if k != 'step'})
    self._progress(step, record)

  def _progress(self, step, record):
    loss, speed = record.get('loss', float('nan')), record.get('images_per_sec', 0)
    shown = f'loss {loss:.4f}  {speed:.0f} img/s'
    evaluated = '  '.join(f'{k} {v:.4f}' for k, v in record.items() if k.startswith('eval_'))
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix_str(shown, refresh=True)
      if evaluated:
        self.bar.write(f'step {step}: {evaluated}')
      return
    done = step - self.start_step
    elapsed = time.time() - self.start_time
    eta = elapsed / max(done, 1) * (self.total_steps - step)
    print(f'step {step}/{self.total_steps}  {shown}  ETA {eta / 60:.1f} min'
          + (f'  {evaluated}' if evaluated else ''), flush=True)

  def write_image(self, name, step, image):
    """Saves a uint8 [H, W, 3] image as WORKDIR/images/<name>_<step>.png and to TensorBoard."""
    if not self.active:
      return None
    from PIL import Image  # pylint: disable=g-import-not-at-top
    directory = workdir_io.path(self.workdir, 'images')
    path = directory / f'{name}_{step:07d}.png'
    with self._writing(path, step):
      directory.mkdir(parents=True, exist_ok=True)
      with path.open('wb') as f:
        Image.fromarray(image).save(f, format='PNG')
    if self.tb is not None:
      with self._writing(workdir_io.path(self.workdir, 'tensorboard'), step):
        with self.tb.as_default(step=int(step)):
          tf.summary.image(name, image[None], step=int(step))
    if self.wandb is not None:
      self.wandb.log_image(name, step, image)
    return str(path)

  def close(self):
    """Closes the outputs. After a reported failed write, closing (which flushes what that write
    left buffered) fails the same way: those errors are dropped, the first one stands."""
    if not self.active:
      return
    if self.bar is not None:
      self.bar.close()
    failed_before = self.failed
    closes = [(self.jsonl.target, self.jsonl.close)]
    if self.tb is not None:
      closes.append((workdir_io.path(self.workdir, 'tensorboard'), self.tb.close))
    for target, close in closes:
      try:
        with self._writing(target):
          close()
      except errors.CheckpointError:
        if not failed_before:
          raise
    if self.wandb is not None:
      self.wandb.finish()
