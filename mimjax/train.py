r"""Train any mimjax framework: `python -m mimjax.train --config configs/mae.py:runlocal --workdir DIR`.

A second run of the same command with the same workdir resumes from the latest checkpoint (params,
optimizer, step, RNG and data position) and reproduces the uninterrupted run. Ctrl-C saves a
checkpoint at the current step before exiting, and the rerun's metrics.jsonl is the uninterrupted
run's.
"""
import itertools
import json
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
from mimjax import errors
from mimjax import registry
from mimjax import metrics_writer
from mimjax import sharding
from mimjax import train_step as train_step_lib
from mimjax import validation
from mimjax.data import pipeline
from mimjax.data import sources
from mimjax.interop import pretrained as init_from



def define_flags():
  """Command-line flags (defined only when run as a program, so importing is side-effect free)."""
  config_flags.DEFINE_config_file('config', None, 'Config file[:args].', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images.')



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


def _place(tree, shardings):
  """Puts the host (numpy) leaves of `tree` on devices with `shardings`; works across hosts."""
  def place(leaf, sharding):
    if isinstance(leaf, jax.Array):
      return leaf
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda idx: leaf[idx])
  return jax.tree_util.tree_map(place, tree, shardings)


def _meta(config, state_params, step, data_examples):
  return dict(step=int(step), data_examples=int(data_examples), framework=config.framework,
              config=config.to_dict(),
              param_shapes=checkpoint_lib.param_shapes(state_params))


def _reopen_interval(meta):
  """(metric sums, steps, start time) of the log interval a Ctrl-C'd run left open, if any.

  Summing on from the saved host sums gives the same float32 means as the uninterrupted run.
  """
  interval = meta.get('open_interval')
  if not interval:
    return None, 0, time.time()
  return interval['sums'], interval['steps'], time.time() - interval['seconds']


def evaluate(eval_fn, state, config, batch_sharding):
  """Means over `config.data.eval_split` of the framework's `eval_metrics` sums."""
  local_batch = pipeline.local_batch_size(config.eval.batch_size)
  sums = None
  for local in pipeline.eval_batches(config, config.data.eval_split, local_batch):
    batch = jax.make_array_from_process_local_data(batch_sharding, local)
    out = eval_fn(state.params, state.model_state, batch)
    sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  count = max(sums.pop('count'), 1.0)
  return {k: v / count for k, v in sums.items()}


def record_eval(workdir, framework, step, results):
  """Adds `results` at `step` to WORKDIR/eval_<framework>.json: history, best and final.

  Records from later steps (left by a run that was interrupted and resumed) are dropped.
  """
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, f'eval_{framework.name}.json')
  history = []
  if os.path.exists(path):
    with open(path) as f:
      history = [r for r in json.load(f)['history'] if r['step'] < step]
  history.append(dict(step=int(step), **results))
  best = max(history, key=lambda r: r[framework.best_metric])
  with open(path + '.tmp', 'w') as f:
    json.dump(dict(best=best, final=history[-1], history=history), f, indent=2)
  os.replace(path + '.tmp', path)


