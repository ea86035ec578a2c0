"""The package's structure: no import cycle, side-effect-free packages, and the plug-in contract
refusing a combination before a run writes anything."""
import ast
import pathlib
import re
import subprocess
import sys

import pytest

from mimjax import config_lib
from mimjax import errors
from mimjax import registry
from mimjax import schema
from mimjax import validation
from mimjax.frameworks import base

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'mimjax'


def _module_name(path):
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph():
  """{module: set of mimjax modules it imports}, counting imports inside functions too (a lazy
  import that only hides a cycle is still a cycle)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('mimjax'):
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          deps.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name.startswith('mimjax'))
    graph[name] = {d for d in deps if d in modules and d != name}
  return graph


def find_cycle(graph):
  """One cycle as a list of modules, or None (depth-first search with colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 'open':
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_detects_a_planted_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_package_has_no_import_cycle():
  graph = import_graph()
  assert len(graph) > 40  # the walk saw the package
  assert find_cycle(graph) is None


# docs/design.md's layer table, bottom to top: layer -> (its modules, the layers it may import
# besides its own, or BELOW: every layer under it). A module is named as under mimjax/
# (`models.*`: every module of that package).
BELOW = 'everything below'
LAYERS = {
    'leaf': (('errors', 'console', 'tree_util', 'schema', 'recipe_lib'), ()),
    'config and I/O': (('workdir_io', 'distributed', 'workdir', 'metrics_writer'), ('leaf',)),
    'models and math': (('models.*', 'losses', 'masking', 'mixup', 'optim', 'sharding',
                         'visualize', 'train_step'), ('leaf',)),
    'data': (('data.*',), ('leaf', 'config and I/O')),
    'checkpoint': (('checkpoint',), ('leaf', 'config and I/O', 'models and math')),
    'contract': (('frameworks.base', 'eval.evaluator'), ('leaf', 'models and math')),
    'frameworks, plug-ins': (('frameworks.*', 'plugins.*', 'teachers', 'interop.*'), BELOW),
    'registry': (('registry',), ('frameworks, plug-ins',)),
    'full config': (('config_lib', 'finetune_recipes', 'resume', 'interop.hub'), BELOW),
    'run set-up': (('validation', 'startup'), BELOW),
    'evaluation': (('eval.*',), BELOW),
    'training': (('train',), BELOW),
    'commands': (('evaluate', 'export', 'finetune'), BELOW),
    'tooling': (('bench.*', 'reproduce.*'), BELOW),
}


def allowed_layers(layer):
  """The layers a module of `layer` may import: its own and those LAYERS lets it."""
  imports = LAYERS[layer][1]
  order = list(LAYERS)
  return {layer, *(order[:order.index(layer)] if imports == BELOW else imports)}


def layer_of(module):
  """The LAYERS entry of a module ('mimjax.models.vit'), by its most specific pattern."""
  name = module.removeprefix('mimjax.')
  exact = [layer for layer, (names, _) in LAYERS.items() if name in names]
  if exact:
    return exact[0]
  package = [layer for layer, (names, _) in LAYERS.items()
             if any(n.endswith('.*') and name.startswith(n[:-1]) for n in names)]
  return package[0] if package else None


def _is_package(module):
  return (PACKAGE / module.removeprefix('mimjax').replace('.', '/').strip('/') / '__init__.py'
          ).exists() or module == 'mimjax'


def test_every_module_imports_only_what_its_layer_may():
  graph = import_graph()
  modules = [m for m in graph if not _is_package(m)]
  assert not [m for m in modules if layer_of(m) is None], 'a module outside docs/design.md table'
  wrong = []
  for module in modules:
    layer = layer_of(module)
    allowed = allowed_layers(layer)
    wrong += [f'{module} ({layer}) -> {dep} ({layer_of(dep)})' for dep in sorted(graph[module])
              if not _is_package(dep) and layer_of(dep) not in allowed]
  assert not wrong, wrong


def test_layer_table_is_the_one_in_docs_design():
  """docs/design.md's table has a row per layer: `| layer | `modules` | layers; it imports |`."""
  rows = {}
  for line in (ROOT / 'docs' / 'design.md').read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 3 and cells[0] in LAYERS:
      rows[cells[0]] = cells[1:]
  assert sorted(rows) == sorted(LAYERS)
  for layer, (names, imports) in LAYERS.items():
    modules, imported = rows[layer]
    assert set(re.findall(r'`([^`]+)`', modules)) == {
        n.replace('.', '/') for n in names}, layer
    assert imported == (imports if imports == BELOW else '; '.join(imports) or
                        'nothing of mimjax'), layer


def _imports_of(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def test_no_module_of_the_package_imports_a_recipe():
  """The schema and the helpers recipes use live in the package; `configs/` only sets values."""
  importers = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob('*.py')
               if any(m == 'configs' or m.startswith('configs.') for m in _imports_of(p))]
  assert not importers


# The PyTorch peer of the benchmark re-implements two frameworks by name (`torch_peer --task`).
_NAMES_FRAMEWORKS = ('mimjax.registry', 'mimjax.frameworks.', 'mimjax.bench.')


def framework_name_compares(source, names):
  """Line numbers of comparisons in `source` of something named *framework* with a string of
  `names` (e.g. `config.framework == 'mae'`)."""
  lines = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Compare):
      constants = {c.value for o in (node.left, *node.comparators) for c in ast.walk(o)
                   if isinstance(c, ast.Constant) and isinstance(c.value, str)}
      if constants & names and 'framework' in ast.get_source_segment(source, node):
        lines.append(node.lineno)
  return lines


