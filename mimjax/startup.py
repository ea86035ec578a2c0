"""What `python -m mimjax.train` says before it spends compute: --print_config, --dry_run, the
start-up summary, and shipped recipes found by name from any directory.
"""
import os
import sys

from absl import flags
import jax
import numpy as np

from mimjax import recipe_lib
from mimjax import registry
from mimjax import tree_util
from mimjax import workdir_io
from mimjax.data import pipeline


def recipe_arguments(name):
  """The arguments of shipped recipe `name` as written after NAME:, e.g. 'model=B/16,
  epochs=800, runlocal' (a bare word is a switch, off by default)."""
  try:
    recipe_lib.recipe_config(name, recipe_lib.ARGUMENTS_PROBE)
  except recipe_lib.RecipeArguments as e:
    return ', '.join(k if isinstance(v, bool) else f'{k}={v}' for k, v in e.defaults.items())
  return 'none'


def config_help():
  """Help text of --config: the recipes with their arguments, and how to override fields."""
  recipes = ''.join(f'\n  {name}: {recipe_arguments(name)}' for name in recipe_lib.recipe_names())
  return ('Config file[:args]. A path, or a shipped recipe as configs/NAME.py or NAME, found in '
          'the installed package from any directory; e.g. configs/mae.py:runlocal or '
          'mae:model=S/16,epochs=100. Override any field with --config.KEY=VALUE (e.g. '
          '--config.batch_size=64 --config.data.train_split=train[:10%]); --print_config lists '
          'the fields and their values. Recipes and their arguments (default values; a bare word '
          f'is a switch, e.g. runlocal: the offline default data, a small ViT):{recipes}\n')


def define_flags():
  flags.DEFINE_bool('print_config', False,
                    'Print the fully resolved config (each field the run reads and its value) and '
                    'exit.')
  flags.DEFINE_bool('print_all', False,
                    'With --print_config: also the sections this run does not read (the other '
                    'frameworks\' and the disabled plug-ins\').')
  flags.DEFINE_bool('dry_run', False,
                    'Validate the config, build the data and the model (restoring the checkpoint '
                    'if any), print the start-up summary, and exit without writing anything.')


def resolve_config_path(spec):
  """`configs/NAME.py[:args]` or `NAME[:args]` -> the shipped recipe's file when no such path
  exists here, so a recipe named as in the README works outside the checkout."""
  path, colon, arg = spec.partition(':')
  if os.path.exists(path) or os.path.dirname(path) not in ('', 'configs'):
    return spec
  name = os.path.basename(path).removesuffix('.py')
  if name not in recipe_lib.recipe_names():
    sys.exit(f'error: no config file {path!r}; give a path or a shipped recipe: '
             f'{", ".join(recipe_lib.recipe_names())}.')
  return str(recipe_lib.recipes_dir() / f'{name}.py') + colon + arg


def resolve_config_argv(argv):
  """argv with the value of --config passed through `resolve_config_path`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + resolve_config_path(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def unused_sections(config):
  """Top-level sections the run does not read: the other frameworks' (`config_sections`) and the
  disabled plug-ins' (those with a section: `config_fields`)."""
  used = registry.FRAMEWORKS[config.framework].config_sections(config)
  used |= {p.name for p in registry.enabled_plugins(config)}
  owners = set(registry.FRAMEWORKS) | {p.name for p in registry.PLUGINS}
  return sorted(name for name in owners - used if name in config)


def format_config(config, everything=True):
  """The fields as `KEY = VALUE`, one a line, in the spelling --config.KEY=VALUE accepts; without
  `everything`, the unused sections are left out and named in a last `#` line."""
  hidden = () if everything else unused_sections(config)
  lines = [f'{key} = {value!r}' for key, value in tree_util.flatten_dict(config.to_dict()).items()
           if key.split('.')[0] not in hidden]
  if hidden:
    lines.append(f'# not read by this run, not shown (--print_all shows them): {", ".join(hidden)}')
  return '\n'.join(lines)


def param_counts(params):
  """{top-level module: number of parameters}, plus 'total'."""
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  counts = {name: count(sub) for name, sub in params.items()}
  counts['total'] = sum(counts.values())
  return counts


def summary_lines(config, mesh, params, workdir, latest_step):
  """The start-up summary: devices and mesh, parameters, batch, steps and epochs, data, workdir."""
  devices = jax.devices()
  train_size = pipeline.num_training_examples(config)
  epochs = config.total_steps * config.batch_size / train_size
  per_host = pipeline.local_batch_size(config.batch_size)
  accum = config.optim.accum_steps
  micro = f', {accum} accumulation steps of {config.batch_size // accum}' if accum > 1 else ''
  labelled = (f'the {config.data.label_fraction:g} class-stratified labelled subset of '
              if config.data.label_fraction else '')
  data = f'{config.data.name}: {labelled}{config.data.train_split} ({train_size:,} examples)'
  if config.eval.every_steps:
    data += (f', eval {config.data.eval_split} '
             f'({pipeline.num_examples(config, config.data.eval_split):,} examples)')
  params_line = ', '.join(f'{k} {v:,}' for k, v in param_counts(params).items())
  return [
      f'framework: {config.framework}, model {config.model.variant}',
      f'devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}) on '
      f'{jax.process_count()} host(s); mesh {dict(mesh.shape)}',
      f'parameters: {params_line}',
      f'batch: {config.batch_size} global, {per_host} per host{micro}',
      f'steps: {config.total_steps:,} ({epochs:.2f} epochs), warmup {config.warmup_steps:,}',
      *warmup_warning(config),
      f'data: {data}',
      f'workdir: {workdir_io.path(workdir)}',  # a gs:// URL stays a URL
      f'resuming from step {latest_step}' if latest_step is not None else 'starting fresh',
  ]


def warmup_warning(config):
  """A warning line when warmup takes over a quarter of the run (a recipe's warmup kept after
  total_steps was shortened); none otherwise."""
  if config.warmup_steps * 4 <= config.total_steps:
    return []
  return [f'warning: warmup_steps={config.warmup_steps:,} is '
          f'{config.warmup_steps / config.total_steps:.0%} of total_steps={config.total_steps:,}: '
          'the lr peaks late or never; lower --config.warmup_steps (e.g. to '
          f'{max(config.total_steps // 20, 1)}).']


def print_summary(config, mesh, params, workdir, latest_step):
  if jax.process_index() == 0:
    print('\n'.join(summary_lines(config, mesh, params, workdir, latest_step)), flush=True)
