"""Evaluation while a run trains, every `config.eval.every_steps` steps: one interface,
`evaluator(state) -> {metric: value}` with a `best_metric`, and its record in the workdir.

A framework with held-out metrics of its own (`Framework.eval_metrics`, e.g. supervised top-1 /
top-5) is evaluated by `HeldOutMetrics`; the others (mae, simmim, distill) by the kNN monitor
(`monitor.KnnMonitor`). Each evaluation is added to WORKDIR/eval_<framework>.json (`record`);
`mimjax.evaluate` runs the offline protocols on a saved checkpoint.
"""
import json

import jax
import jax.numpy as jnp

from mimjax import errors
from mimjax import sharding
from mimjax import workdir_io
from mimjax.data import pipeline
from mimjax.eval import monitor


class HeldOutMetrics:
  """`evaluate(state)`: means over `config.data.eval_split` of the framework's `eval_metrics` sums
  (supervised top-1 / top-5)."""

  def __init__(self, framework, config, mesh):
    self.config, self.best_metric = config, framework.best_metric
    self.eval_fn = jax.jit(framework.eval_metrics, out_shardings=sharding.replicated(mesh))
    self.batch_sharding = sharding.batch_sharding(mesh)

  def __call__(self, state):
    local_batch = pipeline.local_batch_size(self.config.eval.batch_size)
    sums = None
    for local in pipeline.eval_batches(self.config, self.config.data.eval_split, local_batch):
      batch = jax.make_array_from_process_local_data(self.batch_sharding, local)
      out = self.eval_fn(state.params, state.model_state, batch)
      sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    count = max(sums.pop('count'), 1.0)
    return {k: v / count for k, v in sums.items()}


def make_evaluator(framework, config, mesh):
  """The in-training evaluation: the framework's held-out metrics, or for a framework without a
  classifier (mae, simmim, distill) the kNN monitor; None when eval.every_steps is 0."""
  if not config.eval.every_steps:
    return None
  if framework.best_metric:
    return HeldOutMetrics(framework, config, mesh)
  return monitor.KnnMonitor(config, mesh)


def read_history(workdir, framework):
  """The records of WORKDIR/eval_<framework>.json ([] when there is none), read and checked
  before the run writes anything: a file that is not JSON, not a record with a `history` list of
  records with an integer `step`, invalid UTF-8 or a directory is one CheckpointError naming it."""
  path = workdir_io.path(workdir, f'eval_{framework.name}.json')
  if not path.exists():
    return []
  try:
    history = json.loads(path.read_text())['history']
    if not all(isinstance(r, dict) and isinstance(r.get('step'), int) for r in history):
      raise ValueError('a "history" entry without an integer "step"')
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise errors.CheckpointError(
        f'{path} is damaged ({errors.reason(e)}); fix it, or move it away (losing the evaluation '
        'history it holds), and re-run.') from e
  return history


def record(workdir, framework, best_metric, step, results):
  """Adds `results` at `step` to WORKDIR/eval_<framework>.json: history, best and final.

  Records from later steps (left by a run that was interrupted and resumed) are dropped.
  """
  if jax.process_index() != 0:
    return
  path = workdir_io.path(workdir, f'eval_{framework.name}.json')
  history = [r for r in read_history(workdir, framework) if r['step'] < step]
  history.append(dict(step=int(step), **results))
  best = max(history, key=lambda r: r[best_metric])
  workdir_io.write_atomic(path, json.dumps(dict(best=best, final=history[-1], history=history),
                                           indent=2))
