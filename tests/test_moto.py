"""MoTo: instance-norm limit, partition weights, weighted statistics, ViT wiring, and the
recipe's parameter overhead against the paper's Table 2."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from conftest import load_config
from mimjax import errors
from mimjax import validation
from mimjax.models import moto
from mimjax.models import vit


def _instance_norm(x, beta, alpha, eps):
  mean = x.mean(axis=(1, 2), keepdims=True)
  std = x.std(axis=(1, 2), keepdims=True)
  return (x - mean) / (std + eps) * beta + alpha


def test_single_entity_is_instance_norm():
  """With n = 1 the layout is 1 everywhere, so MoTo is instance norm whatever f, k, q learn."""
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (2, 8, 8, 5)).astype(np.float32)
  module = moto.MoTo(entities=1, key_dim=4)
  params = module.init(jax.random.PRNGKey(0), x)['params']
  beta = rng.normal(size=(1, 5)).astype(np.float32)
  alpha = rng.normal(size=(1, 5)).astype(np.float32)
  params = dict(params, beta=beta, alpha=alpha)
  out = module.apply({'params': params}, x)
  np.testing.assert_allclose(out, _instance_norm(x, beta[0], alpha[0], 1e-5), rtol=1e-4, atol=1e-4)


def test_hard_layout_normalises_each_region_separately():
  """A one-hot layout makes eq. 5 an instance norm per region, with that region's affine."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 4, 6, 3)).astype(np.float32)
  layout = np.zeros((1, 4, 6, 2), np.float32)
  layout[:, :, :2, 0] = 1.0  # left two columns: entity 0
  layout[:, :, 2:, 1] = 1.0
  beta = rng.normal(size=(2, 3)).astype(np.float32)
  alpha = rng.normal(size=(2, 3)).astype(np.float32)
  out = np.asarray(moto.modulate(x, layout, beta, alpha, 1e-5))
  left, right = x[:, :, :2], x[:, :, 2:]
  np.testing.assert_allclose(out[:, :, :2], _instance_norm(left, beta[0], alpha[0], 1e-5),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out[:, :, 2:], _instance_norm(right, beta[1], alpha[1], 1e-5),
                             rtol=1e-4, atol=1e-4)


def test_soft_layout_statistics_match_weighted_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  logits = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
  layout = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  beta = rng.normal(size=(4, 3)).astype(np.float32)
  alpha = rng.normal(size=(4, 3)).astype(np.float32)
  expected = np.zeros_like(x)
  for b in range(2):
    for i in range(4):
      w = layout[b, :, :, i][..., None]
      mu = (w * x[b]).sum((0, 1)) / w.sum()
      sigma = np.sqrt((w * (x[b] - mu) ** 2).sum((0, 1)) / w.sum())
      expected[b] += ((x[b] - mu) / (sigma + 1e-5) * beta[i] + alpha[i]) * w
  out = moto.modulate(x, layout, beta, alpha, 1e-5)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_partition_weights_sum_to_one_per_pixel():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, 16))
  module = moto.MoTo(entities=8)
  variables = module.init(jax.random.PRNGKey(1), x)
  _, state = module.apply(variables, x, mutable=['intermediates'])
  layout = state['intermediates']['layout'][0]
  assert layout.shape == (2, 12, 12, 8)
  np.testing.assert_allclose(layout.sum(-1), 1.0, rtol=1e-5)
  assert float(layout.min()) > 0.0


def test_grid_points_are_cell_centres():
  rows, cols = moto.grid_points(8, 16, 8)  # 2 x 4 grid of 4 x 4 cells
  np.testing.assert_array_equal(rows, [2, 2, 2, 2, 6, 6, 6, 6])
  np.testing.assert_array_equal(cols, [2, 6, 10, 14, 2, 6, 10, 14])
  rows, cols = moto.grid_points(7, 7, 1)
  np.testing.assert_array_equal(rows, [3])
  np.testing.assert_array_equal(cols, [3])


