r"""Small-scale reproduction study: every method against its baseline, one command, one table.

  python -m mimjax.reproduce --quick     # one seed of every row, RESULTS_quick.md (25 min, 2 cores)
  python -m mimjax.reproduce             # the study: 2 seeds of every row (~2 h)
  python -m mimjax.reproduce --rows mae_lut,distill_dtm --seeds 3 --out /tmp/R.md

Matched pairs (PAIRS): within a pair the model (pico/4 ViT), data (Fashion-MNIST at 28 px), budget
(steps, batch 128) and seeds are identical; only the method differs. Each row is its config's
`runlocal` recipe with the same BUDGETS overrides. Every run records its framework loss curve,
kNN top-1 at `curve_points` evenly spaced checkpoints (the curve RAUC integrates; the last one is
the reported kNN), the linear probe, images/s and, on the first seed, its paper's diagnostics.
Supervised rows report test top-1 from the trainer's periodic evaluation, which is also their
curve. The distillation teacher is the supervised baseline of the same seed (teacher=checkpoint),
or CLIP with --clip_path (students then use patch 2 so that their 14x14 grid matches CLIP
ViT-B/16: meant for an accelerator, far outside the CPU budget). Evaluations and diagnostics
(attention distance, heterogeneity, DTM morphing, MoTo layout) are `mimjax.evaluate` protocols,
called by name; one that fails is reported as n/a with the reason instead of stopping the study.

Cost, measured on an otherwise idle 2-core machine (XLA:CPU): 210 training steps of batch 128 take
2.5-4 min per row (MAE ~190 images/s, MAE+LUT ~140); one pass of the pico encoder over the 30k
kNN images (20k memory, 10k queries) ~70 s, so the kNN at a checkpoint costs ~80 s with its
start-up, and the probe on the final checkpoint's features (shared with its kNN) a few seconds;
a random-init floor ~90 s.
- full: 2 seeds, 210 steps per run (27k images: 1.3 passes over the first 20k training images),
  kNN at 2 checkpoints + 1 linear probe per pre-training run with the 20k images as memory and
  the 10k test images as queries, random-init floors for the 3 pre-training baselines: ~1 h per
  seed.
- quick: 1 seed, 60 steps, kNN at 2 checkpoints, 5k training / 1k test images: 24.8 min wall on
  2 idle cores (MAE row 124 s, of which 57 s evaluation and diagnostics).
Runs and their evaluations are cached: WORKDIR_ROOT/<mode>/<row>/seed<k>/repro.json holds a
finished run's record, so a rerun skips it and resumes an interrupted run from its checkpoint.
"""
import dataclasses
import json
import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mimjax import evaluate as evaluate_lib
from mimjax import recipe_lib
from mimjax import registry
from mimjax import train as train_lib
from mimjax.eval import loading
from mimjax.reproduce import report


@dataclasses.dataclass(frozen=True)
class Row:
  config: str  # '<module in configs/>:<arg>'
  label: str
  diagnostics: tuple = ()  # mimjax.evaluate protocols, run on the first seed


# In run order: the supervised baseline is the distillation teacher, so it comes before distill.
ROWS = {
    'mae': Row('mae:runlocal', 'MAE', ('attention_distance', 'heterogeneity')),
    'mae_lut': Row('mae_lut:runlocal', 'MAE + LUT', ('attention_distance',)),
    'mae_mto': Row('mae_mto:runlocal', 'MAE + MTO (decoder)', ('heterogeneity',)),
    # Cosine, as simmim_mto (MTO's Table 3), so the pair differs only by MTO.
    'simmim': Row('simmim:runlocal,cosine', 'SimMIM', ('heterogeneity',)),
    'simmim_mto': Row('simmim_mto:runlocal', 'SimMIM + MTO (encoder)', ('heterogeneity',)),
    'supervised': Row('supervised:runlocal', 'supervised ViT'),
    'supervised_moto': Row('supervised:runlocal,moto', 'supervised + MoTo', ('moto_layout',)),
    'supervised_tokenprop': Row('supervised:runlocal,tokenprop', 'supervised + TokenProp'),
    'supervised_moto_tokenprop': Row('supervised:runlocal,moto,tokenprop',
                                     'supervised + MoTo + TokenProp', ('moto_layout',)),
    'distill': Row('distill:runlocal,teacher=checkpoint', 'feature distillation'),
    'distill_dtm': Row('distill:runlocal,teacher=checkpoint,dtm', 'distillation + DTM',
                       ('morphing',)),
}
# method row -> its baseline row, in report order.
PAIRS = {
    'mae_lut': 'mae',
    'mae_mto': 'mae',
    'simmim_mto': 'simmim',
    'distill_dtm': 'distill',
    'supervised_moto': 'supervised',
    'supervised_tokenprop': 'supervised',
    'supervised_moto_tokenprop': 'supervised',
}
TEACHER_ROW = 'supervised'
# A finished run's cached record and its random-init floor's, in the run's workdir.
RECORD = 'repro.json'
FLOOR_RECORD = 'repro_random_init.json'


