"""The evaluator interface, shared by the training loop and `mimjax.evaluate`, and the in-loop
evaluators a config declares.

An evaluator is built once for a run (its jitted functions and data subsets fixed) and then
`run(params, model_state) -> {metric: value}` on any parameters of that run's model; its
`best_metric` is the metric that picks the best evaluation of a history. The trainer runs the
evaluators named by `config.eval.in_loop` every `config.eval.every_steps` steps (big_vision's
`config.evals`, with one cadence and each evaluator's settings in a fixed section of the schema,
so every field is validated and resume compares them like any other); the offline `knn` protocol
runs the same kNN evaluator on a checkpoint.

This module is the contract only (names, defaults, checks); the implementations live in
`eval/in_training.py` (held-out metrics) and `eval/knn.py` (kNN), which bring the data pipeline.
"""
from typing import Protocol

from mimjax import errors

# In-loop evaluator type -> what it measures. Settings: held_out reads eval.batch_size; the kNN
# monitor reads eval.knn_monitor, eval.feature and eval.knn_temperature.
TYPES = {
    'held_out': "the framework's held-out metrics (Framework.eval_metrics: supervised top-1 / "
                'top-5) over data.eval_split',
    'knn_monitor': 'weighted kNN top-1 of eval.feature on the subsets of eval.knn_monitor',
}


class Evaluator(Protocol):
  """What the training loop and `mimjax.evaluate` call."""
  best_metric: str  # the metric that ranks evaluations (the higher the better)

  def run(self, params, model_state) -> dict:
    """{metric: float} of the model with `params` and `model_state` (the trainer's state)."""


def in_loop(config, framework):
  """The names of the evaluators the trainer runs (() when eval.every_steps is 0): those of
  eval.in_loop, or by default the framework's own held-out metrics when it has a classifier
  (supervised) and the kNN monitor otherwise (mae, simmim, distill)."""
  if not config.eval.every_steps:
    return ()
  if config.eval.in_loop:
    return tuple(config.eval.in_loop)
  return ('held_out',) if framework.best_metric else ('knn_monitor',)


def check_names(config):
  """eval.in_loop: known evaluator types, each at most once."""
  names = tuple(config.eval.in_loop)
  errors.require(all(isinstance(n, str) and n in TYPES for n in names)
                 and len(set(names)) == len(names), 'eval.in_loop', names,
                 f'name each of {sorted(TYPES)} at most once, or () for the framework\'s own')


def check_contract(config, framework):
  """The in-loop evaluators `framework` can run: held-out metrics need a classifier."""
  if 'held_out' in in_loop(config, framework) and not framework.best_metric:
    raise errors.ConfigError(
        f"config.eval.in_loop={tuple(config.eval.in_loop)}: framework {config.framework!r} has no "
        "held-out metrics (no classifier); use ('knn_monitor',) or () for its own.")
