"""RAUC, the relative area under the curve of MTO (eq. 6), between two runs' metric curves.

  RAUC(S1, S2; E1, E2) = int_E1^E2 (S2(E) - S1(E1)) dE / int_E1^E2 (S1(E) - S1(E1)) dE

S1 is the baseline and S2 the run compared with it; both curves are read as piecewise linear
between their recorded points, so the trapezoidal rule over the union of the points is exact.
Above 1: S2 gains more over S1's starting value than S1 does.
"""

import numpy as np

from mimjax import config_lib
from mimjax import errors
from mimjax import workdir_io


def _integral(x, y):
  return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def rauc(steps1, values1, steps2, values2, e1, e2):
  """RAUC of curve 2 over baseline curve 1 on [e1, e2]; both must cover [e1, e2]."""
  steps1, values1, steps2, values2 = (np.asarray(a, np.float64)
                                      for a in (steps1, values1, steps2, values2))
  for name, s in (('baseline', steps1), ('compared', steps2)):
    if not e1 < e2 or s.min() > e1 or s.max() < e2:
      raise ValueError(f'the {name} curve covers steps [{s.min()}, {s.max()}], which does not '
                       f'contain [E1, E2] = [{e1}, {e2}].')
  grid = np.unique(np.concatenate([[e1, e2], steps1, steps2]))
  grid = grid[(grid >= e1) & (grid <= e2)]
  s1, s2 = np.interp(grid, steps1, values1), np.interp(grid, steps2, values2)
  start = np.interp(e1, steps1, values1)
  return _integral(grid, s2 - start) / _integral(grid, s1 - start)


def read_records(workdir):
  """The metrics of WORKDIR/metrics.jsonl merged by step (a resumed run rewrites later steps)."""
  path = workdir_io.path(workdir, 'metrics.jsonl')
  if not path.exists():
    raise errors.ConfigError(f'{path} does not exist: RAUC reads the curves of two '
                             'mimjax.train workdirs.')
  records = {}
  for record in workdir_io.read_jsonl(path):
    records.setdefault(int(record['step']), {}).update(record)
  return records


def read_curve(records, metric, workdir):
  """(steps, values) of `metric` in `records` (from `read_records(workdir)`)."""
  points = {step: float(r[metric]) for step, r in records.items() if metric in r}
  if len(points) < 2:
    raise errors.ConfigError(f'{workdir}/metrics.jsonl has {len(points)} values of {metric!r}; '
                             'RAUC needs a curve (choose --metric).')
  steps = sorted(points)
  return np.asarray(steps), np.asarray([points[s] for s in steps])


def objective_terms(records):
  """The loss terms a run logged (keys 'loss_*': the framework's, each plug-in's)."""
  return {k for r in records.values() for k in r if k.startswith('loss_')}


def check_shared(metric, records, other_records, workdir, other_workdir):
  """Raises ConfigError unless `metric` measures the same thing in both runs: a metric only one
  run logs, or the total `loss` of runs whose objectives have different terms, is refused."""
  terms, other_terms = objective_terms(records), objective_terms(other_records)
  if metric == 'loss' and terms != other_terms:
    raise errors.ConfigError(
        f'--metric loss compares total objectives with different terms ({workdir}: '
        f'{sorted(terms)}; {other_workdir}: {sorted(other_terms)}); compare a term both share, '
        f'e.g. --metric {sorted(terms & other_terms)[0] if terms & other_terms else "eval_top1"}.')
  has = [any(metric in r for r in recs.values()) for recs in (records, other_records)]
  if has[0] != has[1]:
    only, lacking = (workdir, other_workdir) if has[0] else (other_workdir, workdir)
    raise errors.ConfigError(f'--metric {metric}: only {only} logs it ({lacking} does not), so '
                             'the curves do not measure the same thing; choose a metric both '
                             'runs log.')


def default_metric(workdir, other_workdir):
  """The base loss of the framework both runs share (loss_<framework>)."""
  frameworks = {w: config_lib.read_config(w).framework for w in (workdir, other_workdir)}
  if len(set(frameworks.values())) > 1:
    raise errors.ConfigError(f'the runs use different frameworks ({frameworks}); choose a '
                             'metric both log with --metric (e.g. eval_top1).')
  return f'loss_{frameworks[workdir]}'


def protocol(workdir, other_workdir=None, metric=None, e1=None, e2=None):
  """RAUC of WORKDIR's `metric` curve (default: the shared framework's own loss term) over the
  baseline OTHER_WORKDIR's, on [e1, e2] steps (default: the range both curves cover)."""
  if not other_workdir:
    raise errors.ConfigError('protocol rauc needs --other_workdir (the baseline run S1).')
  metric = metric or default_metric(workdir, other_workdir)
  records, other_records = read_records(workdir), read_records(other_workdir)
  check_shared(metric, records, other_records, workdir, other_workdir)
  s1, v1 = read_curve(other_records, metric, other_workdir)
  s2, v2 = read_curve(records, metric, workdir)
  e1 = max(s1[0], s2[0]) if e1 is None else e1
  e2 = min(s1[-1], s2[-1]) if e2 is None else e2
  try:
    value = rauc(s1, v1, s2, v2, e1, e2)
  except ValueError as e:
    raise errors.ConfigError(f'--e1/--e2: {e}') from e
  return dict(rauc=value, metric=metric, e1=float(e1), e2=float(e2), baseline=other_workdir)
