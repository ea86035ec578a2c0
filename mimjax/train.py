r"""Train any mimjax framework: `python -m mimjax.train --config mae:runlocal --workdir DIR`.

A second run of the same command with the same workdir resumes from the latest checkpoint (params,
optimizer, step, RNG and data position) and reproduces the uninterrupted run. Ctrl-C saves a
checkpoint at the current step and exits with status 130, and the rerun's metrics.jsonl is the
uninterrupted run's. SIGTERM (a preemption notice; in a multi-host run every host stops at the
same step) does the same and exits with PREEMPTED_EXIT_CODE (143), which schedulers treat as
"requeue". Either signal during start-up stops at once, having written nothing; a second one
while the checkpoint is saved exits at once (the rerun resumes from the previous checkpoint).

The shipped recipes are found by name from any directory (`--config mae:runlocal`); any field is
set with `--config.KEY=VALUE`. `--print_config` lists the fields the run reads (`--print_all`: every
field) and exits; `--dry_run` checks the run and prints its start-up summary (devices, parameters,
batch, steps, data) without writing.
"""
import os
import signal
import sys


def _stop_during_start_up(signum, frame):
  """Ctrl-C or SIGTERM while the command loads its libraries and reads its flags: nothing has
  been written, so the process ends at once (no KeyboardInterrupt traceback), 128 + the signal.
  `_StopRequest` replaces it when training starts."""
  del frame
  print(f'\n{signal.Signals(signum).name}: stopped during start-up; nothing was written.',
        file=sys.stderr, flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access


if __name__ == '__main__':  # before the imports below: seconds of JAX and TensorFlow
  for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _stop_during_start_up)

import dataclasses
import itertools
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import distributed
from mimjax import errors
from mimjax import registry
from mimjax import resume
from mimjax import metrics_writer
from mimjax import sharding
from mimjax import startup
from mimjax import train_step as train_step_lib
from mimjax import validation
from mimjax.data import fit
from mimjax.data import pipeline
from mimjax.data import sources
from mimjax.eval import evaluator
from mimjax.eval import in_training
from mimjax.interop import pretrained as init_from



