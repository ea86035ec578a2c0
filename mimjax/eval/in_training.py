"""Evaluation while a run trains, every `config.eval.every_steps` steps: the evaluators that
`config.eval.in_loop` names (`evaluator.in_loop`), built for the run, and their record in the
workdir.

`held_out` is `HeldOutMetrics` (the framework's `eval_metrics`, e.g. supervised top-1 / top-5),
`knn_monitor` the kNN evaluator of `eval/knn.py` on the subsets of `eval.knn_monitor` (the same
evaluator the offline `knn` protocol of `mimjax.evaluate` runs on a checkpoint). Each evaluation
(every evaluator's metrics at one step) is added to WORKDIR/eval_<framework>.json (`record`).
"""
import json

import jax
import jax.numpy as jnp

from mimjax import errors
from mimjax import sharding
from mimjax import workdir_io
from mimjax.data import pipeline
from mimjax.eval import evaluator as evaluator_lib
from mimjax.eval import knn


class HeldOutMetrics:
  """`run(params, model_state)` -> means over `config.data.eval_split` of the framework's
  `eval_metrics` sums (supervised top-1 / top-5); an `evaluator.Evaluator`."""

  def __init__(self, framework, config, mesh):
    self.config, self.best_metric = config, framework.best_metric
    self.eval_fn = jax.jit(framework.eval_metrics, out_shardings=sharding.replicated(mesh))
    self.batch_sharding = sharding.batch_sharding(mesh)

  def run(self, params, model_state):
    local_batch = pipeline.local_batch_size(self.config.eval.batch_size)
    sums = None
    for local in pipeline.eval_batches(self.config, self.config.data.eval_split, local_batch):
      batch = jax.make_array_from_process_local_data(self.batch_sharding, local)
      out = self.eval_fn(params, model_state, batch)
      sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    count = max(sums.pop('count'), 1.0)
    return {k: v / count for k, v in sums.items()}


# In-loop evaluator type (evaluator.TYPES) -> fn(framework, config, mesh) -> Evaluator.
BUILDERS = {
    'held_out': HeldOutMetrics,
    'knn_monitor': lambda framework, config, mesh: knn.Knn.monitor(config, mesh),
}


def make_evaluators(framework, config, mesh):
  """The in-loop evaluators of the run (`evaluator.in_loop`: none when eval.every_steps is 0),
  in their order; the first one's `best_metric` ranks the records."""
  return [BUILDERS[name](framework, config, mesh)
          for name in evaluator_lib.in_loop(config, framework)]


def evaluate(evaluators, state):
  """{metric: value} of every evaluator on the train state, together."""
  results = {}
  for e in evaluators:
    results.update(e.run(state.params, state.model_state))
  return results


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
