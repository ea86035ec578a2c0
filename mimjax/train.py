r"""Train any mimjax framework: `python -m mimjax.train --config configs/mae.py:runlocal --workdir DIR`.

A second run of the same command with the same workdir resumes from the latest checkpoint (params,
optimizer, step, RNG and data position) and reproduces the uninterrupted run. Ctrl-C saves a
checkpoint at the current step before exiting.
"""
import itertools
import os
import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import distributed
from mimjax import frameworks
from mimjax import metrics_writer
from mimjax import sharding
from mimjax import train_step as train_step_lib
from mimjax.data import pipeline
from mimjax.data import sources
from mimjax.interop import pretrained as init_from

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:args].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images.')


class NonFiniteLossError(RuntimeError):
  pass


class _InterruptFlag:
  """First Ctrl-C asks the loop to checkpoint and stop; a second one stops at once."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print('\nInterrupt: saving a checkpoint at the end of this step (Ctrl-C again to abort).',
          file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def sample_batch(batch, n=2):
  """A small host batch of the same structure, for shape-only initialisation."""
  return jax.tree_util.tree_map(lambda x: x[:n], batch)


def _meta(config, state_params, step):
  return dict(step=int(step), data_position=int(step), framework=config.framework,
              config=config.to_dict(),
              param_shapes=checkpoint_lib.param_shapes(state_params))


def train(config, workdir):
  """Runs (or resumes) training; returns the last logged metrics as a dict of floats."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divides(config.batch_size // config.optim.accum_steps, mesh,
                               'batch_size / optim.accum_steps')
  framework = frameworks.build(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
  latest = ckpt.latest_step()
  start_step = int(ckpt.read_meta(latest)['data_position']) if latest is not None else 0

  batches = pipeline.train_batches(config, start_step)
  first = next(batches)
  batches = itertools.chain([first], batches)
  sample = sample_batch(first)

  init_fn, abstract_state, tx, lr_schedule = train_step_lib.build(framework, config, sample)
  state_sharding = train_step_lib.state_shardings(abstract_state, mesh, config.mesh)
  if latest is not None:
    ckpt.check_compatible(latest, abstract_state.params, config.framework)
    state = ckpt.restore(latest, train_step_lib.with_shardings(abstract_state, state_sharding))
    print(f'Resuming from checkpoint {latest} in {ckpt.directory}', flush=True)
  else:
    pretrained = None
    if config.init.checkpoint:
      pretrained = init_from.load(config, abstract_state.params)
    state = jax.jit(init_fn, out_shardings=state_sharding)(pretrained)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.to_json(config))

  step_fn = train_step_lib.jit_train_step(
      train_step_lib.make_train_step(framework, tx, lr_schedule, config.optim.accum_steps),
      state_sharding, mesh)
  vis_fn = jax.jit(lambda s, b: framework.forward(s.params, s.model_state, b,
                                                  jax.random.PRNGKey(0), False)[2])
  vis_batch = None
  batch_sharding = sharding.batch_sharding(mesh)
  writer = metrics_writer.MetricsWriter(workdir, config.total_steps, start_step,
                                        config.log.progress_bar)
  last_metrics, interval_sum, interval_steps = {}, None, 0
  interval_start, last_good_ckpt = time.time(), latest
  try:
    with _InterruptFlag() as interrupt:
      for step in range(start_step + 1, config.total_steps + 1):
        local = next(batches)
        batch = jax.make_array_from_process_local_data(batch_sharding, local)
        if vis_batch is None:
          vis_batch = batch
        state, metrics = step_fn(state, batch)
        interval_sum = metrics if interval_sum is None else jax.tree_util.tree_map(
            jnp.add, interval_sum, metrics)
        interval_steps += 1
        is_last = step == config.total_steps
        save_now = is_last or step % config.checkpoint.every_steps == 0 or interrupt.requested
        if step % config.log.every_steps == 0 or save_now:
          means = {k: float(v) / interval_steps for k, v in jax.device_get(interval_sum).items()}
          if means.pop('nonfinite') > 0:
            raise NonFiniteLossError(
                f'The loss or gradients became NaN/Inf between steps {step - interval_steps + 1} '
                f'and {step}; training stopped and those updates were not applied. The last good '
                f'checkpoint (step {last_good_ckpt}) in {ckpt.directory} is intact. Lower '
                'optim.base_lr, set optim.grad_clip, or check the input data.')
          elapsed = time.time() - interval_start
          means['images_per_sec'] = interval_steps * config.batch_size / max(elapsed, 1e-9)
          writer.write(step, means)
          last_metrics = dict(step=step, **means)
          interval_sum, interval_steps, interval_start = None, 0, time.time()
        images_every = config.log.images_every_steps
        if images_every and (step % images_every == 0 or is_last):
          for name, image in framework.visualize(vis_fn(state, vis_batch),
                                                 jax.device_get(vis_batch)).items():
            writer.write_image(name, step, np.asarray(jax.device_get(image)))
        if save_now:
          ckpt.save(step, state, _meta(config, state.params, step))
          last_good_ckpt = step
        if interrupt.requested:
          ckpt.wait()
          print(f'Stopped at step {step}; checkpoint saved. Re-run the same command to resume.',
                file=sys.stderr, flush=True)
          break
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return last_metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  if not flags.FLAGS['verbosity'].present:  # Orbax is chatty at INFO; --verbosity=0 shows it.
    logging.set_verbosity(logging.WARNING)
  distributed.initialize(_CONFIG.value)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, checkpoint_lib.CheckpointError, NonFiniteLossError,
          sources.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
