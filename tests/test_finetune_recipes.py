"""Each pre-training method is fine-tuned with its own paper's recipe, picked from the run's config:
the derived config states every value of that recipe's table in docs/recipes.md, and
`evaluate --print_config` shows it without training."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from conftest import load_config
from configs import finetune as finetune_config
from mimjax import config_lib
from mimjax import finetune
from mimjax.interop import pretrained
import test_recipes

# Pre-training config -> the docs/recipes.md fine-tuning section that must describe its recipe.
CASES = {
    'configs/mae.py': 'configs/finetune.py',
    'configs/mae_lut.py': 'configs/finetune.py:recipe=mae_lut',
    'configs/mae_mto.py': 'configs/finetune.py:recipe=mae_mto',
    'configs/simmim.py': 'configs/finetune.py:recipe=simmim',
    'configs/simmim_mto.py': 'configs/finetune.py:recipe=simmim_mto',
    'configs/distill.py:dtm': 'configs/finetune.py:recipe=distill_dtm',
    'configs/distill.py': 'configs/finetune.py:recipe=distill',
}
# Set from the pre-training run, not by the recipe; checked on their own below.
FROM_RUN = ('model.posemb', 'model.rel_pos')


def workdir_of(tmp_path, spec):
  """A directory holding only the config.json a pre-training run of `spec` writes."""
  (tmp_path / 'config.json').write_text(config_lib.to_json(load_config(spec)))
  return str(tmp_path)


def doc_rows(section_spec):
  rows = [rows for (_, spec), rows in test_recipes.SECTIONS.items() if spec == section_spec]
  assert len(rows) == 1, f'docs/recipes.md has no single section for {section_spec}'
  return rows[0]


@pytest.mark.parametrize('pretrain,section', sorted(CASES.items()))
def test_derived_config_states_its_recipe_table(tmp_path, pretrain, section):
  config = finetune.planned_config(workdir_of(tmp_path, pretrain))
  checked = 0
  for key, stated in doc_rows(section):
    if key not in FROM_RUN:
      assert test_recipes.literal(stated) == test_recipes.value(config, key), (section, key)
      checked += 1
  assert checked >= 5
  pre = load_config(pretrain)
  assert config.model.posemb == ('none' if pre.model.posemb == 'none' else 'learn')
  assert config.model.rel_pos == ('none' if pre.model.rel_pos == 'none' else 'block')
  assert config.init.checkpoint == str(tmp_path)


def test_recipe_follows_the_plugins_and_can_be_overridden(tmp_path):
  workdir = workdir_of(tmp_path, 'configs/simmim_mto.py')
  assert finetune.recipe_for(load_config('configs/simmim_mto.py')) == 'simmim_mto'
  assert finetune.recipe_for(load_config('configs/supervised.py')) == 'mae'
  mae = finetune.planned_config(workdir, finetune_config='model=B/16,recipe=mae')
  assert (mae.optim.layer_decay, mae.batch_size, mae.optim.grad_clip) == (0.65, 1024, 0.0)
  with pytest.raises(ValueError, match='recipe'):
    finetune_config.get_config('recipe=beit')


def test_print_config_shows_the_recipe_without_a_checkpoint(tmp_path):
  workdir = workdir_of(tmp_path, 'configs/distill.py:dtm')
  out = subprocess.run(
      [sys.executable, '-m', 'mimjax.evaluate', '--workdir', workdir, '--protocol', 'finetune',
       '--print_config'], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert '  layer_decay: 0.65' in lines and '  warmup_init_lr: 1.0e-06' in lines
  assert 'warmup_steps: 12511' in lines and '  rel_pos: block' in lines


def test_shared_table_is_added_into_every_block():
  shared, own = np.full((5, 2), 1.0), np.arange(10.0).reshape(5, 2)
  transformer = {'rel_pos_bias': {'relative_position_bias_table': shared},
                 'encoderblock_0': {'rel_pos_bias': {'relative_position_bias_table': own}},
                 'encoderblock_1': {'LayerNorm_0': {}}, 'encoder_norm': {}}
  out = pretrained._shared_into_blocks(transformer)
  assert 'rel_pos_bias' not in out
  np.testing.assert_array_equal(
      out['encoderblock_0']['rel_pos_bias']['relative_position_bias_table'], own + 1.0)
  np.testing.assert_array_equal(
      out['encoderblock_1']['rel_pos_bias']['relative_position_bias_table'], shared)


def test_finetune_workdir_names_the_steps_and_another_recipe():
  # Another length or recipe gets its own folder, so a resume never meets a changed config.
  from mimjax import finetune  # pylint: disable=g-import-not-at-top
  from mimjax.reproduce import study as reproduce  # pylint: disable=g-import-not-at-top
  from mimjax.eval import loading  # pylint: disable=g-import-not-at-top
  pre = reproduce.build_config('mae', reproduce.row_overrides('mae', 0, reproduce.BUDGETS['cpu']))
  run = loading.Run(pre, None, 1500, '/w', False)
  own = finetune.recipe_for(pre)
  assert finetune.workdir_name(run) == 'finetune'
  assert finetune.workdir_name(run, total_steps=100) == 'finetune_steps100'
  assert finetune.workdir_name(run, total_steps=600) == 'finetune_steps600'
  assert finetune.workdir_name(run, 0.01, 600) == 'finetune_labels0.01_step1500_steps600'
  assert finetune.workdir_name(run, finetune_config=f'model=Ti/4,recipe={own}') == 'finetune'
  assert finetune.workdir_name(run, None, None, 'recipe=simmim') == 'finetune_recipesimmim'
