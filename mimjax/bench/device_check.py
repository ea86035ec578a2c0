r"""One-command accelerator check: MAE ViT-B/16 and ViT-L/16 at their largest batch, plug-in
overheads, the PyTorch peer and a bfloat16-vs-float32 loss check, as one JSON and one markdown file.

  python -m mimjax.bench.device_check --out_dir benchmarks/device_check   # a GPU, ~8 minutes
  python -m mimjax.bench.device_check --tiny --out_dir /tmp/check         # CPU smoke setting

Each part runs in a subprocess of its own, so that every part starts with the whole device: the
JAX allocator never hands memory back, and the PyTorch peer needs its share next to mimjax's.
  models     MAE at each model size and the largest power-of-two batch whose compiled step fits
             (XLA's memory estimate, extrapolated from one probe compile; halved on an OOM).
  plugins    `mimjax.bench` families at --plugin_batch: MAE (+LUT, +MTO) with the PyTorch peer
             (eager, torch.compile) timed round-robin in turn with it, distill (+DTM), supervised
             (+MoTo, +TokenProp). JAX gets half the device memory here, the peer the other half.
  precision  the same MAE steps in float32 and bfloat16 from the same init: per-step losses.
Nothing on this path imports TensorFlow; each part records whether it was imported.
"""
import json
import math
import os
import subprocess
import sys
import time

from absl import flags
import jax

from mimjax.bench import cli
from mimjax.bench import report as bench_report
from mimjax.bench import runner

PARTS = ('models', 'plugins', 'precision')
PLUGIN_CASES = ('mae,mae+lut,mae+mto,distill,distill+dtm,supervised,supervised+moto,'
                'supervised+tokenprop')
# Settings of the GPU check and of the CPU smoke run inside the tests.
FULL = dict(models='B/16,L/16', image_size=224, preset='recipe', max_batch=4096, probe_batch=32,
            plugin_model='B/16', plugin_batch=256, plugin_cases=PLUGIN_CASES, rounds=3, steps=5,
            warmup=2, matmul_size=8192, peer='eager,compile', precision_model='B/16',
            precision_batch=32, precision_steps=8)
# Three plug-in cases only (a host, a plug-in and its overhead row, and MAE for the peer):
# compiles dominate on a CPU, and a loaded 2-core machine timed out the earlier four-case setting.
TINY = dict(models='mu/4', image_size=28, preset='small', max_batch=8, probe_batch=4,
            plugin_model='mu/4', plugin_batch=8, plugin_cases='mae,distill,distill+dtm',
            rounds=1, steps=2, warmup=1, matmul_size=256, peer='eager', precision_model='mu/4',
            precision_batch=8, precision_steps=4)
# Per-part environment: XLA's share of device memory (the peer runs beside the plugins part).
PART_ENV = {
    'models': dict(XLA_PYTHON_CLIENT_MEM_FRACTION='0.9'),
    'plugins': dict(XLA_PYTHON_CLIENT_PREALLOCATE='false', XLA_PYTHON_CLIENT_MEM_FRACTION='0.5'),
    'precision': dict(XLA_PYTHON_CLIENT_MEM_FRACTION='0.9'),
}


def _bench_run(s, model, batch, cases, peer):
  """Results of `mimjax.bench`'s runner (bfloat16, no scaling family) at these settings."""
  return runner.run(cli.parse(runner.define_flags, [
      f'--model={model}', f'--image_size={s["image_size"]}', f'--batch={batch}',
      f'--preset={s["preset"]}', '--dtype=bfloat16', f'--cases={cases}', f'--peer={peer}',
      '--scaling_case=', f'--rounds={s["rounds"]}', f'--steps={s["steps"]}',
      f'--warmup={s["warmup"]}', f'--matmul_size={s["matmul_size"]}']))


def largest_batch(s, model):
  """(batch, how it was chosen): the largest power of two whose step fits 90% of the device."""
  limit = (jax.devices()[0].memory_stats() or {}).get('bytes_limit')
  if not limit:
    return s['max_batch'], 'the device reports no memory limit: max_batch'
  config = runner.load_config('mae', model, s['image_size'], s['probe_batch'], s['preset'],
                              'bfloat16')
  mem = runner.xla_memory(runner.compile_step(config).compiled)
  state = mem['alias']  # the donated train state, independent of the batch
  per_example = (mem['peak_estimate'] - state) / s['probe_batch']
  fit = (0.9 * limit - state) / per_example
  batch = min(s['max_batch'], 2 ** math.floor(math.log2(max(fit, 1))))
  return batch, (f'XLA estimate at batch {s["probe_batch"]}: {state / 2**30:.2f} GiB state + '
                 f'{per_example / 2**20:.1f} MiB per example; limit {limit / 2**30:.1f} GiB')


