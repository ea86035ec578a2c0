r"""Evaluate a training run: `python -m mimjax.evaluate --workdir DIR --protocol P [options]`.

Protocols (see docs/evaluation.md): knn, linear, linear_cached, finetune; analyses
attention_distance, spectrum, heterogeneity, rauc; pictures reconstruction, morphing, moto_layout.
Each adds its result to DIR/eval_<P>.json, a list of entries keyed by the options given, the
random-init comparison and the checkpoint step: a run with other options or at another step adds
an entry, and only the same evaluation run again replaces its own (PNGs are written next to it).
`--config.eval.KEY=VALUE` changes the run's evaluation settings for one evaluation (checked as
training checks them); sizes the data cannot fill are lowered with a note (mimjax/data/fit.py).
With --compare_random_init the protocol
also runs on the randomly initialised encoder of the same architecture, so the gain from
pre-training is visible. In a multi-process job (initialised like the trainer, from
config.distributed or MIMJAX_* variables) every process reads its part of each split, results
equal a single process's, and only process 0 writes.
"""
import inspect
import json
import math
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mimjax import config_lib
from mimjax import distributed
from mimjax import errors
from mimjax import finetune
from mimjax import workdir_io
from mimjax.eval import attention
from mimjax.eval import features as features_lib
from mimjax.eval import heterogeneity
from mimjax.eval import knn
from mimjax.eval import linear
from mimjax.eval import loading
from mimjax.eval import pictures
from mimjax.eval import rauc
from mimjax.eval import spectrum

# Protocols on a checkpoint: fn(run, **options) -> dict of results.
PROTOCOLS = {
    'knn': knn.protocol,
    'linear': linear.protocol,
    'linear_cached': linear.cached_protocol,
    'finetune': finetune.protocol,
    'attention_distance': attention.protocol,
    'spectrum': spectrum.protocol,
    'heterogeneity': heterogeneity.protocol,
    'reconstruction': pictures.reconstruction,
    'morphing': pictures.morphing,
    'moto_layout': pictures.moto_layout,
}
# Protocols on a workdir's logged curves (no checkpoint): fn(workdir, **options) -> dict.
CURVE_PROTOCOLS = {
    'rauc': rauc.protocol,
}
# Option flags: name -> (definer, help). A protocol takes the options its signature names.
OPTIONS = {
    'feature': (lambda n, d, h: flags.DEFINE_enum(n, d, features_lib.FEATURES, h),
                'Image feature (default: config.eval.feature; spectrum: gap | cls).'),
    'k': (flags.DEFINE_list, 'knn: neighbour counts (default: config.eval.knn_k).'),
    'base_lrs': (flags.DEFINE_list, 'linear, linear_cached: base lrs of the sweep (default: '
                 'config.eval.linear.base_lrs).'),
    'epochs': (flags.DEFINE_integer, 'linear, linear_cached: epochs (default: '
               'config.eval.linear.epochs).'),
    'optimizer': (lambda n, d, h: flags.DEFINE_enum(n, d, linear.OPTIMIZERS, h),
                  'linear, linear_cached: optimizer (default: config.eval.linear.optimizer).'),
    'finetune_config': (flags.DEFINE_string, 'finetune: configs/finetune.py argument string '
                        '(default: model=<the run\'s variant>[,runlocal]; without recipe=, the '
                        'recipe of the run\'s method).'),
    'total_steps': (flags.DEFINE_integer, 'finetune: number of steps (default: the recipe\'s).'),
    'label_fraction': (flags.DEFINE_float, 'finetune: train on a class-stratified subset of the '
                       'run\'s training split, this fraction of it with the same count of every '
                       'class (so 1.0 works only on balanced data), drawn from the run\'s seed '
                       '(default: all of it).'),
    'num_images': (flags.DEFINE_integer, 'Analyses and pictures: eval images used (default: '
                   'config.eval.analysis_examples; spectrum: the whole eval split).'),
    'num_groups': (flags.DEFINE_list, 'morphing: numbers of groups drawn.'),
    'other_workdir': (flags.DEFINE_string, 'rauc: workdir of the baseline run S1; spectrum: '
                      'a run to compare with (the gap is plotted).'),
    'metric': (flags.DEFINE_string, 'rauc: metrics.jsonl key both runs log (default: '
               'loss_<framework>, the shared base loss).'),
    'e1': (flags.DEFINE_float, 'rauc: start step E1 (default: where both curves start).'),
    'e2': (flags.DEFINE_float, 'rauc: end step E2 (default: where both curves end).'),
}


