"""RESULTS.md of the reproduction study: aggregation over seeds, the table, curves and findings.

Works on the runs' records (dicts written by `mimjax.reproduce.study.measure`: row, label, seed,
workdir, framework, final_loss, images_per_sec, curve, knn / linear / test_top1, fine-tuning top-1
per labelled fraction (`finetune_key`), finetune_curve, images, finetune_images, seconds, device,
notes, diagnostics), so every number a report states can be checked against hand-worked values.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import shutil

import numpy as np

from mimjax import config_lib
from mimjax import registry
from mimjax.eval import rauc as rauc_lib

# The headline metric of a pair, the first that all its runs have: fine-tuning top-1 on the
# smallest labelled subset (then the larger ones), probe, kNN, then test top-1.
MAIN_METRICS = ('linear', 'knn', 'test_top1')
FINETUNE_PREFIX = 'finetune_top1@'
# RAUC divides by the baseline's rise above its first point; below this mean rise (in top-1, over
# the curve's steps) that divisor is the size of one evaluation's noise and the ratio means nothing.
MIN_BASELINE_RISE = 0.01
# A hand-written discussion between these lines of an existing report survives regeneration.
DISCUSSION_BEGIN = '<!-- discussion: hand-written, kept when the report is regenerated -->'
DISCUSSION_END = '<!-- end of discussion -->'
METRIC_NAMES = {'knn': 'kNN top-1', 'linear': 'linear-probe top-1', 'test_top1': 'test top-1'}


def finetune_key(fraction):
  """The record key of fine-tuning top-1 on the `fraction` labelled subset: 'finetune_top1@0.01'."""
  return f'{FINETUNE_PREFIX}{fraction:g}'


def finetune_keys(records):
  """The fine-tuning keys that any of `records` has, smallest labelled fraction first."""
  keys = {k for r in records for k in r if k.startswith(FINETUNE_PREFIX)}
  return sorted(keys, key=lambda k: float(k[len(FINETUNE_PREFIX):]))


def metric_name(key):
  """'fine-tune top-1 (1% labels)', 'kNN top-1', ..."""
  if key.startswith(FINETUNE_PREFIX):
    return f'fine-tune top-1 ({float(key[len(FINETUNE_PREFIX):]) * 100:g}% labels)'
  return METRIC_NAMES[key]


def run_dir(record):
  """Where a run's config.json and metrics.jsonl are: its workdir, or the copy the study keeps with
  its records (`study.Store`) when the workdir is not on this machine."""
  workdir, copy = record['workdir'], record.get('records')
  return copy if copy and not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else workdir


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def mean_spread(values):
  """(mean, sample standard deviation or None below 2 values, count) of the non-None values."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  spread = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), spread, len(values)


def seed_deltas(baseline, method):
  """method - baseline per seed, over the seeds both have, in seed order; args map seed -> value."""
  return [method[s] - baseline[s] for s in sorted(method)
          if baseline.get(s) is not None and method[s] is not None]


def paired_delta(baseline, method):
  """mean_spread of method - baseline over the seeds both have; args map seed -> value."""
  return mean_spread(seed_deltas(baseline, method))


def verdict(deltas):
  """One phrase on the seed-wise differences (method - baseline) of a pair's headline metric.

  With a handful of seeds no test has power, so this says only whether the sign is the same on
  every seed; the caveat under the findings says how little that proves with two seeds.
  """
  if not deltas:
    return 'not measured'
  if len(deltas) == 1:
    side = 'above' if deltas[0] > 0 else 'below' if deltas[0] < 0 else 'equal to'
    return f'{side} the baseline on one seed only: no spread to judge it against'
  per_seed = ', '.join(f'{d * 100:+.1f}' for d in deltas)
  if all(d > 0 for d in deltas):
    return f'above the baseline on every seed (Δ per seed {per_seed} pp)'
  if all(d < 0 for d in deltas):
    return f'below the baseline on every seed (Δ per seed {per_seed} pp)'
  return f'no consistent direction over seeds (Δ per seed {per_seed} pp)'


def by_seed(records, key):
  return {r['seed']: r.get(key) for r in records}


def main_metric(base, method):
  """The first fine-tuning key, then of MAIN_METRICS, that every run of both rows has, or None."""
  for metric in (*finetune_keys(base + method), *MAIN_METRICS):
    if all(r.get(metric) is not None for r in base + method):
      return metric
  return None