def part_models(s):
  """MAE at every model size, at its largest batch (halved while the step runs out of memory)."""
  out = []
  for model in s['models'].split(','):
    batch, how = largest_batch(s, model)
    while True:
      try:
        results = _bench_run(s, model, batch, 'mae', '')
        break
      except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e) or batch == 1:
          raise
        batch, how = batch // 2, f'{how}; out of memory at {batch}, halved'
    out.append(dict(model=model, batch=batch, batch_choice=how, results=results))
  return out


def part_plugins(s):
  """The plug-in families; the PyTorch peer is timed in turn with the MAE family."""
  return _bench_run(s, s['plugin_model'], s['plugin_batch'], s['plugin_cases'], s['peer'])


def part_precision(s):
  """Per-step MAE losses in float32 and bfloat16 from the same init, on the same batch."""
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = runner.load_config('mae', s['precision_model'], s['image_size'],
                                s['precision_batch'], s['preset'], dtype)
    c = runner.compile_step(config)
    state = jax.jit(c.init_fn, out_shardings=c.state_sharding)()
    losses[dtype] = []
    for _ in range(s['precision_steps']):
      state, metrics = c.compiled(state, c.batch)
      losses[dtype].append(float(metrics['loss']))
  rel = [abs(b - f) / abs(f) for f, b in zip(losses['float32'], losses['bfloat16'])]
  return dict(model=s['precision_model'], batch=s['precision_batch'], losses=losses,
              max_rel_diff=max(rel))


def run_part(name, settings, path):
  """Runs one part in this process and writes its JSON (with the machine and a TF probe)."""
  start = time.perf_counter()
  result = globals()['part_' + name](settings)
  with open(path, 'w') as f:
    json.dump(dict(part=name, result=result, machine=runner.machine_info(),
                   wall_s=time.perf_counter() - start,
                   tensorflow_imported='tensorflow' in sys.modules), f, indent=2, default=float)


def run_all(settings, parts, out_dir, timeout_s):
  """Every part in a fresh subprocess; returns {part: its JSON, or an error record}."""
  os.makedirs(out_dir, exist_ok=True)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  merged = {}
  for name in parts:
    path = os.path.join(out_dir, f'part_{name}.json')
    env = dict(os.environ, **PART_ENV[name], PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get('PYTHONPATH')])))
    cmd = [sys.executable, '-m', 'mimjax.bench.device_check', '--part', name, '--part_out', path,
           '--settings', json.dumps(settings)]
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False,
                            timeout=timeout_s)
      error = proc.returncode and (proc.stderr.strip()[-3000:] or 'failed without output')
    except subprocess.TimeoutExpired:
      error = f'timed out after {timeout_s} s (--part_timeout_s)'
    if error:
      merged[name] = dict(part=name, error=error, wall_s=time.perf_counter() - start)
    else:
      with open(path) as f:
        merged[name] = json.load(f)
      os.remove(path)
  return merged


def _pct(x):
  return '' if x is None else f'{100 * x:.1f}%'


def _models_rows(entries, nominal):
  rows = []
  for e in entries:
    c = next(x for x in e['results']['cases'] if x['name'] == 'mae')
    mm = e['results']['matmul'][0]['flops_per_s']
    step = c['step_s']['median']
    xla, analytic = c['flops']['xla'] / step, c['flops']['analytic'] / step
    mem = c['memory']
    peak = mem['device_peak_bytes'] or (mem['xla'] or {}).get('peak_estimate')
    rows.append(
        f'| MAE {e["model"]} | {e["batch"]} | {1e3 * step:.1f} | {c["images_per_s"]:.0f} | '
        f'{c["flops"]["xla"] / 1e12:.3f} / {c["flops"]["analytic"] / 1e12:.3f} | '
        f'{_pct(xla / nominal if nominal else None)} / '
        f'{_pct(analytic / nominal if nominal else None)} | {_pct(xla / mm)} / '
        f'{_pct(analytic / mm)} ({mm / 1e12:.1f} TFLOP/s) | '
        f'{"" if peak is None else f"{peak / 2**30:.1f}"} |')
  return rows


