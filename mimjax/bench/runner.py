r"""Benchmark: compile time, train-step time, FLOP utilisation and plug-in overheads, side by side.

  python -m mimjax.bench                                   # small defaults, minutes on a CPU
  python -m mimjax.bench --model B/16 --image_size 224 --batch 8 --preset recipe \
      --out results.json --markdown bench.md

Every case is the trainer's own jitted, donated step (`mimjax.train_step`) on a 1-device mesh, fed a
fixed synthetic batch with the features its augmentation yields. Cases of one family (a framework
and its plug-ins, plus the matmul reference and, for MAE, the PyTorch peer) are built together and
timed round-robin for several rounds, so machine drift hits them alike; families run one after the
other so that only one family's train states are alive at a time.

A case is one row of `CASES`: (name, host, config spec, target).
"""
import ast
import collections
import importlib
import importlib.util
from importlib import metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mimjax.bench import cli
from mimjax.bench import profile as bench_profile
from mimjax.bench import report as bench_report
from mimjax import recipe_lib
from mimjax import registry
from mimjax import sharding
from mimjax import train_step as train_step_lib
from mimjax import validation
from mimjax.data import features

# host: the case whose step the overhead is measured against. target: the bound on the
# overhead (fraction of the host's step time), 'flops' (no slower than the FLOP ratio), or None.
Case = collections.namedtuple('Case', 'name host config target')
CASES = (
    Case('mae', None, 'mae', None),
    # The optimizer update over flat buffers (`optim.flat_update`, issue 35): its overhead row is
    # the A/B against the per-leaf update, timed in turn with 'mae'.
    Case('mae+flat_update', 'mae', 'mae|optim.flat_update=True', None),
    Case('mae+lut', 'mae', 'mae_lut:alpha=0.25', 'flops'),
    Case('mae+mto', 'mae', 'mae_mto', 0.10),
    Case('mae+lut+tokenprop', 'mae', 'mae_lut:alpha=0.25|tokenprop.enabled=True', None),
    Case('simmim', None, 'simmim', None),
    Case('simmim+mto', 'simmim', 'simmim_mto', 0.10),
    Case('distill', None, 'distill:teacher=ema', None),
    Case('distill+dtm', 'distill', 'distill:teacher=ema,dtm', 0.03),
    Case('supervised', None, 'supervised', None),
    Case('supervised+moto', 'supervised', 'supervised:moto', 0.05),
    Case('supervised+tokenprop', 'supervised', 'supervised:tokenprop', 0.05),
    Case('supervised+moto+tokenprop', 'supervised', 'supervised:moto,tokenprop', None),
)
PEER_MODES = ('eager', 'compile')
PEER_TASKS = ('mae', 'supervised')  # cases with a PyTorch peer (torch_peer --task)


def _literal(text):
  """'True' -> True, '0.5' -> 0.5; anything else stays a string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def load_config(spec, model, image_size, batch, preset, dtype):
  """Config of a case spec 'file[:arg][|key=value,...]' at the bench's size settings."""
  spec, _, overrides = spec.partition('|')
  name, _, arg = spec.partition(':')
  args = [a for a in (arg, f'model={model}', 'runlocal' if preset == 'small' else '') if a]
  config = recipe_lib.recipe_config(name, ','.join(args))
  config.batch_size = batch
  config.data.image_size = image_size
  config.model.dtype = dtype
  pairs = (item.partition('=') for item in filter(None, overrides.split(',')))
  config.update_from_flattened_dict({key: _literal(value) for key, _, value in pairs})
  validation.validate(config)
  return config


def synthetic_batch(config, seed=0):
  """Host batch with the features `config.data.augment` yields (e.g. image2 for LUT) and labels."""
  rng = np.random.default_rng(seed)
  s, c = config.data.image_size, config.data.channels
  batch = {k: rng.standard_normal((config.batch_size, s, s, c), np.float32)
           for k in features.outputs(config.data.augment)}
  batch['label'] = rng.integers(0, max(config.model.num_classes, 1), config.batch_size,
                                dtype=np.int32)
  return batch