def baseline_rise(steps, values):
  """Mean rise of a curve above its first value over its steps: RAUC's divisor per step."""
  steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
  gain = values - values[0]
  return float(np.sum((gain[1:] + gain[:-1]) * np.diff(steps)) / 2 / (steps[-1] - steps[0]))


def with_start(curve, start):
  """The curve with (0, start) in front. A pre-training run's step-0 encoder is its random init,
  and a method's is its baseline's (tested), so the baseline's random-init kNN starts both curves.
  A `start` of None, or a curve that already has step 0, leaves the curve as it is."""
  if start is None or not curve or curve[0][0] == 0:
    return curve
  return [[0, start], *curve]


def pair_rauc(base, method, floor=None):
  """mean_spread over seeds of the RAUC (MTO eq. 6) of the method's curve over the baseline's,
  from the first to the last step of the curve. With `floor` (the baseline's random-init records)
  both curves start at step 0 from the same seed's random-init kNN, so the divisor is what
  pre-training gains over a random encoder. Undefined for a seed whose baseline curve rises less
  than MIN_BASELINE_RISE (the ratio would be one evaluation's noise over another's)."""
  curves = {r['seed']: r['curve'] for r in base}
  starts = by_seed(floor or [], 'knn')
  values = []
  for r in method:
    b = curves.get(r['seed'])
    if not b or any(v is None for _, v in b + r['curve']):
      continue
    b, m = (with_start(c, starts.get(r['seed'])) for c in (b, r['curve']))
    if len(b) < 2:
      continue
    (s1, v1), (s2, v2) = zip(*b), zip(*m)
    if baseline_rise(s1, v1) < MIN_BASELINE_RISE:
      continue
    try:
      values.append(rauc_lib.rauc(s1, v1, s2, v2, s1[0], s1[-1]))
    except ValueError:  # curves that do not overlap
      continue
  return mean_spread(values)


def fmt(mean, spread, n, scale=100.0, digits=1):
  """'74.1 ± 1.2', '50.0 (n=1)' or 'n/a'; accuracies are shown in percent by default."""
  if mean is None:
    return 'n/a'
  text = f'{mean * scale:.{digits}f}'
  if spread is not None:
    text += f' ± {spread * scale:.{digits}f}'
  return text + (' (n=1)' if n == 1 else '')


def step_ms(images_per_sec, batch_size):
  """Training step time in milliseconds from a throughput, or None without one."""
  return 1000.0 * batch_size / images_per_sec if images_per_sec else None


def table(records, pairs, floors=None, batch_size=None):
  """Markdown table: per pair its baseline, the baseline's randomly initialised encoder (from
  `floors`, row -> records, where measured), then the method; mean ± spread over seeds."""
  lines = ['| pair | run | seeds | final loss | kNN top-1 (%) | linear top-1 (%) | '
           'test top-1 (%) | Δ vs baseline (pp) | RAUC | images/s | step (ms) |',
           '|' + '---|' * 11]
  for method, base in pairs:
    metric = main_metric(records[base], records[method])
    for row in (base, method):
      rs = records[row]
      cells = [method, rs[0]['label'], str(len(rs)),
               fmt(*mean_spread([r['final_loss'] for r in rs]), scale=1.0, digits=4)]
      cells += [fmt(*mean_spread([r.get(k) for r in rs])) if any(k in r for r in rs) else '—'
                for k in ('knn', 'linear', 'test_top1')]
      if row == base:
        cells += ['—', '—']
      elif metric is None:
        cells += ['n/a', 'n/a']
      else:
        delta = paired_delta(by_seed(records[base], metric), by_seed(rs, metric))
        cells += [f'{fmt(*delta)} ({metric_name(metric)})',
                  fmt(*pair_rauc(records[base], rs, (floors or {}).get(base)), scale=1.0,
                      digits=2)]
      cells.append(fmt(*mean_spread([r['images_per_sec'] for r in rs]), scale=1.0, digits=0))
      cells.append(fmt(*mean_spread([step_ms(r['images_per_sec'], batch_size) for r in rs]),
                       scale=1.0, digits=0) if batch_size else '—')
      lines.append('| ' + ' | '.join(cells) + ' |')
      floor = (floors or {}).get(row)
      if floor:
        lines.append('| ' + ' | '.join(
            [method, f'({floor[0]["label"]})', str(len(floor)), '—',
             *(fmt(*mean_spread([r.get(k) for r in floor])) for k in ('knn', 'linear')),
             '—', '—', '—', '—', '—']) + ' |')
  return '\n'.join(lines)


