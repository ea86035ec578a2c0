"""SimMIM: cell masks (counts, grid alignment), the L1 loss against SimMIM's pixel formula, the
mask-token wiring of the encoder, config checks, visualisation and a short runlocal run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from conftest import tiny_overrides
from configs import simmim
from mimjax import errors
from mimjax import registry
from mimjax import losses
from mimjax import visualize
from mimjax import masking
from mimjax import train
from mimjax import validation
from mimjax.models import vit


@pytest.mark.parametrize('grid,cell,ratio,cells_masked', [
    (14, 2, 0.6, 30),  # ViT-B/16 at 224 px with 32 px cells: ceil(49 * 0.6) of 7 x 7 cells
    (7, 2, 0.6, 10),  # 28 px, patch 4, 8 px cells: ceil(16 * 0.6) of 4 x 4 cells, cut at the border
    (7, 3, 0.5, 5),  # 12 px cells: ceil(9 * 0.5) of 3 x 3 cells
])
def test_cell_mask_counts_and_alignment(grid, cell, ratio, cells_masked):
  mask = np.asarray(masking.random_cells(jax.random.PRNGKey(0), 64, grid, cell, ratio))
  assert mask.shape == (64, grid * grid) and mask.dtype == bool
  cells = -(-grid // cell)
  padded = np.zeros((64, cells * cell, cells * cell), bool)
  padded[:, :grid, :grid] = mask.reshape(64, grid, grid)
  blocks = padded.reshape(64, cells, cell, cells, cell)
  # Every cell is entirely masked or entirely visible (inside the image).
  firsts = blocks[:, :, :1, :, :1]
  inside = np.zeros_like(padded)
  inside[:, :grid, :grid] = True
  inside = inside.reshape(blocks.shape)
  assert np.all((blocks == firsts) | ~inside)
  assert np.all(firsts.sum(axis=(1, 2, 3, 4)) == cells_masked)
  assert len({m.tobytes() for m in mask}) > 32  # samples differ (>= 126 possible masks)
  if cell * cells == grid:  # no cut cells: the number of masked patches is exact too
    assert np.all(mask.sum(1) == cells_masked * cell * cell)


def test_cell_mask_frequencies_are_uniform():
  mask = masking.random_cells(jax.random.PRNGKey(1), 4000, 4, 1, 0.5)
  np.testing.assert_allclose(np.asarray(mask).mean(0), 0.5, atol=0.04)


def test_simmim_loss_matches_simmim_pixel_formula():
  rng = np.random.default_rng(0)
  b, size, p, c = 2, 8, 2, 3
  images = rng.normal(size=(b, size, size, c)).astype(np.float32)
  recon = rng.normal(size=(b, size, size, c)).astype(np.float32)
  grid = size // p
  patch_mask = rng.random((b, grid * grid)) < 0.4
  patch_mask[:, 0] = True
  # SimMIM: pixel mask by repeating the patch mask, sum |x - x_rec| * m / sum(m) / channels.
  pixel_mask = patch_mask.reshape(b, grid, grid).repeat(p, 1).repeat(p, 2)[..., None]
  want = (np.abs(images - recon) * pixel_mask).sum() / pixel_mask.sum() / c
  # The same reconstruction as per-patch predictions [B, N, p*p*C] in (row, col, channel) order.
  pred = np.stack([recon[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
                   for i in range(grid) for j in range(grid)], axis=1)
  got = losses.simmim_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(patch_mask), p)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _framework(variant='mu/4'):
  config = simmim.get_config('runlocal')
  config.model.variant = variant
  validation.validate(config)
  fw = registry.build(config)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 3))
  params, state = jax.jit(fw.init)(jax.random.PRNGKey(1), {'image': images})
  return config, fw, params, state, {'image': images}


def test_model_substitutes_the_mask_token_and_predicts_pixels():
  config, fw, params, state, batch = _framework()
  assert set(params) == {'encoder', 'mask_token', 'head'}
  width = params['mask_token'].shape[-1]
  assert params['head']['kernel'].shape == (width, 4 * 4 * 3)
  mask = fw.sample_mask(jax.random.PRNGKey(3), 4)
  enc, pred = fw.model.apply({'params': params}, batch['image'], mask,
                             capture=frozenset({'encoder_layers'}))
  assert pred.shape == (4, 49, 48)
  # SimMIM's ViT adds no absolute position embedding (its shared relative bias acts in attention)
  assert vit.from_config(config).bind({'params': params['encoder']}).position_embedding() == (
      None, None)
  layer0 = np.asarray(enc['layers'][0][:, 1:])  # cls first
  mask = np.asarray(mask)
  np.testing.assert_allclose(layer0[mask], np.broadcast_to(params['mask_token'][0],
                                                           layer0[mask].shape), atol=1e-6)
  assert np.abs(layer0[~mask] - np.asarray(params['mask_token'][0])).max() > 1e-3
  assert config.simmim.mask_patch_size == 8


def test_forward_loss_is_l1_on_masked_patches_and_jits_once():
  _, fw, params, state, batch = _framework()
  traces = []

  def forward(p, rng):
    traces.append(1)
    return fw.forward(p, state, batch, rng, True)

  jitted = jax.jit(forward)
  for seed in range(2):
    loss, _, outputs = jitted(params, jax.random.PRNGKey(seed))
  assert len(traces) == 1
  want = losses.simmim_loss(outputs.reconstruction, batch['image'], outputs.mask, 4)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  grid = fw.visualize(jax.device_get(outputs), jax.device_get(batch))['reconstruction']
  # 4 rows x 4 columns of 28 px tiles, enlarged 4x (to at least 96 px), 2 px gaps, titles above.
  assert grid.dtype == np.uint8 and grid.shape == (
      visualize.TITLE_HEIGHT + 4 * 114 + 2, 4 * 114 + 2, 3)


@pytest.mark.parametrize('key,value,match', [
    ('mask_patch_size', 6, 'mask_patch_size'),  # not a multiple of the 4-pixel patch
    ('mask_ratio', 1.0, 'mask_ratio'),
    ('mask_ratio', 0.0, 'mask_ratio'),
])
def test_config_rejects_bad_masking(key, value, match):
  config = simmim.get_config('runlocal')
  config.simmim[key] = value
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(config)


def test_recipe_learning_rate():
  config = simmim.get_config()
  # SimMIM scales base lr 1e-4 by batch / 512: 4e-4 at the recipe's batch of 2048.
  peak = config.optim.base_lr * config.batch_size / config.optim.lr_base_batch
  np.testing.assert_allclose(peak, 4e-4)
  assert (config.optim.b1, config.optim.b2) == (0.9, 0.999)


def test_runlocal_loss_decreases(tmp_path):
  config = load_config('configs/simmim.py:runlocal', **tiny_overrides(**{
      'batch_size': 32, 'total_steps': 30, 'warmup_steps': 5, 'log.every_steps': 10,
      'checkpoint.every_steps': 30, 'log.images_every_steps': 30, 'optim.base_lr': 3e-3,
      'optim.lr_base_batch': 32}))
  train.train(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert records[-1]['loss_simmim'] < 0.9 * records[0]['loss_simmim']
  assert os.listdir(os.path.join(tmp_path, 'images')) == ['reconstruction_0000030.png']