def train(config, workdir):
  """Runs (or resumes) training; returns the last logged metrics as a dict of floats."""
  validation.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divides(config.batch_size // config.optim.accum_steps, mesh,
                               'batch_size / optim.accum_steps')
  if config.eval.every_steps:
    sharding.check_batch_divides(config.eval.batch_size, mesh, 'eval.batch_size')
  framework = registry.build(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
  latest = ckpt.latest_step()
  latest_meta = ckpt.read_meta(latest) if latest is not None else {}
  start_step = int(latest_meta.get('step', 0))
  # Examples consumed so far (checkpoints from before data_examples existed: step * batch_size).
  data_start = int(latest_meta.get('data_examples', start_step * config.batch_size))

  batches = pipeline.train_batches(config, data_start)
  first = next(batches)
  batches = itertools.chain([first], batches)
  sample = sample_batch(first)
  if jax.process_index() == 0:
    sources.write_labels(config, workdir)

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
    state = state.replace(model_state=_place(framework.load_frozen(state.model_state),
                                             state_sharding.model_state))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.to_json(config))

  step_fn = train_step_lib.jit_train_step(
      train_step_lib.make_train_step(framework, tx, lr_schedule, config.optim.accum_steps),
      state_sharding, mesh)
  # Replicated outputs, so every host can read them (a batch-sharded array spans other hosts).
  replicated = sharding.replicated(mesh)
  vis_fn = jax.jit(lambda s, b: (framework.forward(s.params, s.model_state, b,
                                                   jax.random.PRNGKey(0), False)[2], b),
                   out_shardings=replicated)
  eval_fn = jax.jit(framework.eval_metrics, out_shardings=replicated)
  vis_batch = None
  batch_sharding = sharding.batch_sharding(mesh)
  writer = metrics_writer.MetricsWriter(workdir, config.total_steps, start_step,
                                        config.log.progress_bar)
  last_metrics, last_good_ckpt = {}, latest
  interval_sum, interval_steps, interval_start = _reopen_interval(latest_meta)
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
        checkpoint_due = is_last or step % config.checkpoint.every_steps == 0
        stop = interrupt.requested  # read once: a Ctrl-C later in this step stops the next one
        save_now = checkpoint_due or stop
        eval_every = config.eval.every_steps
        eval_now = eval_every and (step % eval_every == 0 or is_last)
        # Ctrl-C does not log: its open interval goes into the checkpoint instead, so the resumed
        # run's metrics.jsonl is the uninterrupted run's, wherever the interrupt landed.
        log_now = step % config.log.every_steps == 0 or checkpoint_due or eval_now
        if log_now or save_now:
          sums = {k: float(v) for k, v in jax.device_get(interval_sum).items()}
          if sums['nonfinite'] > 0:
            raise errors.NonFiniteError(
                f'The loss or gradients became NaN/Inf between steps {step - interval_steps + 1} '
                f'and {step}; training stopped and those updates were not applied. The last good '
                f'checkpoint (step {last_good_ckpt}) in {ckpt.directory} is intact. Lower '
                'optim.base_lr, set optim.grad_clip, or check the input data.')
        if log_now:
          means = {k: v / interval_steps for k, v in sums.items() if k != 'nonfinite'}
          elapsed = time.time() - interval_start
          means['images_per_sec'] = interval_steps * config.batch_size / max(elapsed, 1e-9)
          if eval_now:
            results = evaluate(eval_fn, state, config, batch_sharding)
            record_eval(workdir, framework, step, results)
            means.update({f'eval_{k}': v for k, v in results.items()})
          writer.write(step, means)
          last_metrics = dict(step=step, **means)
          interval_sum, interval_steps, interval_start = None, 0, time.time()
        images_every = config.log.images_every_steps
        if images_every and (step % images_every == 0 or is_last):
          outputs, host_batch = jax.device_get(vis_fn(state, vis_batch))
          for name, image in framework.visualize(outputs, host_batch).items():
            writer.write_image(name, step, np.asarray(jax.device_get(image)))
        if save_now:
          meta = _meta(config, state.params, step,
                       data_start + (step - start_step) * config.batch_size)
          if interval_steps:
            meta['open_interval'] = dict(steps=interval_steps, sums=sums,
                                         seconds=time.time() - interval_start)
          ckpt.save(step, state, meta)
          last_good_ckpt = step
        if stop:
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
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError('--workdir is required.')
  if not f['verbosity'].present:  # Orbax is chatty at INFO; --verbosity=0 shows it.
    logging.set_verbosity(logging.WARNING)
  distributed.initialize(f.config)
  try:
    train(f.config, f.workdir)
  except (errors.ConfigError, errors.CheckpointError, errors.NonFiniteError,
          errors.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
