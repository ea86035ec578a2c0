"""Derived figures and markdown tables of `mimjax.bench` results."""
import math

# Nominal dense bf16 peaks (FLOP/s) by a substring of `device_kind`, for MFU on accelerators.
NOMINAL_BF16_PEAK = (
    ('H200', 989e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('TPU v5p', 459e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v4', 275e12),
)


def nominal_peak(platform, device_kind):
  """The chip's nominal bf16 peak, or None (CPUs, unknown chips): MFU is then not reported."""
  if platform == 'cpu':
    return None
  return next((peak for name, peak in NOMINAL_BF16_PEAK if name in device_kind), None)


def add_overheads(results, cases):
  """Sets `overhead` on every measured case with a measured host: its step time and FLOPs as
  fractions above the host's, and the case's target."""
  measured = {c['name']: c for c in results['cases']}
  for name, c in measured.items():
    host = measured.get(cases[name].host) if name in cases else None
    if host is None:
      continue
    time_over = c['step_s']['median'] / host['step_s']['median'] - 1.0
    # Load from other processes only adds time, so the fastest steps estimate the intrinsic cost.
    min_over = c['step_s']['min'] / host['step_s']['min'] - 1.0
    flop_over = c['flops']['xla'] / host['flops']['xla'] - 1.0
    target = cases[name].target
    met = None
    if target == 'flops':
      met = time_over <= flop_over
    elif target is not None:
      met = time_over <= target
    c['overhead'] = dict(host=host['name'], time=time_over, time_min=min_over, flops=flop_over,
                         target=target, met=met)


def _target_text(target):
  if target is None:
    return ''
  return '≤ FLOP ratio' if target == 'flops' else f'≤ {100 * target:.0f}%'


def _ms(seconds):
  return f'{seconds * 1e3:.1f}'


def _gib(nbytes):
  return '' if nbytes is None else f'{nbytes / 2 ** 30:.2f}'


def _spread(st):
  return f'{_ms(st["median"])} [{_ms(st["p25"])}–{_ms(st["p75"])}] (min {_ms(st["min"])})'


def _cpu_share(entry):
  share = entry.get('others_cpu_fraction')
  return f'{share:.3f} s/s' if share is not None and math.isfinite(share) else ''


def _case_rows(entries):
  rows = []
  for c in entries:
    f = c['flops']
    mfu = '' if c['mfu'] is None else f'{100 * c["mfu"]:.1f}%'
    rows.append(
        f'| {c["name"]} | {c["lower_s"] + c["compile_s"]:.1f} | {_spread(c["step_s"])} | '
        f'{c["images_per_s"]:.1f} | {f["xla"] / 1e9:.2f} | {f["xla_over_analytic"]:.2f} | '
        f'{c["achieved_flops_per_s"] / 1e9:.1f} | {100 * c["frac_matmul_peak"]:.0f}% {mfu} | '
        f'{_gib(c["memory"]["xla"]["peak_estimate"] if c["memory"]["xla"] else None)} |')
  return rows


CASE_HEADER = ('| case | compile s | step ms median [p25–p75] (min) | img/s | GFLOP/step (XLA) | '
               'XLA / analytic | GFLOP/s | of matmul peak (MFU) | XLA peak GiB |\n'
               '|---|---|---|---|---|---|---|---|---|')


def markdown(results):
  """All tables of a results dict as one markdown string."""
  m = results['machine']
  s = results['settings']
  out = [f'### mimjax.bench: {s["model"]}, {s["image_size"]} px, batch {s["batch"]}, '
         f'preset {s["preset"]}, {s["dtype"]}',
         '',
         f'{m["device_kind"]} ({m["platform"]}), CPU {m["cpu"]}, {m["cores"]} cores, '
         f'load average at start {", ".join(f"{x:.1f}" for x in m["load_average"])}; '
         + ', '.join(f'{k} {v}' for k, v in m['versions'].items()),
         f'{s["rounds"]} rounds x {s["steps"]} steps per case, interleaved within each family.',
         '', CASE_HEADER]
  out += _case_rows(results['cases'])
  mm = results['matmul']
  out += ['', 'Matmul reference (n x n, same dtype) per family: ' + ', '.join(
      f'{x["family"]} {x["flops_per_s"] / 1e9:.1f} GFLOP/s' for x in mm)]
  over = [c for c in results['cases'] if 'overhead' in c]
  if over:
    out += ['', '| plug-in case | host | step-time overhead (medians) | (minima) | FLOP overhead | '
            'target | met (medians) |', '|---|---|---|---|---|---|---|']
    for c in over:
      o = c['overhead']
      target = _target_text(o['target'])
      met = {None: '', True: 'yes', False: 'no'}[o['met']]
      out.append(f'| {c["name"]} | {o["host"]} | {100 * o["time"]:+.1f}% | '
                 f'{100 * o["time_min"]:+.1f}% | {100 * o["flops"]:+.1f}% | {target} | {met} |')
  if results['peer']:
    cases = {c['name']: c for c in results['cases']}
    out += ['', '| PyTorch peer (same step) | first step s | step ms median [p25–p75] (min) | '
            'img/s | peer time / mimjax time | peer CPU while mimjax timed | mimjax CPU while '
            'peer timed |', '|---|---|---|---|---|---|---|']
    for p in results['peer']:
      if p['status'] != 'ok':
        out.append(f'| {p["name"]} | failed: {p["error"].strip().splitlines()[-1]} | | | | | |')
        continue
      host = cases.get(p.get('task', 'mae'), {})
      out.append(f'| {p["name"]} {p.get("task", "mae")} ({p["threads"]} threads) | '
                 f'{p["first_step_s"]:.1f} | '
                 f'{_spread(p["step_s"])} | {p["images_per_s"]:.1f} | {p["mimjax_speedup"]:.2f} | '
                 f'{_cpu_share(host)} | {_cpu_share(p)} |')
    builds = sorted({f'torch {p["torch"]} ({p["torch_build"]})' for p in results['peer']
                     if p.get('torch_build')})
    out += ['', 'CPU columns: CPU seconds the idle side used per second of the other side\'s timed '
            'steps (the sides take turns and never overlap). ' + '; '.join(builds)]
  if results['scaling']:
    out += ['', 'Scaling', '', CASE_HEADER] + _case_rows(results['scaling'])
  return '\n'.join(out) + '\n'