def floor_text(base, floor):
  """'; pre-training itself: kNN 72.9 vs 74.0 ...' comparing a baseline with its random init."""
  if not floor:
    return ''
  parts = []
  for key in (*finetune_keys(base + floor), 'knn', 'linear'):
    if all(r.get(key) is not None for r in base + floor):
      mean, spread, n = paired_delta(by_seed(floor, key), by_seed(base, key))
      parts.append(f'{metric_name(key)} Δ {fmt(mean, spread, n)} pp')
  return ('; the baseline over its randomly initialised encoder: ' + ', '.join(parts)
          if parts else '')


def findings(records, pairs, floors=None):
  """'What this shows': one generated sentence per pair."""
  out = []
  for method, base in pairs:
    label, base_label = records[method][0]['label'], records[base][0]['label']
    metric = main_metric(records[base], records[method])
    if metric is None:
      out.append(f'- **{label}** vs {base_label}: no accuracy was measured.')
      continue
    deltas = seed_deltas(by_seed(records[base], metric), by_seed(records[method], metric))
    mean, spread, n = mean_spread(deltas)
    r_mean, _, r_n = pair_rauc(records[base], records[method], (floors or {}).get(base))
    rauc_text = (f'; RAUC {r_mean:.2f} ({"above" if r_mean > 1 else "not above"} 1: '
                 f'{"faster" if r_mean > 1 else "not faster"} than the baseline along the curve)'
                 if r_n else '')
    values = [fmt(*mean_spread(by_seed(records[r], metric).values())) for r in (method, base)]
    out.append(f'- **{label}** vs {base_label}: {metric_name(metric)} {values[0]} vs '
               f'{values[1]}, paired Δ {fmt(mean, spread, n)} pp over {n} seed(s): '
               f'{verdict(deltas)}{rauc_text}'
               f'{floor_text(records[base], (floors or {}).get(base))}.')
  return '\n'.join(out)


def beyond_spread(base, method):
  """True when the method is above the baseline on every seed they share and its mean paired gain
  exceeds both rows' seed spread (sample std): the floor test. Args map seed -> value."""
  deltas = seed_deltas(base, method)
  if len(deltas) < 2 or not all(d > 0 for d in deltas):
    return False
  spreads = [mean_spread(v.values())[1] for v in (base, method)]
  return mean_spread(deltas)[0] > max(s or 0.0 for s in spreads)


def delta_text(base, method, key):
  """'4.5 ± 0.7 (+5.0, +4.0)': method - baseline in pp, mean ± std, then each seed's; '—' if
  no seed has both."""
  deltas = seed_deltas(by_seed(base, key), by_seed(method, key))
  if not deltas:
    return '—'
  return f'{fmt(*mean_spread(deltas))} ({", ".join(f"{d * 100:+.1f}" for d in deltas)})'