def max_rss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def process_cpu_s(pid=None):
  """CPU seconds (user + system, all threads) process `pid` has used so far; None = this one.
  NaN where another process's time cannot be read (no /proc, e.g. macOS)."""
  if pid is None:
    return time.process_time()
  if not os.path.exists(f'/proc/{pid}/stat'):
    return float('nan')
  with open(f'/proc/{pid}/stat') as f:  # fields after the ')' closing the command name
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


Compiled = collections.namedtuple(
    'Compiled', 'framework compiled init_fn state_sharding batch lower_s compile_s')


def compile_step(config, compiler_options=None):
  """The trainer's jitted, donated train step for `config` on a 1-device mesh, compiled (with XLA
  `compiler_options`, e.g. the profile's trace events) for a synthetic batch (on the device);
  nothing of the train state is allocated yet."""
  framework = registry.build(config)
  host = synthetic_batch(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  init_fn, abstract, tx, lr = train_step_lib.build(
      framework, config, jax.tree_util.tree_map(lambda x: x[:2], host))
  state_sharding = train_step_lib.state_shardings(abstract, mesh, config.mesh)
  step = train_step_lib.jit_train_step(
      train_step_lib.make_train_step(framework, tx, lr, config.optim.accum_steps),
      state_sharding, mesh)
  batch = jax.device_put(host, sharding.batch_sharding(mesh))
  start = time.perf_counter()
  lowered = step.lower(train_step_lib.with_shardings(abstract, state_sharding), batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options)
  return Compiled(framework, compiled, init_fn, state_sharding, batch, lower_s,
                  time.perf_counter() - start)


class JaxStep:
  """One case: the trainer's train step, compiled and initialised; `steps(k)` times k updates."""

  def __init__(self, name, config, warmup, compiler_options=None):
    self.name, self.config, self.times = name, config, []
    self.pid, self.others_cpu_s, self.timed_wall_s = None, 0.0, 0.0
    rss0 = max_rss_bytes()
    c = compile_step(config, compiler_options)
    framework, self.compiled, self.batch = c.framework, c.compiled, c.batch
    self.lower_s, self.compile_s = c.lower_s, c.compile_s
    self.state = jax.jit(c.init_fn, out_shardings=c.state_sharding)()
    self.first_step_s = self.steps(1)[0]
    self.steps(warmup)
    self.rss_growth = max_rss_bytes() - rss0
    self.flops = _xla_flops(self.compiled)
    self.analytic = framework.step_flops()
    self.memory = xla_memory(self.compiled)
    self.params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.state.params))

  def steps(self, k):
    times = []
    for _ in range(k):
      (self.state, _), dt = _timed(self.compiled, self.state, self.batch)
      times.append(dt)
    return times

  def close(self):
    del self.state, self.batch, self.compiled


class Matmul:
  """Reference: an n x n matmul in the compute dtype; its FLOP/s is the "measured peak"."""

  def __init__(self, n, dtype):
    self.name, self.n, self.times = 'matmul', n, []
    self.pid, self.others_cpu_s, self.timed_wall_s = None, 0.0, 0.0
    keys = jax.random.split(jax.random.PRNGKey(0))
    self.a, self.b = (jax.random.normal(k, (n, n), jnp.dtype(dtype)) for k in keys)
    self.fn = jax.jit(jnp.matmul).lower(self.a, self.b).compile()
    self.flops = 2 * n ** 3
    self.steps(1)

  def steps(self, k):
    return [_timed(self.fn, self.a, self.b)[1] for _ in range(k)]

  def close(self):
    del self.a, self.b


