"""ViT encoder against independent facts: timm parameter counts, MAE's position embedding formula,
permutation equivariance, attention rows that sum to one."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax.models import posemb
from mimjax.models import vit


def _param_count(variant, **kw):
  model = vit.ViT(**{**vit.parse_variant(variant), 'image_size': 224, 'posemb': 'learn',
                     'cls_token': True, 'num_classes': 1000, **kw})
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3))))
  return vit.count_params(shapes['params'])


@pytest.mark.parametrize('variant,expected', [('S/16', 22_050_664), ('B/16', 86_567_656)])
def test_param_counts_match_timm(variant, expected):
  # timm: vit_small_patch16_224 / vit_base_patch16_224 (cls token, learned posemb, 1000 classes).
  assert _param_count(variant) == expected


def test_sincos_matches_mae_formula():
  grid, width = 3, 8
  emb = posemb.sincos_2d(grid, width)
  assert emb.shape == (9, 8)
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  for idx in range(9):
    row, col = divmod(idx, grid)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                               np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(emb[idx], expected, atol=1e-6)


def _tiny(**kw):
  args = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=16)
  args.update(kw)
  return vit.ViT(**args)


@pytest.mark.parametrize('posemb_kind', ['learn', 'sincos2d'])
def test_visible_tokens_are_permutation_equivariant(posemb_kind):
  """Reordering the kept patches reorders the output tokens the same way: position comes only
  from the position embedding, gathered together with each patch."""
  model = _tiny(posemb=posemb_kind)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(1), images)
  keep = jnp.array([[0, 3, 5, 9, 14], [1, 2, 7, 8, 15]])
  perm = jnp.array([4, 0, 3, 1, 2])
  out = model.apply(params, images, keep_idx=keep)['patch_tokens']
  out_perm = model.apply(params, images, keep_idx=keep[:, perm])['patch_tokens']
  np.testing.assert_allclose(out_perm, out[:, perm], atol=1e-5)


def test_position_embedding_breaks_patch_permutation_invariance():
  """Shuffling image patches (not their positions) changes the features: positions matter."""
  model = _tiny(posemb='sincos2d', pool='gap', cls_token=False)
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(1), images)
  swapped = images.at[:, :4, :4].set(images[:, 12:, 12:]).at[:, 12:, 12:].set(images[:, :4, :4])
  a = model.apply(params, images)['pooled']
  b = model.apply(params, swapped)['pooled']
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_intermediates_and_attention():
  model = _tiny()
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(1), images)
  out = model.apply(params, images, capture_layers=True, capture_attention=True)
  assert len(out['layers']) == 3 and len(out['attention']) == 2
  assert out['tokens'].shape == (2, 17, 32) and out['patch_tokens'].shape == (2, 16, 32)
  for weights in out['attention']:
    assert weights.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  plain = model.apply(params, images)
  assert plain['layers'] is None and plain['attention'] is None
  np.testing.assert_allclose(plain['tokens'], out['tokens'], atol=1e-6)


def test_mask_token_substitution():
  """A masked patch's content does not reach the encoder: only the mask token does."""
  model = _tiny(posemb='sincos2d')
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(1), images)
  mask = jnp.zeros((1, 16), bool).at[0, 0].set(True)
  token = jnp.ones((32,))
  changed = images.at[:, :4, :4].add(5.0)  # patch 0 only
  a = model.apply(params, images, mask=mask, mask_token=token)['tokens']
  b = model.apply(params, changed, mask=mask, mask_token=token)['tokens']
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_gap_pooling_and_head():
  model = _tiny(pool='gap', cls_token=False, num_classes=5)
  images = jnp.zeros((3, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), images)
  out = model.apply(params, images)
  np.testing.assert_allclose(out['pooled'], out['patch_tokens'].mean(1), atol=1e-6)
  assert out['logits'].shape == (3, 5)


def test_bad_inputs():
  with pytest.raises(ValueError, match='not a multiple of patch size'):
    model = _tiny(image_size=18)
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 18, 18, 3)))
  with pytest.raises(ValueError, match='expected images'):
    model = _tiny()
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 3)))
  with pytest.raises(ValueError, match='Unknown model variant'):
    vit.parse_variant('Q/16')


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16)
  images = jnp.ones((1, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), images)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = model.apply(params, images, capture_attention=True)
  assert out['attention'][0].dtype == jnp.float32  # softmax in float32
  assert out['tokens'].dtype == jnp.float32  # final norm in float32


def test_qkv_init_has_the_fused_xavier_std():
  # timm's fused qkv Linear [3D, D], Xavier-uniform: std = sqrt(2 / (D + 3D)); separate q, k, v
  # kernels with their own fans would have sqrt(2) times that.
  width = 384
  attn = vit.MultiHeadAttention(num_heads=6)
  params = attn.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, width)))['params']
  want = math.sqrt(2 / (width + 3 * width))
  for name in ('query', 'key', 'value'):
    kernel = np.asarray(params[name]['kernel'])
    assert kernel.shape == (width, 6, 64)
    np.testing.assert_allclose(kernel.std(), want, rtol=0.01)
    assert np.abs(kernel).max() <= math.sqrt(3) * want  # uniform on [-a, a], a = sqrt(3) std


@pytest.mark.parametrize('weight_init', ['default', 'beit'])
def test_fused_qkv_equals_three_dense_generals(weight_init):
  """The one [D, 3D] product gives flax DenseGeneral's q/k/v on the same params (and the same
  param tree and initial values as three DenseGenerals named query/key/value)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  heads, width = 4, 32
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, width))
  attention = vit.MultiHeadAttention(heads, weight_init=weight_init, layer_id=2)
  params = attention.init(jax.random.PRNGKey(0), x)['params']

  class Reference(nn.Module):  # the separate DenseGeneral layout the fused path replaces
    @nn.compact
    def __call__(self, x):
      beit = weight_init == 'beit'
      init = vit.beit_normal() if beit else vit.qkv_init
      proj = lambda name: nn.DenseGeneral((heads, width // heads), name=name, kernel_init=init,  # noqa: E731
                                          use_bias=not (beit and name == 'key'))
      q, k, v = proj('query')(x), proj('key')(x), proj('value')(x)
      out, _ = vit.dot_product_attention(q, k, v)
      return nn.DenseGeneral(width, axis=(-2, -1), name='out')(out)

  ref_params = Reference().init(jax.random.PRNGKey(0), x)['params']
  assert jax.tree_util.tree_structure(ref_params) == jax.tree_util.tree_structure(params)
  for name in ('query', 'key', 'value'):
    for leaf in ref_params[name]:
      np.testing.assert_array_equal(ref_params[name][leaf], params[name][leaf])
  params = jax.tree_util.tree_map(  # non-zero biases, so the bias path is checked too
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  out, _ = attention.apply({'params': params}, x)
  np.testing.assert_allclose(out, Reference().apply({'params': params}, x), rtol=1e-5, atol=1e-6)