@dataclasses.dataclass(frozen=True)
class Budget:
  steps: int  # per run, the same for every row
  seeds: int
  curve_points: int  # evaluations along training, evenly spaced; the last at the end
  overrides: dict  # dotted config keys -> values, applied to every row

  def __post_init__(self):
    if self.steps % self.curve_points:
      raise ValueError(f'steps {self.steps} must be a multiple of curve_points '
                       f'{self.curve_points}, so that the last checkpoint ends the curve.')


BUDGETS = {
    'full': Budget(210, 2, 2, {
        'batch_size': 128, 'data.train_split': 'train[:20000]', 'data.shuffle_buffer': 20_000,
        'data.eval_split': 'test', 'eval.linear.train_split': 'train[:20000]',
        'eval.linear.holdout_split': 'train[58000:]'}),
    'quick': Budget(60, 1, 2, {
        'batch_size': 128, 'data.train_split': 'train[:5000]', 'data.shuffle_buffer': 5000,
        'data.eval_split': 'test[:1000]', 'eval.linear.train_split': 'train[:5000]',
        'eval.linear.holdout_split': 'train[59000:]'}),
    # End-to-end tests only: the numbers mean nothing.
    'smoke': Budget(2, 1, 1, {
        'model.variant': 'mu/4', 'batch_size': 16, 'data.train_split': 'train[:256]',
        'data.eval_split': 'test[:128]', 'data.shuffle_buffer': 256, 'eval.batch_size': 64,
        'eval.linear.train_split': 'train[:256]', 'eval.linear.holdout_split': 'train[-128:]'}),
}

DEFAULT_OUT = {'full': 'RESULTS.md', 'quick': 'RESULTS_quick.md', 'smoke': 'RESULTS_smoke.md'}


def build_config(row, overrides):
  module, _, arg = ROWS[row].config.partition(':')
  config = recipe_lib.recipe_config(module, arg)
  config.update_from_flattened_dict(overrides)
  return config


