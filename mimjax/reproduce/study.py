r"""Small-scale reproduction study: every method against its baseline, one command, one table.

  python -m mimjax.reproduce --floor       # first: MAE pre-train + fine-tune vs scratch, 3 seeds
  python -m mimjax.reproduce               # the study: 3 seeds of every pair on the CPU budget
  python -m mimjax.reproduce --preset gpu  # the same at the accelerator budget (RESULTS_gpu.md)
  python -m mimjax.reproduce --quick       # one seed of every row on a short budget
  python -m mimjax.reproduce --rows mae_lut,distill_dtm --seeds 3 --out /tmp/R.md

Matched pairs (PAIRS): within a pair the model (a small ViT), data (Fashion-MNIST at 28 px), budget
(steps, batch) and seeds are identical; only the method differs. Each row is its config's `runlocal`
recipe with the budget's overrides. The headline metric is the papers': fine-tuning top-1 on the
test split, each pre-trained encoder fine-tuned with its method's own recipe
(`Framework.finetune_recipe`, `mimjax/finetune_recipes.py`) on a class-stratified labelled subset of
the training split (`data.label_fraction`, 1% and 10%: the same number of images of every class,
drawn from the run's seed). Its floor is scratch: the same fine-tuning model, recipe, labels and
steps started from the random initialisation (the fine-tune protocol on the random-init encoder;
with no checkpoint to load nothing else differs from training from scratch, tested). kNN top-1 at
`curve_points` evenly spaced checkpoints (the curve RAUC integrates), the linear probe, images/s
and, on the first seed, the paper's diagnostics are secondary, with the random-init encoder's kNN
and probe as their floor. The MAE row also fine-tunes its intermediate checkpoints on the smallest
subset: fine-tuning top-1 against pre-training steps. Supervised rows report test top-1 from the
trainer's periodic evaluation (their curve) and are not fine-tuned. The distillation teacher is the
supervised baseline of the same seed (teacher=checkpoint), or CLIP with --clip_path (students then
use patch 2: an accelerator job). Evaluations and diagnostics are `mimjax.evaluate` protocols; one
that fails is reported as n/a with the reason instead of stopping the study, and tried again on
rerun.

Resumable: every part of the study is cached in its run's workdir, ROOT/<preset>/<row>/seed<k>/,
as it finishes: repro_pretrain.json (training; an interrupted one resumes from its checkpoint),
repro_knn_step<S>.json, repro_linear.json, repro_finetune_labels<F>_step<S>.json (each fine-tune,
itself checkpointed in finetune_labels<F>_step<S>[_steps<N>]/),
repro_finetune_random_init_labels<F>.json (the scratch floor), repro_random_init.json's parts and
repro_diagnostic_<name>.json; repro.json gathers a finished run. Rerunning the same command skips
everything finished, so the study can be run in several sittings. Every record is also copied,
with the run's config.json and metrics.jsonl, to RECORDS/<preset>/<row>/seed<k>/ (`--records`,
default `results/`: a few KB per run, committed with the report), so a sitting on a machine without
the workdirs (checkpoints cannot travel) skips what is finished; a part its records lack trains the
run again first (same config and seed; a distillation student also needs its teacher's workdir).
Every cached file carries the budget's fingerprint (`budget_key`: the preset's overrides and
steps, --clip_path), and one of another budget is refused: a changed budget needs its own
--workdir_root and --records.

Presets (BUDGETS): cpu (the default: 2 CPU cores), gpu (a larger ViT and 4x the steps), quick,
smoke (tests only). Costs measured for the first edition on an otherwise idle 2-core machine
(XLA:CPU, pico/4, batch 128): MAE ~190 training images/s, MAE + LUT ~140, supervised ~150; one
encoder pass over 30k images ~70 s. Every run records the device it trained on.
"""
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from mimjax import errors
from mimjax import evaluate as evaluate_lib
from mimjax import recipe_lib
from mimjax import registry
from mimjax import train as train_lib
from mimjax.eval import in_training
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
  steps: int  # pre-training steps per run, the same for every row
  seeds: int
  curve_points: int  # evaluations along training, evenly spaced; the last at the end
  overrides: dict  # dotted config keys -> values, applied to every row
  label_fractions: tuple = (0.01, 0.1)  # labelled subsets fine-tuned on (data.label_fraction)
  finetune_steps: int = 0  # steps of every fine-tune; 0 = the recipe's (runlocal: 600)

  def __post_init__(self):
    if self.steps % self.curve_points:
      raise errors.ConfigError(f'steps {self.steps} must be a multiple of curve_points '
                       f'{self.curve_points}, so that the last checkpoint ends the curve.')


