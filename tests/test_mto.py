"""MTO: entropies against hand and numpy references, loss directions, gradients, jit, configs."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from conftest import tiny_overrides
from configs import mae_mto
from configs import simmim_mto
from mimjax import errors
from mimjax import registry
from mimjax import train
from mimjax import validation
from mimjax.plugins import mto


def _np_entropy(p):
  p = np.asarray(p, np.float64)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def _np_reference(x, mask, tau, layer_norm):
  """Heterogeneity (eq. 2) and L_spa (each visible row over the other tokens) with explicit loops
  over images and rows (float64)."""
  x = np.asarray(x, np.float64)
  if layer_norm:
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  hs, spas = [], []
  for xi, mi in zip(x, mask):
    vis, msk = np.flatnonzero(~mi), np.flatnonzero(mi)
    hs.append(np.mean([_np_entropy(_np_softmax(xi[vis] @ xi[r] / tau)) for r in msk]))
    spas.append(np.mean([_np_entropy(_np_softmax(np.delete(xi, r, 0) @ xi[r] / tau))
                         for r in vis]))
  return np.mean(hs), np.mean(spas)


def test_row_entropy_hand_cases():
  # softmax([0, ln 2, ln 3]) = [1, 2, 3] / 6.
  logits = jnp.log(jnp.array([1.0, 2.0, 3.0]))
  want = -sum(p * math.log(p) for p in (1 / 6, 2 / 6, 3 / 6))
  np.testing.assert_allclose(mto.row_entropy(logits, True), want, rtol=1e-6)
  # The third column is excluded, whatever its logit: softmax over [0, ln 2] = [1/3, 2/3].
  logits = jnp.array([0.0, math.log(2.0), 100.0])
  want = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
  valid = jnp.array([True, True, False])
  np.testing.assert_allclose(mto.row_entropy(logits, valid), want, rtol=1e-6)
  grad = jax.grad(lambda z: mto.row_entropy(z, valid))(logits)
  assert np.all(np.isfinite(grad)) and grad[2] == 0


def test_heterogeneity_hand_case_averages_per_image_then_batch():
  # Image 0: masked token [1, 0] against visible [1, 0] and [0, 1]: softmax([1, 0]).
  # Image 1: two masked rows, one visible token: every row has entropy 0.
  x = jnp.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
                 [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
  mask = jnp.array([[True, False, False], [True, True, False]])
  h_img0 = _np_entropy(_np_softmax([1.0, 0.0]))
  got = mto.heterogeneity(x, mask, tau=1.0, layer_norm=False)
  np.testing.assert_allclose(got, h_img0 / 2, rtol=1e-6)  # not h_img0 / 3 (mean over all rows)


@pytest.mark.parametrize('layer_norm,tau', [(False, 1.0), (True, None), (False, 2.0)])
def test_heterogeneity_and_sparsity_match_numpy_reference(layer_norm, tau):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 10, 8)).astype(np.float32)
  mask = rng.random((3, 10)) < 0.5
  mask[:, 0], mask[:, 1] = True, False  # at least one masked and one visible token per image
  want_h, want_spa = _np_reference(x, mask, tau or math.sqrt(8), layer_norm)
  np.testing.assert_allclose(mto.heterogeneity(x, jnp.asarray(mask), tau, layer_norm), want_h,
                             rtol=1e-5)
  np.testing.assert_allclose(mto.sparsity_loss(x, jnp.asarray(mask), tau, layer_norm), want_spa,
                             rtol=1e-5)


def test_defaults_are_eq2_on_raw_features():
  # Eq. (2) by hand: A = row-softmax(X_M X_V^T) on the raw features, no temperature.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 9, 6)).astype(np.float32)
  mask = np.zeros((2, 9), bool)
  mask[:, [0, 3, 4, 7]] = True
  want = []
  for xi, mi in zip(x.astype(np.float64), mask):
    a = np.exp(xi[mi] @ xi[~mi].T)
    a /= a.sum(1, keepdims=True)
    want.append(np.mean(-(a * np.log(a)).sum(1)))
  np.testing.assert_allclose(mto.heterogeneity(jnp.asarray(x), jnp.asarray(mask)), np.mean(want),
                             rtol=1e-5)
  config = simmim_mto.get_config(None)
  assert mto.affinity_options(config.mto) == dict(tau=1.0, layer_norm=False)
  assert not config.mto.spa_self


def test_sparsity_is_live_on_random_tokens():
  # Correlation logits (layer-normalised, tau = sqrt(D)) of random tokens are ~N(0, 1) off the
  # diagonal, and the entropy of a softmax over n logits of variance s^2 is ~log n - s^2 / 2: a
  # near-uniform row. With the token itself included its logit is sqrt(D) = 8 and takes ~0.97 of
  # the mass: the printed form is ~0.2, and ~0 with raw features.
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 49, 64)), jnp.float32)
  mask = jnp.asarray(rng.random((8, 49)) < 0.6)
  kw = dict(tau=None, layer_norm=True)
  live = float(mto.sparsity_loss(x, mask, **kw))
  assert abs(live - (math.log(48) - 0.5)) < 0.15
  assert float(mto.sparsity_loss(x, mask, include_self=True, **kw)) < 0.4
  assert float(mto.self_mass(x, mask, **kw)) > 0.9
  assert float(mto.sparsity_loss(x, mask, include_self=True)) < 1e-3  # raw features
  assert float(mto.self_mass(x, mask)) > 0.999


def test_heterogeneity_is_log_visible_count_when_masked_rows_are_uniform():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 12, 16)).astype(np.float32)
  mask = np.zeros((4, 12), bool)
  for i, n_masked in enumerate((3, 5, 7, 9)):
    mask[i, rng.permutation(12)[:n_masked]] = True
  # A zero feature vector has the same affinity (0) to every token.
  x[mask] = 0.0
  want = np.mean([math.log(12 - n) for n in (3, 5, 7, 9)])
  got = mto.heterogeneity(jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # ... and that is the maximum: random masked tokens give less.
  x_random = rng.normal(size=x.shape).astype(np.float32)
  assert mto.heterogeneity(jnp.asarray(x_random), jnp.asarray(mask)) < want - 1e-3


def test_sparsity_minimal_when_visible_rows_weigh_only_visible_tokens():
  e0, e1 = np.eye(2, dtype=np.float32) * 6.0
  visible = np.stack([e0, e0, e1, e1])  # two pairs of equal visible tokens
  mask = jnp.array([[False, False, False, False, True, True, True, True]])
  # The masked tokens carry nothing: each visible row puts almost all its weight on its twin, a
  # visible token.
  concentrated = np.concatenate([visible, np.zeros_like(visible)])[None]
  # Each masked token duplicates a visible one: visible rows split weight with masked tokens.
  shared = np.concatenate([visible, visible])[None]
  kw = dict(tau=1.0, layer_norm=False)
  low = float(mto.sparsity_loss(jnp.asarray(concentrated), mask, **kw))
  high = float(mto.sparsity_loss(jnp.asarray(shared), mask, **kw))
  assert abs(low) < 1e-6  # the minimum of an entropy, 0
  # Row e0 over the 7 other tokens: its twin and two masked copies at 36, four at 0: ~log 3.
  want_high = _np_entropy(_np_softmax([36.0, 0, 0, 36.0, 36.0, 0, 0]))
  np.testing.assert_allclose(high, want_high, rtol=1e-5)
  assert high > math.log(3) - 1e-3


def test_distinctiveness_loss():
  np.testing.assert_allclose(mto.distinctiveness_loss(jnp.float32(0.5)), 1 / (0.5 + 1e-6))
  assert mto.distinctiveness_loss(jnp.float32(2.0)) < mto.distinctiveness_loss(jnp.float32(1.0))


def test_ranking_loss_direction_of_both_forms():
  decreasing = jnp.array([3.0, 2.0, 1.0])
  np.testing.assert_allclose(mto.ranking_loss(decreasing, 'decrease'),
                             2 * math.log(1 + math.exp(-1)), rtol=1e-6)
  np.testing.assert_allclose(mto.ranking_loss(decreasing, 'printed'),
                             2 * math.log(1 + math.exp(1)), rtol=1e-6)
  # Gradient descent on 'decrease' lowers deeper layers relative to shallower ones; the printed
  # form does the opposite.
  flat = jnp.array([1.0, 1.0])
  np.testing.assert_allclose(jax.grad(mto.ranking_loss)(flat, 'decrease'), [-0.5, 0.5])
  np.testing.assert_allclose(jax.grad(mto.ranking_loss)(flat, 'printed'), [0.5, -0.5])
  with pytest.raises(ValueError):
    mto.ranking_loss(flat, 'increase')


def _framework(config_module, variant='mu/4', **model):
  config = config_module.get_config('runlocal')
  config.model.variant = variant
  config.model.update(model)
  config.mae.decoder_width, config.mae.decoder_depth, config.mae.decoder_heads = 32, 2, 2
  validation.validate(config)
  fw = registry.build(config)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 3))
  params, state = jax.jit(fw.init)(jax.random.PRNGKey(1), {'image': images})
  return fw, params, state, {'image': images}


@pytest.mark.parametrize('config_module,token_path,embed_path', [
    (simmim_mto, ('mask_token',), ('encoder', 'embedding', 'kernel')),
    (mae_mto, ('decoder', 'mask_token'), ('decoder', 'decoder_embed', 'kernel')),
])
def test_mto_term_alone_reaches_mask_token_and_embedding(config_module, token_path, embed_path):
  fw, params, state, batch = _framework(config_module)
  plugin = fw.plugins[0]

  def mto_term(p):
    _, _, outputs = fw.forward(p, state, batch, jax.random.PRNGKey(2), True)
    return plugin.loss(p, None, outputs, batch, None, 0, True)[0]

  grads = jax.jit(jax.grad(mto_term))(params)
  for path in (token_path, embed_path):
    g = grads
    for key in path:
      g = g[key]
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path


@pytest.mark.parametrize('config_module', [simmim_mto, mae_mto])
def test_sparsity_gradient_is_of_the_order_of_distinctiveness_at_init(config_module):
  # On an encoder with an absolute position embedding (docs/recipes.md "MTO measurements"):
  # SimMIM's own ViT has none, so its layer-0 mask tokens are all equal and L_e's gradient there
  # is two orders below L_spa's (see test_sparsity_gradient_is_live_on_simmims_backbone).
  fw, params, state, batch = _framework(config_module, 'pico/4', posemb='sincos2d', rel_pos='none')
  plugin = fw.plugins[0]
  kw = mto.affinity_options(fw.config.mto)

  def grad_norm(term):
    def f(p):
      _, _, outputs = fw.forward(p, state, batch, jax.random.PRNGKey(2), True)
      return term(plugin.layers(outputs)[0], outputs.mask)
    grads = jax.jit(jax.grad(f))(params)
    return math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads)))

  g_e = grad_norm(lambda x, m: mto.distinctiveness_loss(mto.heterogeneity(x, m, **kw)))
  g_spa = grad_norm(lambda x, m: mto.sparsity_loss(x, m, **kw))
  assert 0.03 < g_spa / g_e < 30


def test_sparsity_gradient_is_live_on_simmims_backbone():
  fw, params, state, batch = _framework(simmim_mto, 'pico/4')
  assert fw.config.model.posemb == 'none'
  plugin = fw.plugins[0]
  kw = mto.affinity_options(fw.config.mto)

  def f(p):
    _, _, outputs = fw.forward(p, state, batch, jax.random.PRNGKey(2), True)
    return mto.sparsity_loss(plugin.layers(outputs)[0], outputs.mask, **kw)
  grads = jax.tree_util.tree_leaves(jax.jit(jax.grad(f))(params))
  norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in grads))
  assert math.isfinite(norm) and norm > 1e-3  # 0.027; with the self term it would be ~1e-5


def test_logged_heterogeneity_and_single_compile_under_jit():
  fw, params, state, batch = _framework(simmim_mto, 'pico/4')
  traces = []

  def loss(p, rng, step):
    traces.append(1)
    return fw.loss(p, state, batch, rng, step)

  jitted = jax.jit(loss)
  metrics = None
  for step in range(3):
    _, (metrics, _) = jitted(params, jax.random.PRNGKey(step), jnp.int32(step))
  assert len(traces) == 1
  depth = 4  # pico
  assert sorted(k for k in metrics if k.startswith('mto_H')) == [f'mto_H{l}' for l in
                                                                 range(depth + 1)]
  # 10 of the 4 x 4 mask cells (2 x 2 patches, cut to the 7 x 7 grid) are masked, which hides
  # at least 1 + 6 * 2 + 3 * 4 = 25 patches: H^l <= log(49 - 25).
  assert all(0 < metrics[f'mto_H{l}'] <= math.log(24) for l in range(depth + 1))
  want = sum(float(metrics[k]) for k in ('loss_simmim', 'loss_mto_spa', 'loss_mto_e',
                                         'loss_mto_r'))
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)


@pytest.mark.parametrize('framework,where', [('mae', 'encoder'), ('simmim', 'decoder')])
def test_config_rejects_site_without_mask_tokens(framework, where):
  config = (mae_mto if framework == 'mae' else simmim_mto).get_config('runlocal')
  config.mto.where = where
  with pytest.raises(errors.ConfigError, match='mto.where'):
    validation.validate(config)


def test_config_rejects_unknown_ranking():
  config = simmim_mto.get_config('runlocal')
  config.mto.ranking = 'up'
  with pytest.raises(errors.ConfigError, match='mto.ranking'):
    validation.validate(config)


def _run(spec, workdir):
  """30 steps of batch 32 at peak lr 3e-3; metrics every 10 steps."""
  config = load_config(spec, **tiny_overrides(**{
      'batch_size': 32, 'total_steps': 30, 'warmup_steps': 5, 'log.every_steps': 10,
      'checkpoint.every_steps': 30, 'optim.base_lr': 3e-3, 'optim.lr_base_batch': 32}))
  train.train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # two short training runs: about a minute each on 2 busy CPU cores
@pytest.mark.parametrize('spec,mim_loss', [('configs/simmim_mto.py:runlocal', 'loss_simmim'),
                                           ('configs/mae_mto.py:runlocal', 'loss_mae')])
def test_runlocal_loss_decreases(spec, mim_loss, tmp_path):
  records = _run(spec, str(tmp_path))
  assert records[-1]['loss'] < 0.95 * records[0]['loss']
  assert records[-1][mim_loss] < 0.95 * records[0][mim_loss]
  assert 'mto_H0' in records[-1] and 'loss_mto_r' in records[-1]
