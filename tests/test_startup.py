"""startup: the config a run reads, found from any directory by path or recipe name, shown by
`--print_config` and `--help`, and summarised by `--dry_run` without writing anything."""
import ast
import os

import pytest

from conftest import ROOT, TINY_DECODER, file_tree, load_config, tiny_overrides
from configs import common
from mimjax import recipe_lib
from mimjax import startup
from mimjax import train

_TINY = tiny_overrides(**TINY_DECODER)


def _leaf_keys(tree, prefix=''):
  keys = []
  for key in tree.keys():
    if hasattr(tree[key], 'keys'):
      keys += _leaf_keys(tree[key], f'{prefix}{key}.')
    else:
      keys.append(prefix + key)
  return keys


def test_print_config_lists_every_field_with_its_value():
  config = load_config('configs/simmim.py:runlocal', **{'batch_size': 48})
  lines = startup.format_config(config).splitlines()
  values = {}
  for line in lines:
    key, _, value = line.partition(' = ')
    values[key] = ast.literal_eval(value)
  assert sorted(values) == sorted(_leaf_keys(common.base_config()))
  assert values['batch_size'] == 48 and values['framework'] == 'simmim'
  assert values['data.name'] == config.data.name and values['mesh.data'] == config.mesh.data
  shown = startup.format_config(config, everything=False).splitlines()
  assert shown[-1] == ('# not read by this run, not shown (--print_all shows them): distill, dtm, '
                       'lut, mae, mto, supervised, tokenprop')
  assert 'simmim.mask_ratio = 0.6' in shown and 'data.name = ' + repr(config.data.name) in shown
  assert not [line for line in shown[:-1] if line.startswith(('mae.', 'distill.', 'lut.'))]
  with config.unlocked():
    config.framework, config.mae.target = 'mae', 'teacher'  # MAE reads the distill teacher's
  assert 'distill.teacher' in startup.format_config(config, everything=False)


def test_shipped_recipe_is_found_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = os.path.join(ROOT, 'configs', 'mae.py')
  for spec in ('configs/mae.py:runlocal', 'mae:runlocal'):
    path, _, arg = startup.resolve_config_path(spec).rpartition(':')
    assert os.path.samefile(path, shipped) and arg == 'runlocal'
  assert os.path.samefile(startup.resolve_config_path('mae'), shipped)
  own = tmp_path / 'mine.py'
  own.write_text('')
  assert startup.resolve_config_path('mine.py:x') == 'mine.py:x'  # a path that exists wins
  assert startup.resolve_config_argv(['p', '--config', 'simmim', '--config.seed=1'])[2] == \
      os.path.join(ROOT, 'configs', 'simmim.py')
  with pytest.raises(SystemExit, match=r'error: no config file .*maee.*mae, mae_lut'):
    startup.resolve_config_path('configs/maee.py')


def test_config_help_names_every_recipe_and_the_override_syntax():
  shipped = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs'))
                   if f.endswith('.py') and f not in ('__init__.py', 'common.py'))
  assert recipe_lib.recipe_names() == shipped
  text = startup.config_help()
  assert '--config.KEY=VALUE' in text
  assert all(f'\n  {name}: ' in text for name in shipped)  # one line per recipe
  assert startup.recipe_arguments('mae') == 'model=B/16, epochs=800, runlocal'
  assert startup.recipe_arguments('mae_mto') == startup.recipe_arguments('mae')  # as it delegates


def test_dry_run_prints_the_summary_and_writes_nothing(tmp_path, capsys):
  config = load_config('configs/mae.py:runlocal', **dict(_TINY, **{'optim.accum_steps': 2}))
  workdir = str(tmp_path / 'run')
  assert train.train(config, workdir, dry_run=True) is None
  assert not os.path.exists(workdir)
  out = capsys.readouterr().out
  # mu/4 encoder on 28 px RGB: patch embedding 4*4*3*32+32, cls 32, one block (2 LayerNorms 2*64,
  # qkv 3*(32*32+32), proj 32*32+32, MLP 32*128+128+128*32+32), final LayerNorm 64; sin-cos
  # positions are not parameters.
  encoder = 4 * 4 * 3 * 32 + 32 + 32 + 2 * 64 + 3 * (32 * 32 + 32) + 32 * 32 + 32 + \
      32 * 128 + 128 + 128 * 32 + 32 + 64
  assert f'encoder {encoder:,}' in out
  assert 'batch: 16 global, 16 per host, 2 accumulation steps of 8' in out
  assert 'steps: 6 (0.19 epochs)' in out  # 6 steps * 16 / 512 examples
  assert 'data: fashion_mnist: train[:512] (512 examples)' in out
  assert "mesh {'data': 1, 'fsdp': 1}" in out and f'workdir: {workdir}' in out
  assert out.strip().endswith('starting fresh')


def test_dry_run_on_a_trained_workdir_says_resuming_and_changes_nothing(trained, capsys):
  config, workdir = trained  # 3 steps, checkpoint 3
  before = file_tree(workdir)
  capsys.readouterr()
  with config.unlocked():
    config.total_steps = 9
    config.resume.accept_changes = 'total_steps'  # extending a run is a deliberate change
  train.train(config, workdir, dry_run=True)
  assert 'resuming from step 3' in capsys.readouterr().out
  assert file_tree(workdir) == before