BUDGETS = {
    # The CPU budget (2 cores): pre-training on all 60k training images; kNN memory the 60k.
    'cpu': Budget(1500, 3, 3, {
        'batch_size': 128, 'data.train_split': 'train', 'data.shuffle_buffer': 60_000,
        'data.eval_split': 'test', 'eval.linear.train_split': 'train[:20000]',
        'eval.linear.holdout_split': 'train[58000:]'}, (0.01, 0.1), 600),
    # An accelerator: a 12-block ViT-Ti at patch 4, 4x the pre-training and fine-tuning steps.
    'gpu': Budget(6000, 3, 6, {
        'model.variant': 'Ti/4', 'batch_size': 256, 'data.train_split': 'train',
        'data.shuffle_buffer': 60_000, 'data.eval_split': 'test', 'eval.batch_size': 1000,
        'eval.linear.train_split': 'train[:50000]', 'eval.linear.holdout_split': 'train[58000:]'},
                  (0.01, 0.1), 2400),
    'quick': Budget(60, 1, 2, {
        'batch_size': 128, 'data.train_split': 'train[:5000]', 'data.shuffle_buffer': 5000,
        'data.eval_split': 'test[:1000]', 'eval.linear.train_split': 'train[:5000]',
        'eval.linear.holdout_split': 'train[59000:]'}, (0.01, 0.1), 60),
    # End-to-end tests only: the numbers mean nothing.
    'smoke': Budget(2, 1, 2, {
        'model.variant': 'mu/4', 'batch_size': 16, 'data.train_split': 'train[:256]',
        'data.eval_split': 'test[:128]', 'data.shuffle_buffer': 256, 'eval.batch_size': 64,
        'eval.linear.train_split': 'train[:256]', 'eval.linear.holdout_split': 'train[-128:]'},
                    (0.1,), 2),
}

DEFAULT_OUT = {'cpu': 'RESULTS.md', 'gpu': 'RESULTS_gpu.md', 'quick': 'RESULTS_quick.md',
               'smoke': 'RESULTS_smoke.md'}
# The row whose intermediate checkpoints are fine-tuned too (on the smallest labelled subset): the
# curve of fine-tuning top-1 against pre-training steps, started at step 0 by its scratch floor.
FINETUNE_CURVE_ROW = 'mae'


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


def device():
  """The device the process computes on, e.g. 'NVIDIA H100 80GB HBM3 (gpu, 1 device)'."""
  return (f'{jax.devices()[0].device_kind} ({jax.default_backend()}, '
          f'{jax.device_count()} device{"s" if jax.device_count() > 1 else ""})')