def row_overrides(row, seed, budget, teacher_workdir=None, clip_path=None):
  """Every override of one run: budget, seed, checkpoints at the curve points, the teacher."""
  every = budget.steps // budget.curve_points
  overrides = {
      'seed': seed, 'total_steps': budget.steps, 'warmup_steps': max(1, budget.steps // 10),
      'checkpoint.every_steps': every, 'checkpoint.keep': budget.curve_points + 1,
      'log.every_steps': max(1, budget.steps // 30), 'log.images_every_steps': 0,
      'log.progress_bar': False, **budget.overrides}
  config = build_config(row, {})
  if registry.FRAMEWORKS[config.framework].best_metric:  # held-out evaluation gives the curve
    overrides['eval.every_steps'] = every
  if _needs_teacher(config) and clip_path:
    overrides.update({'distill.teacher': 'clip', 'distill.clip_path': clip_path,
                      'model.variant': 'pico/2'})
  elif _needs_teacher(config):
    overrides['distill.teacher_workdir'] = teacher_workdir
  return overrides


def train_command(row, workdir, overrides):
  """The `python -m mimjax.train` command line equivalent to one run of the study."""
  module, _, arg = ROWS[row].config.partition(':')
  flat = [f'--config.{k}={",".join(map(str, v)) if isinstance(v, tuple) else v}'
          for k, v in overrides.items()]
  return ' '.join(['python -m mimjax.train', f'--config configs/{module}.py:{arg}',
                   f'--workdir {workdir}', *map(shlex.quote, flat)])


def images_per_sec(records):
  """Median throughput of the logged intervals, without the first (compilation) and evals."""
  values = [r['images_per_sec'] for r in records[1:] if not any(k.startswith('eval_') for k in r)]
  return float(np.median(values)) if values else None


def _na(error):
  return f'{type(error).__name__}: {error}'[:240]


def _load_final(workdir):
  """The run's last checkpoint, loaded once so that protocols share its features; None if it
  cannot load (each protocol then tries on its own and notes why it failed)."""
  try:
    return loading.load_run(workdir)
  except Exception:  # pylint: disable=broad-except  # the protocols report it
    return None


def _top1(workdir, protocol, notes, **options):
  """Top-1 of an evaluation protocol, or None with the reason in `notes` when it cannot run."""
  try:
    return float(evaluate_lib.evaluate(workdir, protocol, **options)['top1'])
  except Exception as e:  # pylint: disable=broad-except  # a missing protocol must not stop it
    notes[protocol] = _na(e)
    return None


def _numbers(value):
  """A protocol result's value if worth printing: a number or a short (nested) list of numbers,
  rounded; None for anything else."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return round(float(value), 4)
  if isinstance(value, (list, tuple)) and 0 < len(value) <= 64:
    items = [_numbers(v) for v in value]
    return items if all(v is not None for v in items) else None
  return None


def summarise(result):
  """Numbers and PNG paths of a diagnostic's result (values of the top level and of its dicts)."""
  flat = dict(result)
  for key, value in result.items():
    if isinstance(value, dict):
      flat.update({f'{key}.{k}': v for k, v in value.items()})
  numbers = {k: v for k, v in ((k, _numbers(v)) for k, v in flat.items())
             if v is not None and k != 'step'}
  figures = sorted({v for v in flat.values() if isinstance(v, str) and v.endswith('.png')})
  return dict(numbers=numbers, figures=figures)


def run_diagnostics(row, workdir):
  """Each of the row's diagnostic protocols, summarised, or n/a with the reason."""
  out = {}
  for name in ROWS[row].diagnostics:
    try:
      out[name] = summarise(evaluate_lib.evaluate(workdir, name))
    except Exception as e:  # pylint: disable=broad-except  # reported as n/a with the reason
      out[name] = {'n/a': _na(e)}
  return out


def measure(row, seed, budget, workdir, overrides, with_diagnostics):
  """Trains (or resumes) one run, evaluates it and returns its record, cached in repro.json."""
  path = os.path.join(workdir, RECORD)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = build_config(row, overrides)
  start = time.time()
  train_lib.train(config, workdir)
  logged = report.read_metrics(workdir)
  record = dict(row=row, label=ROWS[row].label, seed=seed, workdir=workdir,
                framework=config.framework, steps=config.total_steps,
                images_per_sec=images_per_sec(logged),
                final_loss=logged[-1].get(f'loss_{config.framework}'), notes={})
  best_metric = registry.FRAMEWORKS[config.framework].best_metric
  if best_metric:  # held-out evaluation during training (top1 of a classifier) gives the curve
    with open(os.path.join(workdir, f'eval_{config.framework}.json')) as f:
      history = json.load(f)['history']
    record['curve'] = [[r['step'], r[best_metric]] for r in history]
    record['test_top1'] = history[-1][best_metric]
  else:
    every = config.checkpoint.every_steps
    record['curve'] = [[s, _top1(workdir, 'knn', record['notes'], step=s)]
                       for s in range(every, config.total_steps, every)]
    final = _load_final(workdir)  # one feature pass for the last kNN point and the probe
    record['curve'].append([config.total_steps, _top1(workdir, 'knn', record['notes'], run=final)])
    record['knn'] = record['curve'][-1][1]
    record['linear'] = _top1(workdir, 'linear_cached', record['notes'], run=final)
  if with_diagnostics:
    record['diagnostics'] = run_diagnostics(row, workdir)
  record['seconds'] = time.time() - start  # training + evaluation in the session that finished it
  _save(path, record)
  return record


def measure_random_init(row, seed, workdir):
  """kNN and linear-probe top-1 of the row's encoder freshly initialised from the run's seed (the
  floor that pre-training has to clear), cached in WORKDIR/repro_random_init.json."""
  path = os.path.join(workdir, FLOOR_RECORD)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  start = time.time()
  record = dict(row=row, label='random init', seed=seed, workdir=workdir, notes={})
  try:
    run = loading.load_run(workdir, random_init=True)
    for key, protocol in (('knn', 'knn'), ('linear', 'linear_cached')):
      record[key] = float(evaluate_lib.PROTOCOLS[protocol](run)['top1'])
  except Exception as e:  # pylint: disable=broad-except  # reported as n/a with the reason
    record['notes']['random init'] = _na(e)
  record['seconds'] = time.time() - start
  _save(path, record)
  return record


def _save(path, record):
  """Writes a record atomically, so an interrupted study never leaves a half-written cache."""
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def _needs_teacher(config):
  """Whether the run distils a teacher (the teacher row's checkpoint, unless CLIP is given)."""
  return 'teacher_features' in registry.FRAMEWORKS[config.framework].provides(config)


def plan(methods, clip_path):
  """Rows to run, in ROWS order: the methods, their baselines and the distillation teacher."""
  needed = set(methods) | {PAIRS[m] for m in methods}
  if not clip_path and any(_needs_teacher(build_config(r, {})) for r in needed):
    needed.add(TEACHER_ROW)
  return [r for r in ROWS if r in needed]


def run_study(mode='full', seeds=None, out=None, workdir_root='workdirs/repro',
              methods=None, clip_path=None, argv=(), report_only=False):
  """Runs (or resumes) every run the methods need, writes `out` (default: DEFAULT_OUT[mode]);
  returns the records per row.

  With `report_only`, runs nothing: the report covers the runs that have finished (a stopped
  study) and lists the others as not finished.
  """
  budget = BUDGETS[mode]
  out = out or DEFAULT_OUT[mode]
  unknown = sorted(set(methods or ()) - set(PAIRS))
  if unknown:
    raise ValueError(f'Unknown rows {unknown}; choose from {", ".join(PAIRS)}.')
  methods = [m for m in PAIRS if m in methods] if methods else list(PAIRS)
  seeds = range(budget.seeds if seeds is None else seeds)
  root = os.path.join(workdir_root, mode)
  workdir = lambda row, seed: os.path.join(root, row, f'seed{seed}')
  rows = plan(methods, clip_path)
  study_argv = [a for a in argv if a not in ('--report_only', '--noreport_only')]
  commands = [' '.join(['python -m mimjax.reproduce', *map(shlex.quote, study_argv)])]
  commands += [train_command(row, workdir(row, '{SEED}'), row_overrides(
      row, '{SEED}', budget, workdir(TEACHER_ROW, '{SEED}'), clip_path)) for row in rows]
  records = {row: [] for row in rows}
  floors = {row: [] for row in rows if row in PAIRS.values()}
  unfinished = []
  for seed in seeds:  # seed-major: an interrupted study has whole seeds to report
    for row in rows:
      if report_only and not os.path.exists(os.path.join(workdir(row, seed), RECORD)):
        unfinished.append(f'{row} seed {seed}')
        continue
      print(f'[{row} seed {seed}] {workdir(row, seed)}', flush=True)
      overrides = row_overrides(row, seed, budget, workdir(TEACHER_ROW, seed), clip_path)
      records[row].append(measure(row, seed, budget, workdir(row, seed), overrides,
                                  seed == seeds[0]))
      if row not in floors or registry.FRAMEWORKS[records[row][-1]['framework']].best_metric:
        continue
      if report_only and not os.path.exists(os.path.join(workdir(row, seed), FLOOR_RECORD)):
        unfinished.append(f'{row} seed {seed} (random init)')
        continue
      floors[row].append(measure_random_init(row, seed, workdir(row, seed)))
  pairs = [(m, PAIRS[m]) for m in methods if records[m] and records[PAIRS[m]]]
  if not pairs:
    raise ValueError(f'No pair has a finished run under {root}; run the study first.')
  report.write(out, records, pairs, mode, budget.steps, budget.curve_points, commands, root,
               floors, unfinished)
  print(f'Wrote {out}')
  return records


def define_flags():
  """Command-line flags (defined only when run as a program, so importing is side-effect free)."""
  flags.DEFINE_bool('quick', False, 'One seed of every row on a short budget.')
  flags.DEFINE_bool('smoke', False, 'An absurdly small budget, for end-to-end tests only.')
  flags.DEFINE_integer('seeds', None, 'Seeds per row (default: 2, or 1 with --quick).')
  flags.DEFINE_string('out', None, 'Report path; figures go to <out stem>_figures/. Default: '
                      f'{", ".join(f"{v} ({k})" for k, v in DEFAULT_OUT.items())}, so a short '
                      'run never overwrites the committed full study.')
  flags.DEFINE_string('workdir_root', 'workdirs/repro', 'Runs go to ROOT/<mode>/<row>/seed<k>.')
  flags.DEFINE_list('rows', None, f'Method rows (baselines come along): {", ".join(PAIRS)}.')
  flags.DEFINE_string('clip_path', None, 'Distil from this local CLIP ViT-B/16 checkpoint instead '
                      'of the supervised run (an accelerator job).')
  flags.DEFINE_bool('report_only', False, 'Run nothing: write the report from the runs that have '
                    'finished, listing the others (for a study stopped part-way).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.quick and f.smoke:
    raise app.UsageError('--quick and --smoke exclude each other.')
  if not f['verbosity'].present:  # TFDS and Orbax are chatty at INFO
    logging.set_verbosity(logging.WARNING)
  mode = 'smoke' if f.smoke else 'quick' if f.quick else 'full'
  run_study(mode, f.seeds, f.out, f.workdir_root, f.rows, f.clip_path, sys.argv[1:],
            f.report_only)