def finetune_table(records, groups, floors):
  """The headline table: per group (method or None, baseline) the baseline's scratch floor (its
  random init fine-tuned, from `floors`), the baseline and the method; per labelled fraction the
  fine-tuning top-1 (mean ± std over seeds) and the paired Δ with its per-seed values (baseline vs
  scratch, method vs baseline); then the compute of one seed and the wall time of all seeds."""
  keys = finetune_keys([r for rs in (*records.values(), *floors.values()) for r in rs])
  head = ['pair', 'run', 'seeds']
  for key in keys:
    share = metric_name(key).split('(')[1].rstrip(')')
    head += [f'top-1, {share} (%)', f'Δ, {share} (pp; per seed)']
  head += ['pre-training steps', 'images seen per seed (pre-train + fine-tune)', 'wall time (h)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for method, base in groups:
    if not finetune_keys(records[base] + (records[method] if method else [])):
      continue  # supervised pairs are not fine-tuned: their test top-1 is in the secondary table
    name = method or base
    scratch = floors.get(base, [])
    runs = [(scratch, 'scratch (random init, fine-tuned)', None), (records[base], None, scratch)]
    if method:
      runs.append((records[method], None, records[base]))
    for rs, label, reference in runs:
      if not rs:
        continue
      cells = [name, label or rs[0]['label'], str(len(rs))]
      for key in keys:
        cells.append(fmt(*mean_spread([r.get(key) for r in rs])))
        cells.append(delta_text(reference, rs, key) if reference else '—')
      steps = 0 if reference is None else rs[0]['steps']
      pre, fine = (mean_spread([r.get(k) or 0 for r in rs])[0] for k in ('images',
                                                                          'finetune_images'))
      cells += [str(steps), f'{pre:,.0f} + {fine:,.0f}',
                f'{sum(r["seconds"] for r in rs) / 3600:.2f}']
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def floor_findings(records, groups, floors):
  """One sentence per baseline: does pre-training + fine-tuning clear scratch beyond the spread?"""
  out = []
  for base in dict.fromkeys(b for _, b in groups):
    scratch = floors.get(base, [])
    for key in finetune_keys(records[base] + scratch):
      b, m = by_seed(scratch, key), by_seed(records[base], key)
      deltas = seed_deltas(b, m)
      if not deltas:
        continue
      clears = beyond_spread(b, m)
      out.append(f'- **{records[base][0]["label"]}** vs scratch, {metric_name(key)}: '
                 f'{fmt(*mean_spread(m.values()))} vs {fmt(*mean_spread(b.values()))}, paired Δ '
                 f'{fmt(*mean_spread(deltas))} pp: {verdict(deltas)}; '
                 f'{"beyond" if clears else "not beyond"} the seeds\' spread.')
  return '\n'.join(out) or '- no fine-tuning was measured.'


def finetune_curve(records, floors, row):
  """(fraction key, [(step, mean, std, n)]) of the row's fine-tuning top-1 against pre-training
  steps, starting at step 0 with its scratch floor; None when the row has no curve."""
  rs = [r for r in records.get(row, []) if r.get('finetune_curve')]
  if not rs:
    return None
  key = finetune_keys(rs)[0]
  points = {0: [r.get(key) for r in floors.get(row, [])]}
  for r in rs:
    for step, value in r['finetune_curve']:
      points.setdefault(step, []).append(value)
  return key, [(step, *mean_spread(values)) for step, values in sorted(points.items())
               if mean_spread(values)[2]]


def plot_finetune_curve(curve, label, figures_dir):
  """Fine-tuning top-1 (mean ± std over seeds) against pre-training steps; returns the PNG path."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  # pylint: enable=g-import-not-at-top
  key, points = curve
  steps, means, spreads, _ = zip(*points)
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.errorbar(steps, [m * 100 for m in means], yerr=[(s or 0) * 100 for s in spreads],
              marker='o', capsize=3)
  ax.set(xlabel=f'{label} pre-training steps (0 = scratch)', ylabel=f'{metric_name(key)} (%)',
         title='fine-tuning top-1 vs pre-training')
  fig.tight_layout()
  path = os.path.join(figures_dir, 'finetune_vs_pretraining.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def curve_section(records, floors, figures_dir, results_dir):
  """The fine-tuning-vs-pre-training curve of the row that has one: its points and its plot."""
  for row, rs in records.items():
    curve = finetune_curve(records, floors, row)
    if curve is None:
      continue
    path = plot_finetune_curve(curve, rs[0]['label'], figures_dir)
    points = ', '.join(f'{step}: {fmt(m, s, n)}' for step, m, s, n in curve[1])
    return (f'{rs[0]["label"]}, {metric_name(curve[0])} by pre-training step (step 0: scratch): '
            f'{points}.\n\n![finetune_vs_pretraining]({os.path.relpath(path, results_dir)})')
  return 'No row fine-tuned intermediate checkpoints.'


def devices(records):
  """The devices the runs trained on, each once ('unknown' for records that predate the field)."""
  found = dict.fromkeys(r.get('device') or 'unknown' for rs in records.values() for r in rs)
  return ', '.join(found) or 'none'


def plot_pair(method, base, records, figures_dir):
  """Framework-loss and accuracy curves of a pair, one line per run; returns the PNG's path."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  # pylint: enable=g-import-not-at-top
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
  framework = records[method][0]['framework']
  key = f'loss_{framework}'
  for colour, row in (('tab:blue', base), ('tab:orange', method)):
    for i, r in enumerate(records[row]):
      style = dict(color=colour, alpha=1.0 if i == 0 else 0.5,
                   label=r['label'] if i == 0 else None)
      logged = [m for m in read_metrics(run_dir(r)) if key in m]
      ax_loss.plot([m['step'] for m in logged], [m[key] for m in logged], **style)
      points = [(s, v) for s, v in r['curve'] if v is not None]
      if points:
        ax_acc.plot(*zip(*points), marker='o', **style)
  ax_loss.set(xlabel='step', ylabel=key, title='training loss (framework term)')
  held_out = registry.FRAMEWORKS[framework].best_metric  # evaluated during training
  ax_acc.set(xlabel='step', ylabel='top-1',
             title='test top-1' if held_out else 'kNN top-1 on the test split')
  ax_loss.legend()
  fig.tight_layout()
  path = os.path.join(figures_dir, f'{method}.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def versions():
  found = []
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow',
                  'tensorflow-cpu', 'tensorflow-datasets', 'matplotlib'):
    try:
      found.append(f'{package} {importlib.metadata.version(package)}')
    except importlib.metadata.PackageNotFoundError:
      continue
  return (f'Python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs; '
          + ', '.join(found))


def diagnostics_section(records, figures_dir, results_dir):
  lines = []
  for row, rs in records.items():
    for name, diag in rs[0].get('diagnostics', {}).items():
      head = f'- {rs[0]["label"]}, {name} (seed {rs[0]["seed"]})'
      if 'n/a' in diag:
        lines.append(f'{head}: n/a ({diag["n/a"]})')
        continue
      numbers = '; '.join(f'{k}: {v}' for k, v in diag['numbers'].items()) or 'figure below'
      lines.append(f'{head}: {numbers}')
      for figure in diag['figures']:
        target = os.path.join(figures_dir, f'{row}_{os.path.basename(figure)}')
        if os.path.exists(figure):  # else the workdir is elsewhere: keep an earlier report's copy
          shutil.copyfile(figure, target)
        if os.path.exists(target):
          lines.append(f'  ![{row} {name}]({os.path.relpath(target, results_dir)})')
  return '\n'.join(lines) or '- none were run.'


def notes_section(records, floors):
  runs = [r for group in (records, floors) for rs in group.values() for r in rs]
  lines = [f'- {r["row"]} {r["label"]}, seed {r["seed"]}: {k} n/a ({v})'
           for r in runs for k, v in r['notes'].items()]
  return '\n'.join(lines) or '- none.'


def discussion(out):
  """The hand-written discussion of an existing report at `out`, markers included, or empty
  markers under a heading for a new one (so regenerating the numbers keeps the analysis)."""
  kept = ''
  if os.path.exists(out):
    with open(out) as f:
      text = f.read()
    begin, end = text.find(DISCUSSION_BEGIN), text.find(DISCUSSION_END)
    if 0 <= begin < end:
      kept = text[begin + len(DISCUSSION_BEGIN):end].strip()
  return f'## Discussion\n\n{DISCUSSION_BEGIN}\n{kept}\n{DISCUSSION_END}'


def write(out, records, pairs, mode, budget, commands, root, floors=None, unfinished=()):
  """Writes the report to `out` and its figures to <out stem>_figures/.

  `pairs` are (method, baseline) rows; without any (the floor stage) the report covers each row
  against its floors alone. `budget` is the study's `Budget`; `floors` maps baseline rows to the
  records of their randomly initialised encoders (kNN, probe and scratch fine-tuning);
  `unfinished` names the runs of a stopped study that the report lacks.
  """
  floors = floors or {}
  groups = pairs or [(None, row) for row, rs in records.items() if rs]
  status = (f'\n**Incomplete:** the study was stopped before these runs finished: '
            f'{", ".join(unfinished)}. Rows lacking a seed are averaged over the seeds they '
            f'have (see the seeds column); rerunning the command finishes them.\n'
            if unfinished else '')
  results_dir = os.path.dirname(os.path.abspath(out))
  figures_dir = os.path.splitext(os.path.abspath(out))[0] + '_figures'
  os.makedirs(figures_dir, exist_ok=True)
  plots = [(m, plot_pair(m, b, records, figures_dir)) for m, b in pairs]
  config = config_lib.read_config(run_dir(records[groups[0][1]][0]))
  seeds = sorted({r['seed'] for rs in records.values() for r in rs})
  run_commands = '\n'.join(commands[1:])
  seconds = sum(r['seconds'] for group in (records, floors) for rs in group.values() for r in rs)
  fractions = ', '.join(f'{f * 100:g}%' for f in budget.label_fractions)
  finetune_steps = budget.finetune_steps or 'the recipe\'s'
  spread_caveat = ("With one seed there is no spread: any difference may be seed noise."
                   if len(seeds) < 2 else
                   f"With {len(seeds)} seeds the spread is a rough estimate and 'on every seed' "
                   f"is weak evidence: a method with no effect is on the same side of its "
                   f"baseline on all {len(seeds)} seeds with probability "
                   f"{2 * 0.5 ** len(seeds):.2g}.")
  secondary = (table(records, pairs, floors, config.batch_size) if pairs else
               'The floor stage runs no pair; the baseline against its random init:\n\n'
               + '\n'.join(f'- {records[b][0]["label"]}{floor_text(records[b], floors.get(b))}.'
                           for _, b in groups))
  text = f"""# Small-scale reproduction study ({mode})

Generated {datetime.datetime.now().isoformat(timespec='minutes')} by `{commands[0]}`.
{status}
Setup: Fashion-MNIST at {config.data.image_size} px, ViT `{config.model.variant}`; pre-training
(without labels) on `{config.data.train_split}` for {budget.steps} steps at batch
{config.batch_size}, seeds {seeds}. Each pre-trained encoder is fine-tuned with its method's own
recipe (configs/finetune.py) for {finetune_steps} steps on class-stratified labelled subsets of
`{config.data.train_split}` ({fractions}: the same number of images of every class, drawn from the
seed; both members of a pair and the scratch floor see the same labels) and evaluated on
`{config.data.eval_split}`. Scratch is the same fine-tuning (model, recipe, labels, steps) from the
random initialisation. Device: {devices(records)}. Wall time of training, fine-tuning and
evaluation, summed over runs: {seconds / 3600:.2f} h.

## Fine-tuning top-1 (the headline)

Values are mean ± sample standard deviation over seeds; Δ is the paired difference on the same
seed in percentage points (the baseline against scratch, the method against the baseline), mean ±
std, then each seed's value.

{finetune_table(records, groups, floors)}

{floor_findings(records, groups, floors)}

## Fine-tuning top-1 against pre-training steps

{curve_section(records, floors, figures_dir, results_dir)}

## Secondary: frozen features and supervised runs

kNN memory `{config.data.train_split}`; probe on `{config.eval.linear.train_split}`. Δ is the
method minus its baseline on the pair's headline metric (fine-tuning where both have it). RAUC is
MTO's eq. 6 over the accuracy curve (kNN at {budget.curve_points} checkpoints for pre-training,
starting at step 0 from the baseline's random-init kNN, which is also the method's step-0 encoder;
test top-1 at {budget.curve_points} evaluations for supervised runs); above 1 means the method's
curve gains more over the baseline's start than the baseline does; n/a where the baseline's curve
rises less than {MIN_BASELINE_RISE * 100:.0f} pp on average above its first point. "(random init)"
rows evaluate the baseline's encoder freshly initialised from the same seed. Final loss is the
framework's own term (`loss_<framework>`, shared by both members of a pair). Images/s is the
median logged training throughput and step the time of one training step at that throughput.

{secondary}

## What this shows

{findings(records, pairs, floors) if pairs else '- The floor stage: see under the headline table.'}

{discussion(out)}

## What this does not show

These are {budget.steps}-step runs of a small ViT on 28-pixel grey images with {len(seeds)}
seed(s), each method on its `runlocal` recipe without per-method tuning. A method that does not
beat its baseline here may still help at the papers' scale (ImageNet, ViT-B, hundreds of epochs);
a win here is no evidence that the published ImageNet gains reproduce. {spread_caveat}

## Loss and accuracy curves

{chr(10).join(f'![{m}]({os.path.relpath(p, results_dir)})' for m, p in plots) or 'No pair.'}

## Diagnostics (first seed)

{diagnostics_section(records, figures_dir, results_dir)}

## Evaluations that could not run

{notes_section(records, floors)}

## Commands

The study: `{commands[0]}`. Runs are cached under `{root}`; every finished part (pre-training,
each evaluation, each fine-tune) has its `repro_*.json` in the run's workdir (and, with the
default `--records results`, a copy under `results/<budget>/`, committed with this report) and is
skipped by a rerun; delete one (both copies) to measure it again. Each run is equivalent to

```
{run_commands}
```

followed by `python -m mimjax.evaluate --workdir WORKDIR --protocol knn --step S` at the curve
steps and `--protocol linear_cached`.

## Versions

{versions()}
"""
  with open(out, 'w') as f:
    f.write(text)