def budget_key(budget, clip_path=None):
  """The fingerprint of what a study measures: its Budget (overrides, steps, fine-tuning steps,
  label fractions, curve points) and CLIP checkpoint, the sha1 of their sorted JSON. Every cached
  part and record carries it, so a changed budget never silently reuses another's results."""
  text = json.dumps(dict(dataclasses.asdict(budget), clip_path=clip_path), sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()


def _read_cached(path, key):
  """The record saved at `path` by this budget (`key`), or None when there is none; ConfigError
  for one that another budget (or CLIP checkpoint) wrote."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  if record.get('budget_key') != key:
    raise errors.ConfigError(f'{path} was measured with another budget or --clip_path; give '
                             'this study its own --workdir_root and --records.')
  return record


# What a run's records need beside them to be reported without its workdir.
RUN_FILES = ('config.json', 'metrics.jsonl')


@dataclasses.dataclass(frozen=True)
class Store:
  """Where one run's records are kept: its workdir and, with --records, a copy in
  RECORDS/<budget>/<row>/seed<k>/ (the repro_*.json records with the run's config.json and
  metrics.jsonl: a few KB, meant to be committed), so that a sitting on a machine without the
  workdirs skips what is finished. Every record carries the budget's fingerprint (`key`)."""
  workdir: str
  key: str
  mirror: str = None

  def read(self, filename):
    """The record `filename` of this budget from the workdir, else from the copy; None if
    neither has it (ConfigError for one another budget wrote)."""
    for folder in filter(None, (self.workdir, self.mirror)):
      record = _read_cached(os.path.join(folder, filename), self.key)
      if record is not None:
        return record
    return None

  def save(self, filename, record):
    _save(os.path.join(self.workdir, filename), record)
    if self.mirror:
      _save(os.path.join(self.mirror, filename), record)
      for name in RUN_FILES:
        if os.path.exists(os.path.join(self.workdir, name)):
          shutil.copyfile(os.path.join(self.workdir, name), os.path.join(self.mirror, name))


def cached(store, name, fn):
  """fn()'s result (a dict) with the seconds it took and the budget's key, saved as
  repro_<name>.json (`Store.save`); if the store has it, its content without calling fn.
  A result with an 'error' is not saved, so that the next run of the study tries again."""
  result = store.read(f'repro_{name}.json')
  if result is not None:
    return result
  start = time.time()
  result = dict(fn())
  result.update(seconds=time.time() - start, budget_key=store.key)
  if 'error' not in result:
    store.save(f'repro_{name}.json', result)
  return result


def pretrain(config, workdir):
  """Trains (or resumes) one run: its median throughput, final framework loss, images and device."""
  train_lib.train(config, workdir)
  logged = report.read_metrics(workdir)
  return dict(images_per_sec=images_per_sec(logged),
              final_loss=logged[-1].get(f'loss_{config.framework}'),
              images=config.total_steps * config.batch_size, device=device())


def top1(workdir, protocol, run=None, step=None):
  """{'top1': value} of an evaluation protocol at `step` (or on `run`, already loaded), or
  {'error': reason} when it cannot run."""
  try:
    return dict(top1=float(evaluate_lib.evaluate(workdir, protocol, step=step, run=run)['top1']))
  except Exception as e:  # pylint: disable=broad-except  # a missing protocol must not stop it
    return dict(error=_na(e))


def finetune(workdir, fraction, total_steps, step=None, random_init=None):
  """Fine-tunes the run's checkpoint at `step` (or, given the run's config as `random_init`, its
  random-init encoder: the scratch floor) on the `fraction` labelled subset for `total_steps`
  (0: the recipe's); {'top1', 'best_top1', 'steps', 'images', 'step'} or {'error': reason}."""
  options = dict(label_fraction=fraction, **({'total_steps': total_steps} if total_steps else {}))
  try:
    if random_init is not None:
      run = loading.load_run(workdir, random_init=True, config=random_init)
      result = dict(evaluate_lib.PROTOCOLS['finetune'](run, **options), step=0)
    else:
      result = evaluate_lib.evaluate(workdir, 'finetune', step=step, **options)
  except Exception as e:  # pylint: disable=broad-except  # reported as n/a with the reason
    return dict(error=_na(e))
  return dict(top1=float(result['top1']), best_top1=float(result['best_top1']),
              steps=result['steps'], images=result['steps'] * result['batch_size'],
              step=result['step'])


def diagnostic(workdir, name):
  """A diagnostic protocol's summary (`summarise`), or {'error': reason}."""
  try:
    return summarise(evaluate_lib.evaluate(workdir, name))
  except Exception as e:  # pylint: disable=broad-except  # reported as n/a with the reason
    return dict(error=_na(e))


def _counted_finetune(name, steps):
  """Whether part `name` is a fine-tune the compute column counts: the final checkpoint's (a run
  of `steps` steps) or a scratch one, not the curve's fine-tunes of intermediate checkpoints,
  so MAE (the curve row) shows the same fine-tuning compute as the others."""
  return name.startswith('finetune_random_init') or (
      name.startswith('finetune') and name.endswith(f'_step{steps}'))


def _finish(record, parts, store, filename):
  """Adds the parts' failures, compute and seconds to the record; saves it unless a part failed
  (so that a rerun tries the failed part again, reusing the others)."""
  for name, part in parts.items():
    if 'error' in part:
      record['notes'][name] = part['error']
  record['seconds'] = sum(p['seconds'] for p in parts.values())
  record['finetune_images'] = sum(p.get('images', 0) for n, p in parts.items()
                                  if _counted_finetune(n, record.get('steps')))
  if not record['notes']:
    store.save(filename, record)
  return record


def measure(row, seed, budget, store, overrides, with_diagnostics):
  """Trains (or resumes) one run, evaluates and fine-tunes it; returns its record (repro.json),
  every part cached in `store` under the budget's key (`budget_key`)."""
  record = store.read(RECORD)
  if record is not None:
    return dict(record, records=store.mirror)  # where the report finds the run's files
  workdir, key = store.workdir, store.key
  config = build_config(row, overrides)
  total = config.total_steps
  parts = {'pretrain': cached(store, 'pretrain', lambda: pretrain(config, workdir))}

  def trained(fn):
    """fn once the run's final checkpoint is in its workdir. Where only the committed records
    are (another machine), the run is trained again first: same config and seed, so the same
    run up to floating-point differences between machines."""
    def call():
      if not os.path.isdir(os.path.join(workdir, 'checkpoints', str(total))):
        print(f'{workdir}: no checkpoint {total}; training the run again to measure a part '
              'its records lack', flush=True)
        pretrain(config, workdir)
      return fn()
    return call

  record = dict(row=row, label=ROWS[row].label, seed=seed, workdir=workdir, records=store.mirror,
                framework=config.framework, steps=total, notes={}, budget_key=key,
                **{k: parts['pretrain'].get(k) for k in ('images_per_sec', 'final_loss', 'images',
                                                         'device')})
  best_metric = registry.FRAMEWORKS[config.framework].best_metric
  if best_metric:  # held-out evaluation during training (top1 of a classifier) gives the curve
    history = trained(lambda: in_training.read_history(
        workdir, registry.FRAMEWORKS[config.framework]))()
    record['curve'] = [[r['step'], r[best_metric]] for r in history]
    record['test_top1'] = history[-1][best_metric]
  else:
    every = config.checkpoint.every_steps
    steps = range(every, total + 1, every)
    final = []  # the last checkpoint, loaded once so that its kNN and probe share its features

    def final_run():
      if not final:
        final.append(_load_final(workdir))
      return final[0]

    for s in steps:
      parts[f'knn_step{s}'] = cached(store, f'knn_step{s}', trained(lambda s=s: top1(
          workdir, 'knn', run=final_run() if s == total else None, step=s)))
    record['curve'] = [[s, parts[f'knn_step{s}'].get('top1')] for s in steps]
    record['knn'] = record['curve'][-1][1]
    parts['linear'] = cached(store, 'linear', trained(lambda: top1(workdir, 'linear_cached',
                                                                   run=final_run())))
    record['linear'] = parts['linear'].get('top1')
    curve_steps = steps if row == FINETUNE_CURVE_ROW else [total]
    for fraction in budget.label_fractions:
      for s in (curve_steps if fraction == min(budget.label_fractions) else [total]):
        name = f'finetune_labels{fraction:g}_step{s}'
        parts[name] = cached(store, name, trained(lambda f=fraction, s=s: finetune(
            workdir, f, budget.finetune_steps, step=s)))
      final_name = f'finetune_labels{fraction:g}_step{total}'
      record[report.finetune_key(fraction)] = parts[final_name].get('top1')
    if row == FINETUNE_CURVE_ROW:
      fraction = min(budget.label_fractions)
      record['finetune_curve'] = [
          [s, parts[f'finetune_labels{fraction:g}_step{s}'].get('top1')] for s in curve_steps]
  if with_diagnostics:
    for name in ROWS[row].diagnostics:
      parts[f'diagnostic_{name}'] = cached(store, f'diagnostic_{name}',
                                           trained(lambda n=name: diagnostic(workdir, n)))
    record['diagnostics'] = {
        n: {'n/a': parts[f'diagnostic_{n}']['error']} if 'error' in parts[f'diagnostic_{n}']
        else parts[f'diagnostic_{n}'] for n in ROWS[row].diagnostics}
  return _finish(record, parts, store, RECORD)


def _random_init_probes(workdir, config):
  """kNN and linear-probe top-1 of the run's encoder (`config`) at its random init, or
  {'error': reason}."""
  try:
    run = loading.load_run(workdir, random_init=True, config=config)
    return {key: float(evaluate_lib.PROTOCOLS[protocol](run)['top1'])
            for key, protocol in (('knn', 'knn'), ('linear', 'linear_cached'))}
  except Exception as e:  # pylint: disable=broad-except  # reported as n/a with the reason
    return dict(error=_na(e))


def measure_random_init(row, seed, budget, store, overrides):
  """The floors of a pre-training baseline: its encoder freshly initialised from the run's seed,
  evaluated by kNN and the linear probe, and fine-tuned on each labelled subset with the run's
  recipe and budget (scratch); cached as repro_random_init.json. Needs the run's config only."""
  record = store.read(FLOOR_RECORD)
  if record is not None:
    return dict(record, records=store.mirror)
  workdir, key, config = store.workdir, store.key, build_config(row, overrides)
  parts = {'random_init': cached(store, 'random_init_probes',
                                 lambda: _random_init_probes(workdir, config))}
  record = dict(row=row, label='random init', seed=seed, workdir=workdir, records=store.mirror,
                notes={}, budget_key=key,
                knn=parts['random_init'].get('knn'), linear=parts['random_init'].get('linear'))
  for fraction in budget.label_fractions:
    name = f'finetune_random_init_labels{fraction:g}'
    parts[name] = cached(store, name, lambda f=fraction: finetune(
        workdir, f, budget.finetune_steps, random_init=config))
    record[report.finetune_key(fraction)] = parts[name].get('top1')
  return _finish(record, parts, store, FLOOR_RECORD)


def _save(path, record):
  """Writes a record atomically, so an interrupted study never leaves a half-written cache."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
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


def finetune_commands(workdir, budget):
  """The `mimjax.evaluate` commands equivalent to one pre-training run's fine-tunes."""
  steps = f' --total_steps {budget.finetune_steps}' if budget.finetune_steps else ''
  return [f'python -m mimjax.evaluate --workdir {workdir} --protocol finetune '
          f'--label_fraction {fraction:g}{steps} [--step S] [--compare_random_init]'
          for fraction in budget.label_fractions]


def resolve_budget(preset, pretrain_steps=None, finetune_steps=None):
  """(name, Budget) of a preset, with its pre-training and fine-tuning steps replaced where given;
  a changed budget gets its own name (cpu_p3000_f600), so its runs go to their own workdirs."""
  budget = BUDGETS[preset]
  changes = {k: v for k, v in (('steps', pretrain_steps), ('finetune_steps', finetune_steps))
             if v is not None and v != getattr(budget, k)}
  if not changes:
    return preset, budget
  budget = dataclasses.replace(budget, **changes)
  return f'{preset}_p{budget.steps}_f{budget.finetune_steps}', budget


def run_study(mode='cpu', seeds=None, out=None, workdir_root='workdirs/repro',
              methods=None, clip_path=None, argv=(), report_only=False, floor=False,
              pretrain_steps=None, finetune_steps=None, records_root=None):
  """Runs (or resumes) every run the methods need, writes `out` (default: DEFAULT_OUT[mode]);
  returns the records per row.

  `mode` is a preset of BUDGETS; `pretrain_steps` and `finetune_steps` change its steps (the
  floor search). With `floor`, only the MAE row and its floors run (no pair): MAE pre-training +
  fine-tuning against scratch, which the method pairs need to clear first. With `report_only`,
  runs nothing: the report covers the runs that have finished (a stopped study) and lists the
  others as not finished. With `records_root`, every record is also kept there (`Store`).
  """
  name, budget = resolve_budget(mode, pretrain_steps, finetune_steps)
  key = budget_key(budget, clip_path)
  out = out or (f'RESULTS_floor_{name}.md' if floor else DEFAULT_OUT[mode])
  unknown = sorted(set(methods or ()) - set(PAIRS))
  if unknown:
    raise errors.ConfigError(f'Unknown rows {unknown}; choose from {", ".join(PAIRS)}.')
  if floor:
    methods, rows = [], [FINETUNE_CURVE_ROW]
  else:
    methods = [m for m in PAIRS if m in methods] if methods else list(PAIRS)
    rows = plan(methods, clip_path)
  seeds = range(budget.seeds if seeds is None else seeds)
  root = os.path.join(workdir_root, name)
  workdir = lambda row, seed: os.path.join(root, row, f'seed{seed}')  # noqa: E731
  store = lambda row, seed: Store(workdir(row, seed), key, records_root and os.path.join(  # noqa: E731
      records_root, name, row, f'seed{seed}'))
  study_argv = [a for a in argv if a not in ('--report_only', '--noreport_only')]
  commands = [' '.join(['python -m mimjax.reproduce', *map(shlex.quote, study_argv)])]
  commands += [train_command(row, workdir(row, '{SEED}'), row_overrides(
      row, '{SEED}', budget, workdir(TEACHER_ROW, '{SEED}'), clip_path)) for row in rows]
  commands += finetune_commands(workdir('ROW', '{SEED}'), budget)
  records = {row: [] for row in rows}
  floors = {row: [] for row in rows if row in PAIRS.values()}
  unfinished = []
  for seed in seeds:  # seed-major: an interrupted study has whole seeds to report
    for row in rows:
      if report_only and store(row, seed).read(RECORD) is None:
        unfinished.append(f'{row} seed {seed}')
        continue
      print(f'[{row} seed {seed}] {workdir(row, seed)}', flush=True)
      overrides = row_overrides(row, seed, budget, workdir(TEACHER_ROW, seed), clip_path)
      records[row].append(measure(row, seed, budget, store(row, seed), overrides,
                                  seed == seeds[0]))
      if row not in floors or registry.FRAMEWORKS[records[row][-1]['framework']].best_metric:
        continue
      if report_only and store(row, seed).read(FLOOR_RECORD) is None:
        unfinished.append(f'{row} seed {seed} (random init)')
        continue
      floors[row].append(measure_random_init(row, seed, budget, store(row, seed), overrides))
  pairs = [(m, PAIRS[m]) for m in methods if records[m] and records[PAIRS[m]]]
  if not pairs and not (floor and records[FINETUNE_CURVE_ROW]):
    raise errors.ConfigError(f'No pair has a finished run under {root}; run the study first.')
  report.write(out, records, pairs, name, budget, commands, root, floors, unfinished)
  print(f'Wrote {out}')
  return records


def define_flags():
  """Command-line flags (defined only when run as a program, so importing is side-effect free)."""
  flags.DEFINE_enum('preset', 'cpu', list(BUDGETS), 'Budget: cpu (the default), gpu, quick, smoke.')
  flags.DEFINE_bool('quick', False, 'Shorthand for --preset quick.')
  flags.DEFINE_bool('smoke', False, 'Shorthand for --preset smoke (end-to-end tests only).')
  flags.DEFINE_bool('floor', False, 'Only MAE pre-training + fine-tuning against scratch (and its '
                    'fine-tuning curve over pre-training steps): the floor the pairs need first.')
  flags.DEFINE_integer('pretrain_steps', None, 'Pre-training steps instead of the preset\'s '
                       '(the floor search); the runs go to their own workdirs.')
  flags.DEFINE_integer('finetune_steps', None, 'Fine-tuning steps instead of the preset\'s.')
  flags.DEFINE_integer('seeds', None, 'Seeds per row (default: the preset\'s).')
  flags.DEFINE_string('out', None, 'Report path; figures go to <out stem>_figures/. Default: '
                      f'{", ".join(f"{v} ({k})" for k, v in DEFAULT_OUT.items())}, '
                      'RESULTS_floor_<budget>.md with --floor, so a short run never overwrites '
                      'the committed full study.')
  flags.DEFINE_string('workdir_root', 'workdirs/repro', 'Runs go to ROOT/<budget>/<row>/seed<k>.')
  flags.DEFINE_string('records', 'results', 'Every finished part\'s record is also kept in '
                      'RECORDS/<budget>/<row>/seed<k>/ (with the run\'s config.json and '
                      'metrics.jsonl; commit it): a later sitting without the workdirs skips what '
                      'is finished. Empty: workdirs only.')
  flags.DEFINE_list('rows', None, f'Method rows (baselines come along): {", ".join(PAIRS)}.')
  flags.DEFINE_string('clip_path', None, 'Distil from this local CLIP ViT-B/16 checkpoint instead '
                      'of the supervised run (an accelerator job).')
  flags.DEFINE_bool('report_only', False, 'Run nothing: write the report from the runs that have '
                    'finished, listing the others (for a study stopped part-way).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  shorthands = [name for name in ('quick', 'smoke') if f[name].value]
  if len(shorthands) + f['preset'].present > 1:
    raise app.UsageError('--quick, --smoke and --preset exclude each other.')
  if not f['verbosity'].present:  # TFDS and Orbax are chatty at INFO
    logging.set_verbosity(logging.WARNING)
  mode = shorthands[0] if shorthands else f.preset
  with errors.reported():  # a refused budget or cached part: one `error:` line, no traceback
    run_study(mode, f.seeds, f.out, f.workdir_root, f.rows, f.clip_path, sys.argv[1:],
              f.report_only, f.floor, f.pretrain_steps, f.finetune_steps, f.records or None)
