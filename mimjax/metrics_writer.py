"""Training observability: WORKDIR/metrics.jsonl, TensorBoard events and a terminal progress line.

Only process 0 writes. Values arrive as host scalars at log steps, never inside the train step.
"""
import json
import math
import sys
import time

import jax
import tensorflow as tf
import tqdm

from mimjax import workdir_io


def _drop_records_after(path, step):
  """On resume, forget what an interrupted run logged after its last checkpoint; returns the
  records kept.

  The file is replaced atomically, so a crash during this rewrite keeps the whole history.
  """
  if not path.exists():
    return []
  kept = [r for r in workdir_io.read_jsonl(path) if r['step'] <= step]
  workdir_io.write_atomic(path, ''.join(json.dumps(r) + '\n' for r in kept))
  return kept


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard (unless
  `tensorboard` is False)."""

  def __init__(self, workdir, total_steps, start_step, progress_bar=True, tensorboard=True):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.start_step = start_step
    self.start_time = time.time()
    self.bar = None
    if not self.active:
      return
    self.workdir = workdir
    path = workdir_io.path(workdir, 'metrics.jsonl')
    self.jsonl = workdir_io.JsonLines(path, _drop_records_after(path, start_step))
    self.tb = (tf.summary.create_file_writer(str(workdir_io.path(workdir, 'tensorboard')))
               if tensorboard else None)
    if progress_bar and sys.stderr.isatty():
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)

  def write(self, step, scalars):
    if not self.active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.append(record)
    if self.tb is not None:
      with self.tb.as_default(step=int(step)):
        for key, value in record.items():
          if key != 'step' and math.isfinite(value):
            tf.summary.scalar(key, value)
      self.tb.flush()
    self._progress(step, record)

  def _progress(self, step, record):
    loss, speed = record.get('loss', float('nan')), record.get('images_per_sec', 0)
    shown = f'loss {loss:.4f}  {speed:.0f} img/s'
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix_str(shown, refresh=True)
      return
    done = step - self.start_step
    elapsed = time.time() - self.start_time
    eta = elapsed / max(done, 1) * (self.total_steps - step)
    print(f'step {step}/{self.total_steps}  {shown}  ETA {eta / 60:.1f} min', flush=True)

  def write_image(self, name, step, image):
    """Saves a uint8 [H, W, 3] image as WORKDIR/images/<name>_<step>.png and to TensorBoard."""
    if not self.active:
      return None
    from PIL import Image  # pylint: disable=g-import-not-at-top
    directory = workdir_io.path(self.workdir, 'images')
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f'{name}_{step:07d}.png'
    with path.open('wb') as f:
      Image.fromarray(image).save(f, format='PNG')
    if self.tb is not None:
      with self.tb.as_default(step=int(step)):
        tf.summary.image(name, image[None], step=int(step))
    return str(path)

  def close(self):
    if self.active:
      if self.bar is not None:
        self.bar.close()
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()