def test_vit_with_moto_tokenizer():
  c = common.base_config()
  c.model.variant = 'mu/4'
  c.model.tokenizer_norm = 'moto'
  model = vit.ViT(**vit.encoder_kwargs(c.model, 28))
  images = jnp.ones((2, 28, 28, 3))
  params = model.init(jax.random.PRNGKey(0), images)['params']
  assert 'embedding' not in params
  assert params['tokenizer']['stem']['kernel'].shape == (3, 3, 3, 16)
  assert params['tokenizer']['moto']['u'].shape == (1, 1, 8)
  assert params['tokenizer']['embedding']['kernel'].shape == (4, 4, 16, 32)
  out = model.apply({'params': params}, images)
  assert out['tokenizer'].shape == (2, 49, 32)

  c.model.moto.stem_channels = 0  # MoTo directly on the image
  model = vit.ViT(**vit.encoder_kwargs(c.model, 28))
  params = model.init(jax.random.PRNGKey(0), images)['params']
  assert 'stem' not in params['tokenizer']
  assert params['tokenizer']['moto']['beta'].shape == (8, 3)


def test_patch_embedding_equals_strided_conv():
  # The matmul form must be the stride-p convolution with the same params (checkpoints unchanged).
  x = np.random.default_rng(0).standard_normal((2, 8, 12, 5)).astype(np.float32)
  emb = moto.PatchEmbedding(width=6, patch_size=4)
  conv = nn.Conv(6, (4, 4), strides=(4, 4), padding='VALID')
  variables = emb.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_map(np.shape, variables) == jax.tree_util.tree_map(
      np.shape, conv.init(jax.random.PRNGKey(0), x))
  np.testing.assert_allclose(emb.apply(variables, x), conv.apply(variables, x), rtol=1e-5,
                             atol=1e-5)


def test_strided_stem_keeps_one_token_per_patch():
  c = common.base_config()
  c.model.variant = 'mu/4'
  c.model.tokenizer_norm = 'moto'
  c.model.moto.stem_channels, c.model.moto.stem_stride = 5, 2
  model = vit.ViT(**vit.encoder_kwargs(c.model, 28))
  images = jnp.ones((2, 28, 28, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  params = variables['params']['tokenizer']
  assert params['stem']['kernel'].shape == (3, 3, 3, 5)
  assert params['embedding']['kernel'].shape == (2, 2, 5, 32)  # 4 px = 2 cells of the 14 x 14 map
  out, state = model.apply(variables, images, mutable=['intermediates'])
  assert out['tokenizer'].shape == (2, 49, 32)
  assert state['intermediates']['tokenizer']['moto']['layout'][0].shape == (2, 14, 14, 8)


@pytest.mark.parametrize('stride,channels', [(3, 16), (2, 0)])
def test_stem_stride_that_cannot_work_is_refused(stride, channels):
  c = load_config('configs/supervised.py:runlocal,moto', **{
      'model.moto.stem_stride': stride, 'model.moto.stem_channels': channels})
  with pytest.raises(errors.ConfigError, match='stem_stride'):
    validation.validate(c)


# DeiT's parameter counts (timm deit_small_patch16_224 / deit_base_patch16_224) and MoTo's
# Table 2: DeiT-S 22.1M -> 22.5M (+0.4M), DeiT-B 86.6M -> 86.9M (+0.3M).
@pytest.mark.parametrize('variant,deit,table2', [('S/16', 22_050_664, 0.4e6),
                                                 ('B/16', 86_567_656, 0.3e6)])
def test_moto_parameter_overhead_matches_table_2(variant, deit, table2):
  counts = []
  for moto_arg in ('', ',moto'):
    c = load_config(f'configs/supervised.py:model={variant}{moto_arg}')
    model = vit.ViT(**vit.encoder_kwargs(c.model, c.data.image_size))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    counts.append(vit.count_params(shapes['params']))
  assert counts[0] == deit
  assert abs(counts[1] - counts[0] - table2) <= 0.05e6, counts[1] - counts[0]
