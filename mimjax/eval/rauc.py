"""RAUC, the relative area under the curve of MTO (eq. 6), between two runs' metric curves.

  RAUC(S1, S2; E1, E2) = int_E1^E2 (S2(E) - S1(E1)) dE / int_E1^E2 (S1(E) - S1(E1)) dE

S1 is the baseline and S2 the run compared with it; both curves are read as piecewise linear
between their recorded points, so the trapezoidal rule over the union of the points is exact.
Above 1: S2 gains more over S1's starting value than S1 does.
"""
import json
import os

import numpy as np

from mimjax import errors


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


def read_curve(workdir, metric):
  """(steps, values) of `metric` from WORKDIR/metrics.jsonl (e.g. eval_top1, logged in training)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise errors.ConfigError(f'{path} does not exist: RAUC reads the curves of two '
                             'mimjax.train workdirs.')
  points = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if metric in record:
        points[int(record['step'])] = float(record[metric])  # a resumed run rewrites later steps
  if len(points) < 2:
    raise errors.ConfigError(f'{path} has {len(points)} values of {metric!r}; RAUC needs a '
                             'curve (choose --metric, e.g. eval_top1 or loss).')
  steps = sorted(points)
  return np.asarray(steps), np.asarray([points[s] for s in steps])


def protocol(workdir, other_workdir=None, metric='eval_top1', e1=None, e2=None):
  """RAUC of WORKDIR's `metric` curve over the baseline OTHER_WORKDIR's, on [e1, e2] steps
  (default: the range both curves cover)."""
  if not other_workdir:
    raise errors.ConfigError('protocol rauc needs --other_workdir (the baseline run S1).')
  s1, v1 = read_curve(other_workdir, metric)
  s2, v2 = read_curve(workdir, metric)
  e1 = max(s1[0], s2[0]) if e1 is None else e1
  e2 = min(s1[-1], s2[-1]) if e2 is None else e2
  try:
    value = rauc(s1, v1, s2, v2, e1, e2)
  except ValueError as e:
    raise errors.ConfigError(f'--e1/--e2: {e}') from e
  return dict(rauc=value, metric=metric, e1=float(e1), e2=float(e2), baseline=other_workdir)