def test_no_string_compare_of_framework_names_outside_the_registry_and_frameworks():
  """A fact about a framework is stated on its class (`config_sections`, `finetune_recipe`,
  `best_metric`, `provides`, ...), so a new framework is one module plus one registry line."""
  names = set(registry.FRAMEWORKS)
  planted = "if config.framework == 'mae' and config.init.format == 'mae':\n  pass\n"
  assert framework_name_compares(planted, names) == [1]
  assert not framework_name_compares("if config.init.format == 'mae':\n  pass\n", names)
  found = [f'{path.relative_to(ROOT)}:{line}' for path in PACKAGE.rglob('*.py')
           if not _module_name(path).startswith(_NAMES_FRAMEWORKS)
           for line in framework_name_compares(path.read_text(), names)]
  assert not found


def test_errors_is_a_leaf_and_packages_import_nothing():
  graph = import_graph()
  assert graph['mimjax.errors'] == set()
  for init in PACKAGE.rglob('__init__.py'):
    tree = ast.parse(init.read_text())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if init == PACKAGE / '__init__.py':  # the one allowed effect: the console's banner filter
      assert [(n.module, [a.name for a in n.names]) for n in imports] == [('mimjax', ['console'])]
      assert graph['mimjax.console'] == set()
    else:
      assert not imports, init


def test_a_plugin_module_imports_on_its_own():
  for module in ('mimjax.plugins.dtm', 'mimjax.plugins.mto', 'mimjax.frameworks.mae'):
    subprocess.run([sys.executable, '-c', f'import {module}'], check=True, cwd=ROOT,
                   capture_output=True)


def test_every_capability_named_by_a_plugin_or_framework_is_declared():
  config = config_lib.base_config()
  for plugin in registry.PLUGINS:
    assert set(plugin.requires(config)) <= set(base.CAPABILITIES), plugin
  for framework in registry.FRAMEWORKS.values():
    assert framework.provides(config) <= set(base.CAPABILITIES), framework