def define_flags():
  """Command-line flags (defined only when run as a program, so importing is side-effect free)."""
  flags.DEFINE_string('workdir', None, 'Workdir of a mimjax.train run.')
  flags.DEFINE_enum('protocol', 'knn', sorted({**PROTOCOLS, **CURVE_PROTOCOLS}),
                    'Evaluation protocol.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_bool('print_config', False, 'finetune: print the fine-tuning config derived from '
                    'the run (its method\'s recipe, docs/recipes.md) and exit, training nothing.')
  flags.DEFINE_bool('compare_random_init', False,
                    'Also evaluate the randomly initialised encoder of the same architecture.')
  config_flags.DEFINE_config_dict(
      'config', config_lib.base_config(), 'Evaluation settings of the run to change for this '
      'evaluation: --config.eval.KEY=VALUE (e.g. --config.eval.linear.epochs=5), checked as '
      'training checks them; kept in the result\'s options.', lock_config=True)
  for name, (define, help_text) in OPTIONS.items():
    define(name, None, help_text)


# Options that count or scale something, and their type: every value must be positive.
POSITIVE_OPTIONS = {'k': int, 'num_groups': int, 'epochs': int, 'total_steps': int,
                    'num_images': int, 'base_lrs': float, 'label_fraction': float}


def _check_options(protocol, fn, options):
  """ConfigError, before the run is loaded, on an option `fn` does not take or a count, size or
  learning rate that is not a positive number."""
  accepted = set(inspect.signature(fn).parameters) - {'run', 'workdir'}
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise errors.ConfigError(f'protocol {protocol!r} takes no option {unknown}; it takes '
                             f'{sorted(accepted) or "none"}.')
  for name, kind in POSITIVE_OPTIONS.items():
    if name not in options:
      continue
    values = options[name] if isinstance(options[name], (list, tuple)) else [options[name]]
    try:
      numbers = [kind(v) for v in values]
    except ValueError:
      numbers = []
    if not numbers or not all(math.isfinite(x) and x > 0 for x in numbers):
      raise errors.ConfigError(f'--{name}={",".join(map(str, values))}: use positive '
                               f'{"integers" if kind is int else "numbers"}.')


def results_path(workdir, protocol):
  return workdir_io.path(workdir, f'eval_{protocol}.json')


def read_results(workdir, protocol):
  """The entries of DIR/eval_<protocol>.json, oldest first ([] when there is none). A file from
  before entries were kept (one result) is read as one entry."""
  path = results_path(workdir, protocol)
  if not path.exists():
    return []
  try:
    data = json.loads(path.read_text())
    entries = data['results'] if 'results' in data else [dict(options={}, **data)]
    if not all(isinstance(e, dict) and isinstance(e.get('options'), dict) for e in entries):
      raise ValueError('a "results" entry without an "options" record')
  except (OSError, ValueError, TypeError) as e:  # a directory, invalid UTF-8, not JSON, a list
    raise errors.CheckpointError(
        f'{path} is damaged ({errors.reason(e)}); fix it, or move it away (losing the results it '
        'holds), and re-run.') from e
  return entries


def record_result(workdir, protocol, result, options, compare_random_init):
  """Adds `result` (with its options) to DIR/eval_<protocol>.json, replacing only an entry of the
  same options, random-init comparison and step; the file is replaced atomically."""
  entry = dict(options=json.loads(json.dumps(options)), compare_random_init=compare_random_init,
               **result)
  key = lambda e: (json.dumps(e['options'], sort_keys=True),  # noqa: E731
                   bool(e.get('compare_random_init')), e.get('step'))
  kept = [e for e in read_results(workdir, protocol) if key(e) != key(entry)]
  workdir_io.write_atomic(results_path(workdir, protocol),
                          json.dumps(dict(protocol=protocol, results=kept + [entry]), indent=2))