class TorchPeer:
  """The PyTorch peer (mimjax.bench.torch_peer) of an MAE or supervised step in a worker
  subprocess, timed step by step."""

  def __init__(self, mode, config, warmup, device):
    self.name, self.mode, self.times = f'torch_{mode}', mode, []
    self.others_cpu_s, self.timed_wall_s = 0.0, 0.0
    kw = vit_kwargs(config)
    cmd = [sys.executable, '-m', 'mimjax.bench.torch_peer', f'--task={config.framework}',
           f'--batch={config.batch_size}', f'--image_size={kw["image_size"]}',
           f'--patch_size={kw["patch_size"]}', f'--width={kw["width"]}', f'--depth={kw["depth"]}',
           f'--heads={kw["num_heads"]}', f'--mlp_dim={kw["mlp_dim"]}',
           f'--channels={config.data.channels}', f'--device={device}']
    if config.framework == 'mae':
      m = config.mae
      cmd += [f'--decoder_width={m.decoder_width}', f'--decoder_depth={m.decoder_depth}',
              f'--decoder_heads={m.decoder_heads}', f'--decoder_mlp_ratio={m.decoder_mlp_ratio}',
              f'--mask_ratio={m.mask_ratio}']
    else:
      s = config.supervised
      cmd += [f'--num_classes={kw["num_classes"]}', f'--drop_path={kw["drop_path"]}',
              f'--mixup_alpha={s.mixup_alpha}', f'--cutmix_alpha={s.cutmix_alpha}',
              f'--label_smoothing={s.label_smoothing}']
    if mode == 'compile':
      cmd.append('--compile')
    if kw['dtype'] == jnp.bfloat16:
      cmd.append('--bf16')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Passive OpenMP waiting: torch's idle threads sleep at once instead of spinning on the cores
    # while mimjax's step is timed (run_rounds measures that they do).
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE', PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get('PYTHONPATH')])))
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, stderr=subprocess.DEVNULL)
    self.pid = self.proc.pid
    self.info = self._read()
    self.first_step_s = self.steps(1)[0]
    self.steps(warmup)

  def _read(self):
    line = self.proc.stdout.readline()
    reply = json.loads(line) if line else {'error': 'the worker exited without a reply'}
    if 'error' in reply:
      self.close()
      raise RuntimeError(reply['error'])
    return reply

  def steps(self, k):
    self.proc.stdin.write(f'{k}\n')
    self.proc.stdin.flush()
    return self._read()['times']

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def vit_kwargs(config):
  from mimjax.models import vit  # pylint: disable=g-import-not-at-top
  return vit.encoder_kwargs(config.model, config.data.image_size)


