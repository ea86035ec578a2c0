"""Where a train step's time goes: XLA's kernel (thunk) times from a `jax.profiler` trace, summed
by op class (matrix products by site and direction, attention, copies, elementwise, optimizer).

`python -m mimjax.bench --profile` traces each case's step after the timed rounds and writes the
breakdown beside the JSON (`profile_path`). The step is compiled with XLA:CPU's per-thunk trace
events on (`COMPILER_OPTIONS`); each event names its HLO instruction, whose `op_name` metadata
(the JAX name stack: module path, `transpose(jvp(...))` for the backward pass, the einsum spec)
and called computation (does it hold a `dot`? is its root a copy?) give the class.
"""
import collections
import glob
import os
import re
import tempfile
import time

import jax
from jax.profiler import ProfileData

# Per-thunk trace events of XLA:CPU (its GPU and TPU backends trace their kernels anyway).
COMPILER_OPTIONS = {'xla_cpu_enable_xprof_traceme': True}
_CONTAINERS = ('while', 'conditional', 'call')  # their thunks enclose the ones inside
_MATMUL_SITES = (  # (pattern in op_name, site), first match wins
    (r'\.\.\.d,dthk->\.\.\.thk|/(query|key|value)/', 'q/k/v'),
    # jax.nn's, the einsum path's and vit.xla_attention's (forward and own backward) specs
    (r'BTNH,BSNH->BNTS|bqhd,bkhd->bhqk|btnh,bsnh->bnts', 'attention scores'),
    (r'BNTS,BSNH->BTNH|bhqk,bkhd->bqhd|bnts,bsnh->btnh', 'attention values'),
    (r'bnts,btnh->bsnh', 'attention dK, dV'),
    (r'MultiHeadDotProductAttention_\d+/out/', 'attention out'),
    (r'MlpBlock_\d+/Dense_0/', 'mlp fc1'),
    (r'MlpBlock_\d+/Dense_1/', 'mlp fc2'),
    (r'embedding', 'patch embedding'),
    (r'MultiHeadDotProductAttention', 'attention, fused with softmax'),
)


def profile_path(out):
  """Where the breakdown goes: beside the bench JSON `out` (x.json -> x.profile.json)."""
  return (out[:-len('.json')] if out.endswith('.json') else out or 'bench') + '.profile.json'


def _instructions(hlo_text):
  """{instruction name: (opcode, op_name, has_dot, root opcode of its called computation)}."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and not line.startswith(' '):
      current = bodies.setdefault(header.group(1), [])
    elif current is not None:
      current.append(line)
  roots = {}
  for name, lines in bodies.items():
    root = next((l for l in lines if l.lstrip().startswith('ROOT ')), '')
    opcode = re.search(r' ([a-z][a-z0-9\-]*)\(', root)
    roots[name] = opcode.group(1) if opcode else ''
  info = {}
  for lines in bodies.values():
    for line in lines:
      m = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$', line)
      if not m:
        continue
      opcode = re.search(r' ([a-z][a-z0-9\-]*)\(', ' ' + m.group(2))
      op_name = re.search(r'op_name="([^"]*)"', line)
      called = re.search(r'calls=%?([\w.\-]+)', line)
      body = '\n'.join(bodies.get(called.group(1), ())) if called else ''
      has_dot = (' dot(' in body or (opcode and opcode.group(1) in ('dot', 'convolution'))
                 or 'matmul' in line)
      info[m.group(1)] = (opcode.group(1) if opcode else '', op_name.group(1) if op_name else '',
                          bool(has_dot), roots.get(called.group(1), '') if called else '')
  return info


def classify(opcode, op_name, has_dot, root=''):
  """The class of one kernel, e.g. 'matmul decoder q/k/v backward', 'attention softmax',
  'copies', 'optimizer', 'elementwise encoder'; None for a container (while, call)."""
  if opcode in _CONTAINERS:
    return None
  if '/optimizer/' in op_name:
    return 'optimizer'
  part = re.search(r'/(encoder|decoder)/', op_name)
  part = part.group(1) if part else 'other'
  if has_dot:
    site = next((s for p, s in _MATMUL_SITES if re.search(p, op_name)), 'other')
    direction = 'backward' if 'transpose(jvp(' in op_name else 'forward'
    return f'matmul {part} {site} {direction}'
  if opcode in ('copy', 'transpose') or root in ('copy', 'transpose'):
    return 'copies'
  if 'MultiHeadDotProductAttention' in op_name or 'dot_product_attention' in op_name:
    return 'attention softmax, scaling'
  return f'elementwise {part}'


def _thunk_times(log_dir):
  """{HLO instruction name: (total ns, count)} over the trace's thunk events."""
  times = collections.defaultdict(lambda: [0, 0])
  for path in glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if 'hlo_op' in stats:
            times[stats['hlo_op']][0] += event.duration_ns
            times[stats['hlo_op']][1] += 1
  return times


def breakdown(compiled, run_step, steps=1):
  """Time per step by op class of `steps` calls of `run_step()` (each blocks until done) running
  the executable `compiled` (built with COMPILER_OPTIONS).

  Kernels of one step may run at once on several threads, so their times can add up to more than
  the step's wall time; 'outside kernels' is the wall time not covered by the kernels' sum (host
  dispatch, waiting), when there is any.
  """
  info = _instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir)
    start = time.perf_counter()
    for _ in range(steps):
      run_step()
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    times = _thunk_times(log_dir)
  classes = collections.defaultdict(lambda: dict(s=0.0, kernels=0))
  for name, (ns, count) in times.items():
    if name not in info:
      continue  # another executable's thunk
    cls = classify(*info[name])
    if cls is not None:
      classes[cls]['s'] += ns * 1e-9 / steps
      classes[cls]['kernels'] += count // steps
  kernel_s = sum(c['s'] for c in classes.values())
  classes['outside kernels'] = dict(s=max(0.0, wall - kernel_s), kernels=0)
  total = sum(c['s'] for c in classes.values())
  rows = sorted(({'class': k, **v, 'share': v['s'] / total} for k, v in classes.items()),
                key=lambda r: -r['s'])
  return dict(step_s=wall, kernel_s=kernel_s, classes=rows, steps=steps)


def markdown(profiles):
  """Tables of `{case name: breakdown(...)}`."""
  out = []
  for name, p in profiles.items():
    out += [f'### profile: {name} (step {p["step_s"] * 1e3:.1f} ms, kernels '
            f'{p["kernel_s"] * 1e3:.1f} ms)', '', '| class | ms / step | share | kernels |',
            '|---|---|---|---|']
    out += [f'| {r["class"]} | {r["s"] * 1e3:.2f} | {r["share"]:.1%} | {r["kernels"]} |'
            for r in p['classes']]
    out.append('')
  return '\n'.join(out)