def evaluate(workdir, protocol, step=None, compare_random_init=False, run=None,
             config_overrides=None, **options):
  """Runs `protocol` on a workdir; returns its result and adds it to DIR/eval_<protocol>.json.

  `options` go to the protocol function (e.g. feature=, k= for knn). `run`, a Run already loaded
  from this workdir (`step` and `config_overrides` are then ignored), lets several protocols share
  its extracted features. `config_overrides` ({'eval.KEY': value}) change the run's evaluation
  settings for this evaluation; they are recorded with the options.
  """
  if protocol in CURVE_PROTOCOLS:
    _check_options(protocol, CURVE_PROTOCOLS[protocol], options)
    if compare_random_init:
      raise errors.ConfigError(f'protocol {protocol!r} compares logged curves; it has no '
                               'randomly initialised counterpart.')
    read_results(workdir, protocol)  # a damaged results file: refused before the protocol runs
    result = dict(protocol=protocol, **CURVE_PROTOCOLS[protocol](workdir, **options))
  elif protocol in PROTOCOLS:
    fn = PROTOCOLS[protocol]
    _check_options(protocol, fn, options)
    read_results(workdir, protocol)  # a damaged results file: refused before the protocol runs
    if run is None:
      config, note = loading.eval_config(workdir, config_overrides)
      if note and jax.process_index() == 0:
        print(note, flush=True)
      run = loading.load_run(workdir, step, config=config)
    result = dict(protocol=protocol, step=run.step, split=run.config.data.eval_split,
                  **fn(run, **options))
    if compare_random_init:
      result['random_init'] = fn(loading.load_run(workdir, random_init=True, config=run.config),
                                 **options)
  else:
    raise errors.ConfigError(f'Unknown protocol {protocol!r}; choose one of '
                             f'{sorted({**PROTOCOLS, **CURVE_PROTOCOLS})}.')
  if config_overrides:
    options = dict(options, config=dict(config_overrides))
  if jax.process_index() == 0:
    record_result(workdir, protocol, result, options, compare_random_init)
  return result


def _summary(result):
  """The float results and short float lists, then the images they count, e.g. 'top1=0.7512
  n=10000 train_n=60000' or 'aad_per_layer=[0.31 0.42]'."""
  parts = []
  for key, value in result.items():
    if isinstance(value, float) and key not in ('e1', 'e2'):
      parts.append(f'{key}={value:.4f}')
    elif (isinstance(value, list) and 0 < len(value) <= 32
          and all(isinstance(v, float) for v in value)):
      parts.append(f'{key}=[{" ".join(f"{v:.3f}" for v in value)}]')
  for key, name in (('test_examples', 'n'), ('train_examples', 'train_n'),
                    ('holdout_examples', 'holdout_n')):
    if isinstance(result.get(key), int):
      parts.append(f'{name}={result[key]}')
  return ' '.join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  options = {name: f[name].value for name in OPTIONS if f[name].value is not None}
  overrides = config_flags.get_override_values(f['config'])
  try:
    if f.print_config:
      if f.protocol != 'finetune':
        raise errors.ConfigError('--print_config shows the fine-tuning config: it needs '
                                 '--protocol finetune.')
      print(finetune.planned_config(f.workdir, f.step, **options))
      return
    distributed.initialize(config_lib.read_config(f.workdir))
    result = evaluate(f.workdir, f.protocol, f.step, f.compare_random_init,
                      config_overrides=overrides, **options)
  except (errors.MimjaxError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index():
    return
  line = f'{f.protocol} ({f.workdir}, step {result.get("step", "-")}): {_summary(result)}'
  if 'random_init' in result:
    line += f'   randomly initialised encoder: {_summary(result["random_init"])}'
  print(line + f'\nadded to {results_path(f.workdir, f.protocol)}')


if __name__ == '__main__':
  with config_lib.flag_errors_reported(sys.argv):
    define_flags()
  flags.mark_flag_as_required('workdir')
  app.run(main, flags_parser=config_lib.parse_flags)
