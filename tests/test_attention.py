"""Fused attention (jax.nn.dot_product_attention) against the explicit einsum path, and the
backend-dependent compute dtype ('auto')."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, tiny_overrides
from mimjax import errors
from mimjax import registry
from mimjax import train_step as train_step_lib
from mimjax import validation
from mimjax.models import vit



def einsum_attention(q, k, v, bias=None, return_weights=False):
  """The pre-fusion implementation: two einsums around a float32 softmax (the reference)."""
  del return_weights
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v), None


def _qkv(batch=2, tokens=7, heads=3, dim=8, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v = (jax.random.normal(keys[i], (batch, tokens, heads, dim)) for i in range(3))
  return q, k, v, keys[3]


@pytest.mark.parametrize('bias_batch', [None, 1, 2])
def test_fused_equals_einsum_outputs_and_gradients(bias_batch):
  q, k, v, key = _qkv()
  bias = None if bias_batch is None else jax.random.normal(key, (bias_batch, 3, 7, 7))
  cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape)

  def objective(attention):
    return lambda *a: jnp.sum(attention(*a)[0] * cotangent)

  args = (q, k, v) + (() if bias is None else (bias,))
  argnums = tuple(range(len(args)))
  got_out, _ = vit.dot_product_attention(*args)
  want_out, _ = einsum_attention(*args)
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  got = jax.grad(objective(vit.dot_product_attention), argnums)(*args)
  want = jax.grad(objective(einsum_attention), argnums)(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_weights_path_matches_numpy():
  q, k, v, key = _qkv()
  bias = jax.random.normal(key, (1, 3, 7, 7))
  out, weights = vit.dot_product_attention(q, k, v, bias, return_weights=True)
  qn, kn, vn, bn = (np.asarray(a, np.float64) for a in (q, k, v, bias))
  logits = np.einsum('bqhd,bkhd->bhqk', qn, kn) / np.sqrt(8) + bn
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(weights, w, atol=1e-6)
  np.testing.assert_allclose(out, np.einsum('bhqk,bkhd->bqhd', w, vn), atol=1e-5)
  assert vit.dot_product_attention(q, k, v)[1] is None  # the default path keeps no weights


TINY = {'mae.decoder_width': 32, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2}


@pytest.mark.parametrize('spec', [
    'configs/simmim.py:runlocal',
    pytest.param('configs/mae.py:runlocal', marks=pytest.mark.slow),  # 20-70 s each on 2 cores
    pytest.param('configs/distill.py:runlocal,teacher=ema,dtm', marks=pytest.mark.slow),
    pytest.param('configs/supervised.py:runlocal', marks=pytest.mark.slow)])
def test_every_framework_fused_equals_einsum(spec, monkeypatch):
  """Loss, metrics and every parameter gradient agree to 1e-5 with the einsum reference."""
  config = load_config(spec, **tiny_overrides(**TINY))
  framework = registry.build(config)
  # 8 images: the distillation recipe draws DTM schedules for 8 groups of examples.
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 28, 28, 3))
  batch = {'image': images, 'label': jnp.arange(8, dtype=jnp.int32)}
  params, state = framework.init(jax.random.PRNGKey(1), batch)

  def loss_and_grads():
    fn = jax.value_and_grad(lambda p: framework.loss(p, state, batch, jax.random.PRNGKey(2), 0),
                            has_aux=True)
    (loss, (metrics, _)), grads = jax.jit(fn)(params)
    return loss, metrics, grads

  fused = loss_and_grads()
  monkeypatch.setattr(vit, 'dot_product_attention', einsum_attention)
  reference = loss_and_grads()
  assert float(jnp.abs(fused[0])) > 0
  for got, want in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_auto_dtype_follows_backend(monkeypatch):
  """'auto' per device kind is test_loss_scaling's `test_auto_dtype_follows_the_device`; here the
  real CPU and an explicit value, which wins on any device."""
  assert load_config('configs/mae.py').model.dtype == 'auto'
  assert vit.compute_dtype('auto') == jnp.float32  # these tests run on CPU
  assert vit.compute_dtype('bfloat16') == jnp.bfloat16
  tpu = type('FakeTpu', (), {'platform': 'tpu'})()
  monkeypatch.setattr(jax, 'devices', lambda *a, **k: [tpu])
  assert vit.compute_dtype('auto') == jnp.bfloat16
  assert vit.compute_dtype('float32') == jnp.float32  # an explicit value wins


def test_unknown_dtype_is_a_config_error():
  config = load_config('configs/mae.py:runlocal', **{'model.dtype': 'float64'})
  with pytest.raises(errors.ConfigError, match='model.dtype'):
    validation.validate(config)


def _losses(dtype, steps):
  config = load_config('configs/mae.py:runlocal', **tiny_overrides(**TINY, **{
      'model.dtype': dtype, 'total_steps': steps}))
  framework = registry.build(config)
  # Smooth images (a blurred random field) so that the reconstruction loss has something to fit.
  noise = np.random.default_rng(0).standard_normal((16, 7, 7, 3)).astype(np.float32)
  batch = {'image': jnp.asarray(noise.repeat(4, axis=1).repeat(4, axis=2))}
  init_fn, _, tx, lr = train_step_lib.build(framework, config, batch)
  step = jax.jit(train_step_lib.make_train_step(framework, tx, lr))
  state, losses = jax.jit(init_fn)(), []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return np.asarray(losses)


@pytest.mark.slow
def test_bfloat16_training_follows_float32():
  """Over 20 MAE steps the bfloat16 loss stays within 2% of float32's at every step.

  bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); 2% leaves room for that
  rounding through the encoder, decoder and 20 updates, yet is far below the loss's own movement.
  """
  f32, bf16 = _losses('float32', 20), _losses('bfloat16', 20)
  assert f32[-1] < 0.9 * f32[0]  # the run trains, so agreement is not two flat lines
  np.testing.assert_allclose(bf16, f32, rtol=0.02)


def test_gpu_half_precision_falls_back_to_xla_without_cudnn(monkeypatch):
  """On a 'GPU' without cuDNN (here: CPU posing as one) the cuDNN request is refused at trace
  time and the XLA path answers, with the same result."""
  q, k, v, _ = _qkv()
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  want, _ = vit.dot_product_attention(q, k, v)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  got, _ = jax.jit(lambda *a: vit.dot_product_attention(*a))(q, k, v)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