def test_a_section_name_taken_twice_is_refused():
  """A plug-in named like a core section (or like another owner) cannot take over its fields."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="'model' is declared twice"):
    schema.assemble([('model', ml_collections.ConfigDict({'enabled': False}))])


@pytest.mark.parametrize('spec,override,match', [
    ('configs/supervised.py:runlocal', {'dtm.enabled': True}, 'teacher tokens'),
    ('configs/supervised.py:runlocal', {'lut.enabled': True}, "MAE's patch order"),
    ('configs/simmim.py:runlocal', {'mto.enabled': True, 'mto.where': 'decoder'},
     'mask token standing in for masked patches in the decoder'),
    ('configs/mae.py:runlocal', {'dtm.enabled': True}, 'mae.target="teacher"'),
])
def test_a_plugin_on_a_framework_that_cannot_host_it_is_refused(spec, override, match):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(spec, **override)
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(config)


def test_unknown_combination_refused_before_the_workdir_exists(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'mimjax.train', '--config', 'configs/distill.py:runlocal,dtm',
       '--workdir', str(workdir), '--config.dtm.min_tokens=1000'],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: config.dtm.min_tokens=1000 exceeds the 49 tokens')
  assert not workdir.exists()


# A framework written the way docs/design.md says: one module, here a file outside the package,
# with a config section of its own.
_ONE_MODULE_FRAMEWORK = '''
"""Regresses each image's mean colour, times config.mean_colour.scale, from the ViT's classifier
output."""
import jax.numpy as jnp
import ml_collections

from mimjax import errors
from mimjax.frameworks import base
from mimjax.models import vit


class MeanColour(base.Framework):
  name = 'mean_colour'
  no_weight_decay = ('cls',)

  @classmethod
  def config_fields(cls):
    s = ml_collections.ConfigDict()
    s.scale = 1.0  # the target: scale * the image's mean colour
    return s

  @classmethod
  def check_config(cls, config):
    scale = config.mean_colour.scale
    errors.require(scale > 0, 'mean_colour.scale', scale, 'use a positive scale')

  def build_model(self):
    return vit.from_config(self.config, num_classes=3)

  def init_model(self, rng, batch):
    return {'encoder': self.model.init(rng, batch['image'])['params']}

  def forward(self, params, model_state, batch, rng, train):
    del model_state
    enc = self.model.apply({'params': params['encoder']}, batch['image'], train=train,
                           rngs={'dropout': rng})
    target = self.config.mean_colour.scale * batch['image'].mean(axis=(1, 2))
    loss = jnp.mean((enc['logits'] - target) ** 2)
    return loss, {}, base.ForwardOutputs(encoder=enc, image=batch['image'])
'''


def test_a_framework_is_one_module_plus_one_registry_line(tmp_path, monkeypatch):
  """A new framework, its own config section, its own weight-decay exclusions and a plug-in
  (TokenProp) go through the command line, the validation phase and the real trainer with nothing
  else of mimjax touched."""
  import importlib  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from conftest import set_fields, tiny_overrides  # pylint: disable=import-outside-toplevel
  from mimjax import startup  # pylint: disable=import-outside-toplevel
  from mimjax import train  # pylint: disable=import-outside-toplevel
  from mimjax import train_step  # pylint: disable=import-outside-toplevel
  (tmp_path / 'one_module_framework.py').write_text(_ONE_MODULE_FRAMEWORK)
  monkeypatch.syspath_prepend(str(tmp_path))
  module = importlib.import_module('one_module_framework')
  monkeypatch.setitem(registry.FRAMEWORKS, 'mean_colour', module.MeanColour)  # the one line

  # Its section is set on the command line as any other (`--config.mean_colour.scale`), and
  # --print_config shows it for this run, hiding the other frameworks' sections.
  argv = ['train', '--config=configs/mae.py:runlocal', '--config.framework=mean_colour',
          '--config.mean_colour.scale=2.0']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  config_lib.parse_flags(argv, flag_values)
  config = flag_values.config
  printed = startup.format_config(config, everything=False).splitlines()
  assert 'mean_colour.scale = 2.0' in printed
  assert not [line for line in printed if line.startswith('mae.')]
  # Its own check_config refuses a bad value in the one validation phase.
  with pytest.raises(errors.ConfigError, match=r'^config\.mean_colour\.scale=-1\.0'):
    validation.validate(set_fields(config.copy_and_resolve_references(),
                                   **{'mean_colour.scale': -1.0}))

  config = set_fields(config, **tiny_overrides(**{
      'total_steps': 2, 'checkpoint.every_steps': 2, 'eval.every_steps': 0,
      'tokenprop.enabled': True, 'tokenprop.hidden': 16, 'optim.weight_decay': 0.5}))
  workdir = tmp_path / 'run'
  final = train.train(config, str(workdir))
  assert final['step'] == 2 and np.isfinite(final['loss']) and 'loss_tokenprop' in final
  # The run's config.json holds the section and reads back with the whole schema.
  assert config_lib.read_config(str(workdir)).mean_colour.scale == 2.0

  # With zero gradients an AdamW step is pure decay, -lr * wd * p: the framework's `cls` and the
  # 1-D parameters stay, every other matrix shrinks.
  fw = registry.build(config)
  batch = {'image': jnp.zeros((2, 28, 28, 3)), 'label': jnp.zeros((2,), jnp.int32)}
  params = jax.jit(fw.init)(jax.random.PRNGKey(0), batch)[0]
  _, _, tx, lr = train_step.build(fw, config, batch)
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  for _ in range(int(config.warmup_steps) + 1):  # the last update at the peak lr, past warmup
    updates, state = update(zeros, state, params)
  encoder, peak = updates['encoder'], float(lr(int(config.warmup_steps)))
  assert peak > 0 and not np.any(encoder['cls']) and not np.any(encoder['embedding']['bias'])
  np.testing.assert_allclose(encoder['embedding']['kernel'],
                             -peak * 0.5 * np.asarray(params['encoder']['embedding']['kernel']),
                             rtol=1e-5)