def _xla_flops(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', float('nan')))


def xla_memory(compiled):
  """XLA's buffer assignment: arguments + outputs - donated aliases + temporaries, in bytes."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
              alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
              peak_estimate=(m.argument_size_in_bytes + m.output_size_in_bytes
                             - m.alias_size_in_bytes + m.temp_size_in_bytes))


def timing_stats(times):
  t = np.asarray(times)
  return dict(median=float(np.median(t)), min=float(t.min()), max=float(t.max()),
              p25=float(np.percentile(t, 25)), p75=float(np.percentile(t, 75)), n=int(t.size))


def run_rounds(runners, rounds, steps):
  """Round-robin: every runner does `steps` timed steps per round, in the same order each round.

  Runners take turns, so no two are ever timed at once; while one is timed, the CPU time used by
  the runners' other processes (the PyTorch worker, or this process while the worker is timed)
  is added to its `others_cpu_s`, which shows whether an idle side still competed for the cores.
  """
  pids = {r.pid for r in runners}
  for _ in range(rounds):
    for r in runners:
      others = [p for p in pids if p != r.pid]
      before = [process_cpu_s(p) for p in others]
      start = time.perf_counter()
      r.times += r.steps(steps)
      r.timed_wall_s += time.perf_counter() - start
      r.others_cpu_s += sum(process_cpu_s(p) - b for p, b in zip(others, before))


def others_cpu(runner):
  """CPU seconds the other side used while `runner` was timed, in total and per timed second."""
  return dict(others_cpu_s=runner.others_cpu_s,
              others_cpu_fraction=runner.others_cpu_s / max(runner.timed_wall_s, 1e-9))


def _cpu_model():
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  return platform.processor()


def machine_info():
  """CPU, device and library versions (torch / timm read from package metadata, not imported)."""
  versions = {m: importlib.import_module(m).__version__
              for m in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')}
  for m in ('torch', 'timm'):
    try:
      versions[m] = metadata.version(m)
    except metadata.PackageNotFoundError:
      versions[m] = None
  dev = jax.devices()[0]
  return dict(cpu=_cpu_model(), cores=os.cpu_count(), platform=dev.platform,
              device_kind=dev.device_kind, device_count=jax.device_count(),
              python=platform.python_version(), load_average=os.getloadavg(), versions=versions,
              time=time.strftime('%Y-%m-%d %H:%M:%S %Z'))


def case_result(runner, matmul_flops_s, nominal_peak):
  st = timing_stats(runner.times)
  analytic = sum(runner.analytic.values())
  achieved = runner.flops / st['median']
  return dict(
      name=runner.name, status='ok', config=runner.config.framework,
      params=runner.params, lower_s=runner.lower_s, compile_s=runner.compile_s,
      first_step_s=runner.first_step_s, step_s=st,
      images_per_s=runner.config.batch_size / st['median'],
      flops=dict(xla=runner.flops, analytic=analytic * runner.config.batch_size,
                 analytic_terms_per_example=runner.analytic,
                 xla_over_analytic=runner.flops / (analytic * runner.config.batch_size)),
      achieved_flops_per_s=achieved, frac_matmul_peak=achieved / matmul_flops_s,
      mfu=achieved / nominal_peak if nominal_peak else None, **others_cpu(runner),
      memory=dict(xla=runner.memory, device_peak_bytes=_device_peak(),
                  rss_growth_bytes=runner.rss_growth))


def _device_peak():
  stats = jax.devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


def _families(cases):
  """Cases grouped by host family, in table order."""
  fams = collections.OrderedDict()
  for c in cases:
    fams.setdefault(c.host or c.name, []).append(c)
  return list(fams.values())


def _scale_grid(image_size, patch, factor):
  return max(1, round(image_size // patch * factor)) * patch


def run(args):
  """Runs the benchmark described by parsed `args`; returns the results dict."""
  selected = [c for c in CASES if args.cases == 'all' or c.name in args.cases.split(',')]
  unknown = set(args.cases.split(',')) - {c.name for c in CASES} - {'all'}
  if unknown:
    raise SystemExit(f'Unknown cases {sorted(unknown)}; choose from {[c.name for c in CASES]}.')
  dev = jax.devices()[0]
  nominal = bench_report.nominal_peak(dev.platform, dev.device_kind)
  results = dict(machine=machine_info(), settings=vars(args), cases=[], peer=[], scaling=[],
                 matmul=[], profile={})
  options = bench_profile.COMPILER_OPTIONS if args.profile else None
  make = lambda name, spec, **kw: JaxStep(name, load_config(  # noqa: E731
      spec, kw.get('model', args.model), kw.get('image_size', args.image_size),
      kw.get('batch', args.batch), args.preset, args.dtype), args.warmup, options)
  groups = [(fam, None) for fam in _families(selected)]
  if args.scaling_case:
    groups.append(([c for c in CASES if c.name == args.scaling_case], 'scaling'))
  for fam, kind in groups:
    runners, pending_peer = [], []
    for c in fam:
      if kind == 'scaling':
        runners.append(make(f'{c.name}@batch={args.batch},image={args.image_size}', c.config))
        patch = vit_kwargs(runners[0].config)['patch_size']
        for b in sorted({max(1, int(args.batch * f)) for f in args.batch_scales} - {args.batch}):
          runners.append(make(f'{c.name}@batch={b},image={args.image_size}', c.config, batch=b))
        for s in sorted({_scale_grid(args.image_size, patch, f) for f in args.grid_scales}
                        - {args.image_size}):
          runners.append(make(f'{c.name}@batch={args.batch},image={s}', c.config, image_size=s))
      else:
        runners.append(make(c.name, c.config))
      print(f'[bench] built {runners[-1].name}: compile {runners[-1].compile_s:.1f}s',
            file=sys.stderr, flush=True)
    if kind is None and runners and runners[0].name in PEER_TASKS:
      for mode in args.peer:
        try:
          pending_peer.append(TorchPeer(mode, runners[0].config, args.warmup, args.peer_device))
        except (RuntimeError, OSError) as e:
          results['peer'].append(dict(name=f'torch_{mode}', status='failed', error=str(e)))
    if not runners:
      continue
    matmul = Matmul(args.matmul_size, args.dtype)
    everyone = [matmul] + runners + pending_peer
    run_rounds(everyone, args.rounds, args.steps)
    mm_stats = timing_stats(matmul.times)
    mm_flops_s = matmul.flops / mm_stats['median']
    results['matmul'].append(dict(family=kind or fam[0].name, n=matmul.n, dtype=args.dtype,
                                  step_s=mm_stats, flops_per_s=mm_flops_s))
    for r in runners:
      entry = case_result(r, mm_flops_s, nominal)
      (results['scaling'] if kind else results['cases']).append(entry)
      if args.profile:
        results['profile'][r.name] = bench_profile.breakdown(
            r.compiled, lambda r=r: r.steps(1), args.profile_steps)
    for p in pending_peer:
      st = timing_stats(p.times)
      results['peer'].append(dict(name=p.name, status='ok', mode=p.mode, threads=p.info['threads'],
                                  torch=p.info['torch'], torch_build=p.info.get('torch_build'),
                                  params=p.info['params'], first_step_s=p.first_step_s, step_s=st,
                                  images_per_s=args.batch / st['median'], **others_cpu(p),
                                  task=runners[0].name,
                                  mimjax_speedup=st['median'] / _median(results, runners[0].name)))
    for r in everyone:
      r.close()
  results['machine']['load_average_end'] = os.getloadavg()
  order = {c.name: i for i, c in enumerate(CASES)}
  results['cases'].sort(key=lambda c: order[c['name']])
  bench_report.add_overheads(results, {c.name: c for c in CASES})
  return results


def _median(results, name):
  return next(c['step_s']['median'] for c in results['cases'] if c['name'] == name)


def define_flags(flag_values):
  """The command's flags (`mimjax.bench.cli`)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('model', 'pico/4', 'ViT variant, e.g. mu/4, S/16, B/16', **fv)
  flags.DEFINE_integer('image_size', 28, 'Image side in pixels.', **fv)
  flags.DEFINE_integer('batch', 32, 'Batch size of every case.', **fv)
  flags.DEFINE_enum('preset', 'small', ('small', 'recipe'), "small: each config's runlocal heads "
                    'and decoders; recipe: the paper sizes', **fv)
  flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'), 'Compute dtype.', **fv)
  flags.DEFINE_string('cases', 'all', 'comma-separated case names, or "all"', **fv)
  flags.DEFINE_integer('steps', 3, 'timed steps per case per round', **fv)
  flags.DEFINE_integer('rounds', 3, 'round-robin rounds over the cases', **fv)
  flags.DEFINE_integer('warmup', 2, 'untimed steps after the first one', **fv)
  flags.DEFINE_list('peer', 'eager,compile', 'PyTorch peer modes to run next to MAE and '
                    'supervised: eager, compile ("" = none)', **fv)
  cli.require_subset('peer', PEER_MODES, flag_values)
  flags.DEFINE_string('peer_device', 'cuda' if jax.default_backend() == 'gpu' else 'cpu',
                      'Device of the PyTorch peer (cpu, cuda).', **fv)
  flags.DEFINE_string('scaling_case', 'mae', 'case timed at other batch sizes and resolutions '
                      '("" = none)', **fv)
  cli.define_float_list('batch_scales', '0.5,2', 'factors on --batch of the scaling case',
                        flag_values)
  cli.define_float_list('grid_scales', '0.5,2', 'factors on the patch grid side (token count '
                        'grows as the square)', flag_values)
  flags.DEFINE_integer('matmul_size', 2048, 'Side of the reference matmul.', **fv)
  flags.DEFINE_string('out', '', 'JSON results file', **fv)
  flags.DEFINE_string('markdown', '', 'markdown tables file', **fv)
  flags.DEFINE_string('report', '', 'only re-render the tables of this JSON results file', **fv)
  flags.DEFINE_bool('profile', False, 'also trace each case\'s step after the timed rounds and '
                    'write its time by op class beside --out (x.json -> x.profile.json)', **fv)
  flags.DEFINE_integer('profile_steps', 2, 'steps traced per case with --profile', **fv)


def main(args):
  """Runs the benchmark (or re-renders --report) for parsed flags `args`; returns the results."""
  if args.report:
    with open(args.report) as f:
      results = json.load(f)
    bench_report.add_overheads(results, {c.name: c for c in CASES})
  else:
    results = run(args)
  profiles = results.pop('profile', {})
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2, default=float)
  if profiles:
    with open(bench_profile.profile_path(args.out), 'w') as f:
      json.dump(dict(machine=results['machine'], settings=results['settings'], cases=profiles), f,
                indent=2, default=float)
    print(bench_profile.markdown(profiles))
  text = bench_report.markdown(results)
  print(text)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(text)
  return results