def define_flags():
  """Command-line flags (defined only when run as a program, so importing is side-effect free)."""
  config_flags.DEFINE_config_file('config', None, startup.config_help(), lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images.')
  startup.define_flags()



# 128 + SIGTERM: the status of a run stopped by SIGTERM, which schedulers (SLURM --requeue,
# Kubernetes / GKE pod failure policies) treat as preemption; the rerun resumes.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Stopped(BaseException):
  """The run stopped at a signal: after saving a checkpoint at `step`, or during start-up
  (`step` None) having written nothing. `exit_code` is 128 + the signal, as a shell reports. A
  BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

  def __init__(self, signum, step=None):
    done = (f'checkpoint saved at step {step}' if step is not None else
            'stopped during start-up; nothing was written')
    super().__init__(f'{signal.Signals(signum).name}: {done}.')
    self.signum, self.step = signum, step
    self.exit_code = 128 + signum


class Preempted(Stopped):
  """Stopped by SIGTERM (a preemption notice); exits with PREEMPTED_EXIT_CODE."""


def stopped(signum, step=None):
  """The Stopped (Preempted for SIGTERM) of a run stopped by `signum` at `step`."""
  return (Preempted if signum == signal.SIGTERM else Stopped)(signum, step)


class _StopRequest:
  """Ctrl-C and SIGTERM, honoured from the start of `train`.

  During start-up (`writing` False) a signal stops at once: nothing has been written. Once the
  run writes, it asks the loop to checkpoint and stop at the end of a step; a second signal then
  exits at once (os._exit, no traceback: the save in flight is atomic, the previous checkpoint
  stays, and the lock left behind is stale and taken over by the rerun). One process installs
  these handlers; several use JAX's preemption service (started by jax.distributed.initialize),
  which takes SIGTERM so that every host sees it at the same step through
  `reached_preemption_sync_point`, and all save that step.
  """

  def __init__(self):
    self.signum = None
    self.writing = False
    self._previous = {}
    self._multihost = jax.process_count() > 1

  def __enter__(self):
    # Start-up is over: the command's start-up handler (imports and flags) gives way to Python's
    # defaults, so a signal after this run (or one of several hosts' Ctrl-C) is not "stopped
    # during start-up". Several hosts' SIGTERM stays as it is: JAX's preemption service took it.
    for signum, default in ((signal.SIGINT, signal.default_int_handler),
                            (signal.SIGTERM, signal.SIG_DFL)):
      if signal.getsignal(signum) is _stop_during_start_up and not (
          self._multihost and signum == signal.SIGTERM):
        signal.signal(signum, default)
    if not self._multihost:
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      print(f'\n{name} again: exiting now; the rerun resumes from the last complete checkpoint.',
            file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    if not self.writing:
      raise stopped(signum)
    print(f'\n{name}: saving a checkpoint at the end of this step (Ctrl-C again to exit at '
          'once).', file=sys.stderr, flush=True)

  def reached(self, step):
    """True at the step where every host stops (read once per step, the same on all hosts)."""
    if self._multihost and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


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


class IntervalAccumulator:
  """Sums the step metrics of one log interval on device; means on the host at log steps, except
  the `LATEST` ones, which are the interval's last step's value.

  A Ctrl-C'd run saves its open interval in the checkpoint (`snapshot`) and the rerun sums on from
  it, so the resumed run logs the same float32 means as the uninterrupted one.
  """

  # The lr of the logged step's update (train_step.make_train_step), not the interval's mean.
  LATEST = frozenset({'lr'})

  def __init__(self, meta=None):
    interval = (meta or {}).get('open_interval')
    if interval:
      self._sums, self.steps = interval['sums'], interval['steps']
      self._start = time.time() - interval['seconds']
    else:
      self._reset()

  def _reset(self):
    self._sums, self.steps, self._start = None, 0, time.time()

  def add(self, metrics):
    self._sums = metrics if self._sums is None else {
        k: v if k in self.LATEST else jnp.add(self._sums[k], v) for k, v in metrics.items()}
    self.steps += 1

  def host_sums(self, step, last_good_ckpt, ckpt_dir):
    """The interval's sums as floats (one device fetch); raises NonFiniteError on a NaN step."""
    sums = {k: float(v) for k, v in jax.device_get(self._sums).items()}
    if sums['nonfinite'] > 0:
      kept = (f'The last good checkpoint (step {last_good_ckpt}) in {ckpt_dir} is intact.'
              if last_good_ckpt is not None else
              'No checkpoint had been saved yet, so the run has nothing to resume from.')
      raise errors.NonFiniteError(
          f'The loss, gradients or updated parameters became NaN/Inf between steps '
          f'{step - self.steps + 1} and {step}; training stopped and those updates were not '
          f'applied. {kept} Lower optim.base_lr, set optim.grad_clip, check optim.b1/b2 < 1, or '
          'check the input data.')
    return sums

  def exclude(self, seconds):
    """Leaves `seconds` spent off the train step (evaluation, pictures) out of images/s."""
    self._start += seconds

  def close(self, sums, batch_size):
    """Means of the interval (with images/s), and a fresh interval."""
    means = {k: v if k in self.LATEST else v / self.steps
             for k, v in sums.items() if k != 'nonfinite'}
    elapsed = time.time() - self._start
    means['images_per_sec'] = self.steps * batch_size / max(elapsed, 1e-9)
    self._reset()
    return means

  def snapshot(self, sums):
    """The open interval for a checkpoint's meta (None when the interval is empty)."""
    if not self.steps:
      return None
    return dict(steps=self.steps, sums=sums, seconds=time.time() - self._start)


def held_out_pictures_batch(config, mesh):
  """The first images of `config.data.eval_split` as a global batch, for reconstruction grids:
  8 (all of a smaller split, so the grid has no blank rows), rounded up to a multiple of the
  devices along the batch axes and of the processes."""
  unit = int(np.lcm(mesh.shape['data'] * mesh.shape['fsdp'], jax.process_count()))
  rows = min(8, pipeline.num_examples(config, config.data.eval_split))
  local = pipeline.local_batch_size(-(-rows // unit) * unit)
  batches = pipeline.eval_batches(config, config.data.eval_split, local)
  host = {k: v for k, v in next(batches).items() if k != 'valid'}
  batches.close()
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), host)


@dataclasses.dataclass
class SetUp:
  """A run ready to step: its state on the mesh, the state's shardings, the optimizer and its lr
  schedule."""
  state: train_step_lib.TrainState
  state_sharding: Any
  tx: optax.GradientTransformation
  lr_schedule: Callable


def restore_or_init(framework, config, ckpt, latest, sample, mesh):
  """The SetUp of the latest checkpoint restored onto the mesh, or of a fresh state (optionally
  with pre-trained weights and frozen teachers loaded)."""
  built = train_step_lib.build(framework, config, sample)
  state_sharding = train_step_lib.state_shardings(built.abstract_state, mesh, config.mesh)
  if latest is not None:
    meta = ckpt.check_compatible(latest, built.abstract_state.params, config.framework)
    resume.check(config, meta, ckpt.directory)
    state = ckpt.restore(latest,
                         train_step_lib.with_shardings(built.abstract_state, state_sharding))
    print(f'Resuming from checkpoint {latest} in {ckpt.directory}', flush=True)
  else:
    pretrained = None
    if config.init.checkpoint:
      pretrained = init_from.load(config, built.abstract_state.params)
    state = jax.jit(built.init_fn, out_shardings=state_sharding)(pretrained)
    state = state.replace(model_state=_place(framework.load_frozen(state.model_state),
                                             state_sharding.model_state))
  return SetUp(state, state_sharding, built.tx, built.lr_schedule)


class _Loop:
  """The jitted functions of one run and what a step does besides the update: log, evaluate,
  draw, checkpoint."""

  def __init__(self, framework, config, workdir, ckpt, setup, mesh):
    self.framework, self.config, self.workdir, self.ckpt = framework, config, workdir, ckpt
    self.step_fn = train_step_lib.jit_train_step(
        train_step_lib.make_train_step(framework, setup.tx, setup.lr_schedule,
                                       config.optim.accum_steps),
        setup.state_sharding, mesh)
    # Replicated outputs, so every host can read them (a batch-sharded array spans other hosts).
    self.vis_fn = jax.jit(lambda s, b: (framework.forward(s.params, s.model_state, b,
                                                          jax.random.PRNGKey(0), False)[2], b),
                          out_shardings=sharding.replicated(mesh))
    self.evaluators = in_training.make_evaluators(framework, config, mesh)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.mesh, self.vis_batch = mesh, None

  def log(self, writer, step, means, state, eval_now):
    if eval_now:
      results = in_training.evaluate(self.evaluators, state)
      in_training.record(self.workdir, self.framework, self.evaluators[0].best_metric, step,
                         results)
      means.update({f'eval_{k}': v for k, v in results.items()})
    writer.write(step, means)
    return dict(step=step, **means)

  def draw(self, writer, step, state):
    """Reconstruction grids of the same held-out images at every drawing step."""
    if self.vis_batch is None:
      self.vis_batch = held_out_pictures_batch(self.config, self.mesh)
    outputs, host_batch = jax.device_get(self.vis_fn(state, self.vis_batch))
    for name, image in self.framework.visualize(outputs, host_batch).items():
      writer.write_image(name, step, np.asarray(jax.device_get(image)))

  def run(self, state, batches, start_step, data_start, interval, writer, stop_request):
    """Steps from `start_step` to config.total_steps (the data stream at example `data_start`);
    returns the last logged metrics. Raises Stopped after saving the step `stop_request` stops."""
    config, ckpt = self.config, self.ckpt
    last_metrics, last_good_ckpt = {}, ckpt.latest_step()
    for step in range(start_step + 1, config.total_steps + 1):
      batch = jax.make_array_from_process_local_data(self.batch_sharding, next(batches))
      state, metrics = self.step_fn(state, batch)
      interval.add(metrics)
      ckpt.poll()
      is_last = step == config.total_steps
      checkpoint_due = is_last or step % config.checkpoint.every_steps == 0
      stop = stop_request.reached(step)  # read once: a signal later in this step stops the next
      save_now = checkpoint_due or stop
      eval_every = config.eval.every_steps
      eval_now = eval_every and (step % eval_every == 0 or is_last)
      # Ctrl-C does not log: its open interval goes into the checkpoint instead, so the resumed
      # run's metrics.jsonl is the uninterrupted run's, wherever the interrupt landed.
      log_now = step % config.log.every_steps == 0 or checkpoint_due or eval_now
      if log_now or save_now:
        sums = interval.host_sums(step, last_good_ckpt, ckpt.directory)
      if log_now:
        means = interval.close(sums, config.batch_size)
        started = time.time()
        last_metrics = self.log(writer, step, means, state, eval_now)
        interval.exclude(time.time() - started)
      images_every = config.log.images_every_steps
      if images_every and (step % images_every == 0 or is_last):
        started = time.time()
        self.draw(writer, step, state)
        interval.exclude(time.time() - started)
      if save_now:
        meta = _meta(config, state.params, step,
                     data_start + (step - start_step) * config.batch_size)
        open_interval = interval.snapshot(sums)
        if open_interval:
          meta['open_interval'] = open_interval
        ckpt.save(step, state, meta)
        last_good_ckpt = step
      if stop:
        ckpt.wait()
        print(f'Stopped at step {step}; checkpoint saved. Re-run the same command to resume.',
              file=sys.stderr, flush=True)
        raise stopped(stop_request.signum, step)
    return last_metrics


def train(config, workdir, dry_run=False):
  """Runs (or resumes) training; returns the last logged metrics as a dict of floats.

  With `dry_run`, stops after the start-up summary, having written nothing (returns None). Raises
  Stopped (Preempted for SIGTERM) when Ctrl-C or SIGTERM stops the run: during start-up before
  anything is written, later after saving a checkpoint.
  """
  with _StopRequest() as stop_request:
    return _train(config, workdir, dry_run, stop_request)


def _train(config, workdir, dry_run, stop_request):
  """`train`, with the signals of `stop_request` honoured."""
  # Everything is validated and read (checkpoint, first batch, teacher and pre-trained weights)
  # before the workdir is created or written, so bad input leaves nothing behind.
  validation.check_workdir(workdir)
  validation.validate(config)  # before `fit` reads the fields it fits
  if dry_run:
    sources.check_prepared(config)  # a dry run downloads, prepares and creates nothing
  knn_monitor = 'knn_monitor' in evaluator.in_loop(config, registry.FRAMEWORKS[config.framework])
  notes = fit.note(fit.fit(config, knn_monitor=knn_monitor), config.data.name)
  if notes and jax.process_index() == 0:
    print(notes, flush=True)
  mesh = validation.check_run(config)
  framework = registry.build(config)
  ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
  latest = ckpt.latest_step()
  distributed.check_same_on_all_hosts(
      -1 if latest is None else latest,
      f'The latest checkpoint step in {ckpt.directory} differs between hosts (steps seen: '
      '{values}): the workdir must be one shared directory or bucket that every host sees.')
  if latest is not None:
    ckpt.verify(latest)
  latest_meta = ckpt.read_meta(latest) if latest is not None else {}
  start_step = int(latest_meta.get('step', 0))
  # Examples consumed so far (checkpoints from before data_examples existed: step * batch_size).
  data_start = resume.data_position_examples(latest_meta) if latest is not None else 0
  history = metrics_writer.read_history(workdir, start_step)
  config_history = resume.read_history(workdir)
  if config.eval.every_steps:
    in_training.read_history(workdir, framework)  # checked now; each evaluation reads it again

  batches = pipeline.train_batches(config, data_start)
  first = next(batches)
  batches = itertools.chain([first], batches)
  setup = restore_or_init(framework, config, ckpt, latest, sample_batch(first), mesh)
  startup.print_summary(config, mesh, setup.state.params, workdir, latest)
  if dry_run:
    return None
  stop_request.writing = True  # from here a signal checkpoints and stops at the end of a step
  lock = distributed.claim_workdir(workdir)
  try:
    if jax.process_index() == 0:
      sources.write_labels(config, workdir)
    resume.record(workdir, config, start_step, config_history)
    loop = _Loop(framework, config, workdir, ckpt, setup, mesh)
    writer = metrics_writer.MetricsWriter(workdir, config.total_steps, start_step,
                                          config.log.progress_bar, config, history)
    try:
      return loop.run(setup.state, batches, start_step, data_start,
                      IntervalAccumulator(latest_meta), writer, stop_request)
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
  finally:
    lock.release()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.print_config:
    print(startup.format_config(f.config, f.print_all))
    return
  if not f.workdir:
    raise app.UsageError('--workdir is required.')
  if not f['verbosity'].present:  # Orbax is chatty; --verbosity=0 shows its logs.
    logging.set_verbosity(logging.WARNING)
    checkpoint_lib.quiet_orbax_logs()
  with errors.reported():
    try:
      distributed.initialize(f.config)
      train(f.config, f.workdir, f.dry_run)
    except Stopped as e:
      if e.step is None:
        print(str(e), file=sys.stderr, flush=True)
      sys.exit(e.exit_code)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main, argv=startup.resolve_config_argv(sys.argv), flags_parser=config_lib.parse_flags)