def markdown(merged):
  """The check's tables as one markdown string."""
  any_part = next((p for p in merged.values() if 'machine' in p), None)
  out = ['### mimjax.bench.device_check', '']
  nominal = None
  if any_part:
    m = any_part['machine']
    nominal = bench_report.nominal_peak(m['platform'], m['device_kind'])
    peak = (f'nominal dense bf16 peak {nominal / 1e12:.0f} TFLOP/s' if nominal else
            'no nominal peak for this device (MFU columns empty)')
    out.append(f'{m["device_kind"]} ({m["platform"]}), {m["device_count"]} device(s), CPU '
               f'{m["cpu"]}; {peak}; ' + ', '.join(f'{k} {v}' for k, v in m['versions'].items()))
  for name, p in merged.items():
    if 'error' in p:
      out += ['', f'**{name}: failed** after {p["wall_s"]:.0f} s:', '', '```',
              p['error'][-1500:], '```']
      continue
    out += ['', f'#### {name} ({p["wall_s"]:.0f} s; TensorFlow imported: '
            f'{"yes" if p["tensorflow_imported"] else "no"})', '']
    if name == 'models':
      out += ['| case | batch | step ms (median) | img/s | TFLOP/step XLA / analytic | '
              'MFU vs nominal bf16 peak, XLA / analytic FLOPs | of measured matmul, XLA / '
              'analytic | peak GiB |', '|---|---|---|---|---|---|---|---|']
      out += _models_rows(p['result'], nominal)
      out += [''] + [f'- {e["model"]}: batch {e["batch"]} ({e["batch_choice"]})'
                     for e in p['result']]
    elif name == 'plugins':
      out.append(bench_report.markdown(p['result']))
    else:
      r = p['result']
      out += [f'MAE {r["model"]}, batch {r["batch"]}; largest relative loss difference '
              f'bfloat16 vs float32: {100 * r["max_rel_diff"]:.2f}%', '',
              '| step | ' + ' | '.join(str(i + 1) for i in range(len(r['losses']['float32'])))
              + ' |', '|---' * (1 + len(r['losses']['float32'])) + '|']
      out += [f'| {dtype} | ' + ' | '.join(f'{x:.4f}' for x in r['losses'][dtype]) + ' |'
              for dtype in ('float32', 'bfloat16')]
  return '\n'.join(out) + '\n'


def overrides(text):
  """--set "key=value;..." as {key: value of the type FULL (and TINY) give it}; a key that is not
  a setting or a value that does not convert raises flags.ValidationError naming it."""
  out = {}
  for item in filter(None, text.split(';')):
    key, _, value = item.partition('=')
    if key not in FULL:
      raise flags.ValidationError(f'--set {key!r} is not a setting; choose from {sorted(FULL)}')
    try:
      out[key] = type(FULL[key])(value)
    except ValueError as e:
      raise flags.ValidationError(
          f'--set {key}={value!r}: {key} takes a value of type {type(FULL[key]).__name__}') from e
  return out


def define_flags(flag_values):
  """The command's flags (`mimjax.bench.cli`); --part, --part_out, --settings: a worker's."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_bool('tiny', False, 'the CPU smoke setting (mu/4, 28 px)', **fv)
  flags.DEFINE_string('out_dir', 'benchmarks/device_check',
                      'writes device_check.json and device_check.md here', **fv)
  flags.DEFINE_list('parts', ','.join(PARTS), f'comma-separated subset of {PARTS}', **fv)
  cli.require_subset('parts', PARTS, flag_values)
  flags.DEFINE_integer('part_timeout_s', 600, 'Seconds each part may run.', **fv)
  flags.DEFINE_string('set', '', 'setting overrides "key=value;key=value", e.g. '
                      '"models=L/16;max_batch=512" (keys: FULL / TINY in this module)', **fv)
  flags.register_validator('set', lambda text: overrides(text) is not None, **fv)
  flags.DEFINE_enum('part', '', ('',) + PARTS, 'worker only: run this one part', **fv)
  flags.DEFINE_string('part_out', '', 'worker only: its JSON file', **fv)
  flags.DEFINE_string('settings', '', 'worker only: the settings as JSON', **fv)


def main(args):
  """Runs the check (or, in a worker, one part) for parsed flags `args`."""
  if args.part:
    run_part(args.part, json.loads(args.settings), args.part_out)
    return None
  settings = dict(TINY if args.tiny else FULL, **overrides(args.set))
  start = time.perf_counter()
  merged = run_all(settings, args.parts, args.out_dir, args.part_timeout_s)
  results = dict(settings=settings, parts=merged, wall_s=time.perf_counter() - start)
  with open(os.path.join(args.out_dir, 'device_check.json'), 'w') as f:
    json.dump(results, f, indent=2, default=float)
  text = markdown(merged) + f'\nTotal wall time {results["wall_s"]:.0f} s.\n'
  with open(os.path.join(args.out_dir, 'device_check.md'), 'w') as f:
    f.write(text)
  print(text)
  failed = [n for n, p in merged.items() if 'error' in p]
  if failed:
    raise SystemExit(f'error: device check parts failed: {failed}; see '
                     f'{args.out_dir}/device_check.md')
  return results


if __name__ == '__main__':
  cli.run(define_flags, main)
