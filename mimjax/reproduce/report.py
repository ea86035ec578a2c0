"""RESULTS.md of the reproduction study: aggregation over seeds, the table, curves and findings.

Works on the runs' records (dicts written by `mimjax.reproduce.study.measure`: row, label, seed,
workdir, framework, final_loss, images_per_sec, curve, knn / linear / test_top1, notes,
diagnostics), so every number a report states can be checked against hand-worked values.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import shutil

import numpy as np

from mimjax import registry
from mimjax import workdir as workdir_lib
from mimjax.eval import rauc as rauc_lib

# The headline metric of a pair, the first that all its runs have: probe, kNN, then test top-1.
MAIN_METRICS = ('linear', 'knn', 'test_top1')
# RAUC divides by the baseline's rise above its first point; below this mean rise (in top-1, over
# the curve's steps) that divisor is the size of one evaluation's noise and the ratio means nothing.
MIN_BASELINE_RISE = 0.01
# A hand-written discussion between these lines of an existing report survives regeneration.
DISCUSSION_BEGIN = '<!-- discussion: hand-written, kept when the report is regenerated -->'
DISCUSSION_END = '<!-- end of discussion -->'
METRIC_NAMES = {'knn': 'kNN top-1', 'linear': 'linear-probe top-1', 'test_top1': 'test top-1'}


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
  """The first of MAIN_METRICS that every run of both rows has, or None."""
  for metric in MAIN_METRICS:
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
        cells += [f'{fmt(*delta)} ({METRIC_NAMES[metric]})',
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
  for key in ('knn', 'linear'):
    if all(r.get(key) is not None for r in base + floor):
      mean, spread, n = paired_delta(by_seed(floor, key), by_seed(base, key))
      parts.append(f'{METRIC_NAMES[key]} Δ {fmt(mean, spread, n)} pp')
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
    out.append(f'- **{label}** vs {base_label}: {METRIC_NAMES[metric]} {values[0]} vs '
               f'{values[1]}, paired Δ {fmt(mean, spread, n)} pp over {n} seed(s): '
               f'{verdict(deltas)}{rauc_text}'
               f'{floor_text(records[base], (floors or {}).get(base))}.')
  return '\n'.join(out)


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
      logged = [m for m in read_metrics(r['workdir']) if key in m]
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
        shutil.copyfile(figure, target)
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


def write(out, records, pairs, mode, steps, curve_points, commands, root, floors=None,
          unfinished=()):
  """Writes the report to `out` and its figures to <out stem>_figures/; `floors` maps baseline
  rows to the records of their randomly initialised encoders, `unfinished` names the runs of a
  stopped study that the report lacks."""
  floors = floors or {}
  status = (f'\n**Incomplete:** the study was stopped before these runs finished: '
            f'{", ".join(unfinished)}. Rows lacking a seed are averaged over the seeds they '
            f'have (see the seeds column); rerunning the command finishes them.\n'
            if unfinished else '')
  results_dir = os.path.dirname(os.path.abspath(out))
  figures_dir = os.path.splitext(os.path.abspath(out))[0] + '_figures'
  os.makedirs(figures_dir, exist_ok=True)
  plots = [(m, plot_pair(m, b, records, figures_dir)) for m, b in pairs]
  config = workdir_lib.read_config(records[pairs[0][0]][0]['workdir'])
  seeds = sorted({r['seed'] for rs in records.values() for r in rs})
  run_commands = '\n'.join(commands[1:])
  seconds = sum(r['seconds'] for group in (records, floors) for rs in group.values() for r in rs)
  spread_caveat = ("With one seed there is no spread: any difference may be seed noise."
                   if len(seeds) < 2 else
                   f"With {len(seeds)} seeds the spread is a rough estimate and 'on every seed' "
                   f"is weak evidence: a method with no effect is on the same side of its "
                   f"baseline on all {len(seeds)} seeds with probability "
                   f"{2 * 0.5 ** len(seeds):.2g}.")
  text = f"""# Small-scale reproduction study ({mode})

Generated {datetime.datetime.now().isoformat(timespec='minutes')} by `{commands[0]}`.
{status}
Setup: Fashion-MNIST at {config.data.image_size} px, ViT `{config.model.variant}`; pre-training,
kNN memory and probe training on `{config.data.train_split}`, evaluation on
`{config.data.eval_split}`; every run {steps} steps at batch {config.batch_size}, seeds {seeds}.
Within a pair the model, data, budget and seeds are identical. Values are mean ± sample standard
deviation over seeds. Δ is the method minus its baseline on the same seed, averaged, in
percentage points. RAUC is MTO's eq. 6 over the accuracy curve (kNN at {curve_points} checkpoints
for pre-training, starting at step 0 from the baseline's random-init kNN, which is also the
method's step-0 encoder; test top-1 at {curve_points} evaluations for supervised runs); above 1
means the method's curve gains more over the baseline's start than the baseline does; n/a where
the baseline's curve rises less than {MIN_BASELINE_RISE * 100:.0f} pp on average above its first
point (the ratio would divide by evaluation noise). "(random init)" rows evaluate the baseline's
encoder freshly initialised from the same seed: the floor pre-training has to clear. Final loss
is the framework's own term (`loss_<framework>`, which both members of a pair share; method terms
excluded). Images/s is the median logged training throughput and step the time of one training
step at that throughput. Wall time of training and evaluation, summed over runs:
{seconds / 3600:.2f} h.

{table(records, pairs, floors, config.batch_size)}

## What this shows

{findings(records, pairs, floors)}

{discussion(out)}

## What this does not show

These are {steps}-step runs of a tiny ViT on 28-pixel grey images with {len(seeds)} seed(s), each
method on its `runlocal` recipe without per-method tuning. A method that does not beat its
baseline here may still help at the papers' scale (ImageNet, ViT-B, hundreds of epochs, and
fine-tuning, which this study does not run); a win here is no evidence that the published
ImageNet gains reproduce. {spread_caveat}

## Loss and accuracy curves

{chr(10).join(f'![{m}]({os.path.relpath(p, results_dir)})' for m, p in plots)}

## Diagnostics (first seed)

{diagnostics_section(records, figures_dir, results_dir)}

## Evaluations that could not run

{notes_section(records, floors)}

## Commands

The study: `{commands[0]}`. Runs are cached under `{root}`; delete a run's `repro.json` to
evaluate it again. Each run is equivalent to

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
