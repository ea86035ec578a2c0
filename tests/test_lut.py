"""LUT: disjoint view masks, EMA/momentum, stop-gradient, BatchNorm modes, the loss by hand, the
two-view augmentation, global BatchNorm statistics over devices, and a short training run."""
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae_lut
from mimjax import errors
from mimjax import masking
from mimjax import registry
from mimjax import teachers
from mimjax import validation
from mimjax.plugins import lut

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = mae_lut.get_config('runlocal,model=S/16')
  c.model.variant = 'mu/4'
  c.data.image_size = 16
  c.mae.decoder_width = 16
  c.mae.decoder_depth = 1
  c.mae.decoder_heads = 2
  c.lut.head_dim = 32
  c.total_steps = 100
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def tiny_batch(batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(batch_size, 16, 16, 3)), jnp.float32),
          'image2': jnp.asarray(rng.normal(size=(batch_size, 16, 16, 3)), jnp.float32)}


def np_head(x, p, stats, train):
  """Numpy Linear -> BatchNorm -> ReLU -> Linear; returns (out, batch mean, batch variance)."""
  h = x @ np.asarray(p['Dense_0']['kernel'])
  if train:
    mean, var = h.mean(0), h.var(0)
  else:
    mean, var = np.asarray(stats['BatchNorm_0']['mean']), np.asarray(stats['BatchNorm_0']['var'])
  bn = p['BatchNorm_0']
  h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(bn['scale']) + np.asarray(bn['bias'])
  return np.maximum(h, 0) @ np.asarray(p['Dense_1']['kernel']), mean, var


def np_cos_dist(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 2 - 2 * (a * b).sum(-1)


# ---------------------------------------------------------------------------------------- masks


def test_two_disjoint_views_with_exact_counts():
  b, n, ratio = 64, 196, 0.75
  n_keep = masking.num_kept(n, ratio)
  order = masking.random_permutation(jax.random.PRNGKey(3), b, n)
  keep1, mask1 = masking.keep_from_order(order, n_keep, view=0)
  keep2, mask2 = masking.keep_from_order(order, n_keep, view=1)
  assert keep1.shape == keep2.shape == (b, 49)
  np.testing.assert_array_equal(np.asarray(~mask1).sum(1), 49)
  np.testing.assert_array_equal(np.asarray(~mask2).sum(1), 49)
  assert not np.any(np.asarray(~mask1 & ~mask2))  # no patch visible in both views
  for row1, row2, m1 in zip(np.asarray(keep1), np.asarray(keep2), np.asarray(mask1)):
    assert len(set(row1)) == len(set(row2)) == 49
    assert not m1[row1].any() and m1[row2].all()
  # MAE's own mask is view 0 of the same order.
  k, m = masking.random_keep(jax.random.PRNGKey(3), b, n, ratio)
  np.testing.assert_array_equal(k, keep1)
  np.testing.assert_array_equal(m, mask1)
  with pytest.raises(ValueError, match='disjoint views'):
    masking.keep_from_order(order, 100, view=1)


def test_mae_publishes_the_order_its_mask_comes_from():
  fw = registry.build(tiny_config())
  batch = tiny_batch()
  params, state = fw.init(jax.random.PRNGKey(0), batch)
  _, _, out = fw.forward(params, state, batch, jax.random.PRNGKey(1), train=True)
  np.testing.assert_array_equal(out.keep_idx, out.patch_order[:, :fw.num_kept])
  assert fw.num_kept == 4  # int(16 * 0.25)


# ----------------------------------------------------------------------------- momentum and EMA


def test_momentum_schedule_hand_values():
  m = lambda s: float(lut.momentum_schedule(s, 100, 0.996))  # noqa: E731
  assert m(0) == pytest.approx(0.996)
  assert m(50) == pytest.approx(0.998)
  assert m(25) == pytest.approx(1 - 0.002 * (1 + math.sqrt(0.5)))
  assert m(100) == pytest.approx(1.0)


def test_ema_update_hand_values():
  out = teachers.ema_update({'a': jnp.array([10.0, 0.0])}, {'a': jnp.array([20.0, 1.0])}, 0.9)
  np.testing.assert_allclose(out['a'], [11.0, 0.1], rtol=1e-6)


def test_update_state_moves_encoder_projector_and_stats_but_not_predictor():
  fw = registry.build(tiny_config())
  (plugin,) = fw.plugins
  params, state = fw.init(jax.random.PRNGKey(0), tiny_batch())
  lut_state = state['lut']
  moved = jax.tree_util.tree_map(lambda x: x + 1.0, params)
  stats = jax.tree_util.tree_map(lambda x: x + 2.0, lut_state['batch_stats'])
  new = plugin.update_state(moved, dict(lut_state, batch_stats=stats), step=50)['context']
  # momentum 0.998 at step 50 of 100: context = old + 0.002 * (+1 or +2).
  for path in (('encoder',), ('projector',)):
    old_tree = lut_state['context'][path[0]]
    diff = jax.tree_util.tree_map(lambda n, o: n - o, new[path[0]], old_tree)
    for leaf in jax.tree_util.tree_leaves(diff):
      np.testing.assert_allclose(leaf, 0.002, atol=2e-6)
  for n, o in zip(jax.tree_util.tree_leaves(new['projector_stats']),
                  jax.tree_util.tree_leaves(lut_state['context']['projector_stats'])):
    np.testing.assert_allclose(n - o, 0.004, atol=2e-6)
  assert set(new) == {'encoder', 'projector', 'projector_stats'}  # no predictor in the context


# --------------------------------------------------------------------- gradient and BatchNorm


def test_context_encoder_receives_no_gradient_but_shapes_the_loss():
  fw = registry.build(tiny_config())
  batch = tiny_batch()
  params, state = fw.init(jax.random.PRNGKey(0), batch)
  rng = jax.random.PRNGKey(1)
  loss_of_state = lambda s: fw.loss(params, s, batch, rng, 0)[0]  # noqa: E731
  grads = jax.grad(loss_of_state)(state)
  for leaf in jax.tree_util.tree_leaves(grads['lut']['context']):
    assert not np.any(np.asarray(leaf))
  shifted = jax.tree_util.tree_map(lambda x: x + 0.1, state)
  assert abs(float(loss_of_state(shifted)) - float(loss_of_state(state))) > 1e-4


def test_context_batchnorm_uses_running_statistics():
  fw = registry.build(tiny_config())
  (plugin,) = fw.plugins
  batch = tiny_batch()
  params, state = fw.init(jax.random.PRNGKey(0), batch)
  context = state['lut']['context']
  rng = np.random.default_rng(1)
  bn = {'BatchNorm_0': {'mean': jnp.asarray(rng.normal(size=32), jnp.float32),
                        'var': jnp.asarray(rng.uniform(0.5, 2.0, size=32), jnp.float32)}}
  context = dict(context, projector_stats=bn)
  full = plugin._context(context, batch['image'])  # pylint: disable=protected-access
  part = plugin._context(context, batch['image'][:2])  # pylint: disable=protected-access
  np.testing.assert_allclose(part, full[:2], rtol=1e-5, atol=1e-6)  # no batch dependence
  enc = plugin.encoder.apply({'params': context['encoder']}, batch['image'])
  expected, _, _ = np_head(np.asarray(enc['patch_tokens']).mean(1), context['projector'], bn,
                           train=False)
  np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ loss by hand


def test_broader_context_loss_matches_numpy():
  rng = np.random.default_rng(0)
  s1, s2, c1, c2 = (rng.normal(size=(5, 7)).astype(np.float32) for _ in range(4))
  expected = 0.5 * (np_cos_dist(s1, c2).mean() + np_cos_dist(s2, c1).mean())
  got = lut.broader_context_loss(*(jnp.asarray(x) for x in (s1, s2, c1, c2)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(lut.cosine_distance(jnp.asarray(s1), jnp.asarray(3 * s1)), 0,
                             atol=1e-6)


def test_plugin_loss_and_batch_stats_match_hand_computation():
  alpha = 0.7
  fw = registry.build(tiny_config(**{'lut.alpha': alpha}))
  (plugin,) = fw.plugins
  batch = tiny_batch()
  params, state = fw.init(jax.random.PRNGKey(0), batch)
  rng = np.random.default_rng(2)
  ctx_stats = {'BatchNorm_0': {'mean': jnp.asarray(rng.normal(size=32), jnp.float32),
                               'var': jnp.asarray(rng.uniform(0.5, 2.0, size=32), jnp.float32)}}
  lut_state = dict(state['lut'], context=dict(state['lut']['context'], projector_stats=ctx_stats))
  _, _, out = fw.forward(params, state, batch, jax.random.PRNGKey(5), train=True)
  term, metrics, new_state = plugin.loss(params, lut_state, out, batch, jax.random.PRNGKey(6),
                                         0, train=True)

  n_keep = fw.num_kept
  keep2 = np.asarray(out.patch_order)[:, n_keep:2 * n_keep]
  encode = lambda p, x, **kw: np.asarray(  # noqa: E731
      plugin.encoder.apply({'params': p}, x, **kw)['patch_tokens'])
  pooled1 = np.asarray(out.encoder['patch_tokens']).mean(1)
  pooled2 = encode(params['encoder'], batch['image2'], keep_idx=jnp.asarray(keep2)).mean(1)
  head_p = params['lut']
  z1, mean1, var1 = np_head(pooled1, head_p['projector'], None, train=True)
  q1, _, _ = np_head(z1, head_p['predictor'], None, train=True)
  z2, mean2, var2 = np_head(pooled2, head_p['projector'], None, train=True)
  q2, _, _ = np_head(z2, head_p['predictor'], None, train=True)
  ctx = lut_state['context']
  c1, _, _ = np_head(encode(ctx['encoder'], batch['image']).mean(1), ctx['projector'], ctx_stats,
                     train=False)
  c2, _, _ = np_head(encode(ctx['encoder'], batch['image2']).mean(1), ctx['projector'], ctx_stats,
                     train=False)
  expected = 0.5 * (np_cos_dist(q1, c2).mean() + np_cos_dist(q2, c1).mean())
  np.testing.assert_allclose(metrics['loss_lut'], expected, rtol=1e-4)
  np.testing.assert_allclose(term, alpha * expected, rtol=1e-4)
  # Running statistics: 0.9 * running + 0.1 * batch, once per view (view 1 first); the running
  # variance is torch's unbiased one, n / (n - 1) times the batch variance.
  stats = new_state['batch_stats']['projector']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], 0.1 * 0.9 * mean1 + 0.1 * mean2, rtol=1e-4,
                             atol=1e-6)
  n = pooled1.shape[0]
  np.testing.assert_allclose(stats['var'], 0.81 + (0.1 * 0.9 * var1 + 0.1 * var2) * n / (n - 1),
                             rtol=1e-4)


def test_batchnorm_matches_torch_batchnorm1d():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(3)
  x1, x2 = (rng.normal(1.0, 2.0, size=(6, 5)).astype(np.float32) for _ in range(2))
  ref = torch.nn.BatchNorm1d(5)  # momentum 0.1, eps 1e-5: the reference heads' BatchNorm
  ref.weight.data.uniform_(0.5, 1.5)
  ref.bias.data.uniform_(-0.5, 0.5)
  module = lut.BatchNorm()
  variables = {'params': {'scale': jnp.asarray(ref.weight.data.numpy()),
                          'bias': jnp.asarray(ref.bias.data.numpy())},
               'batch_stats': {'mean': jnp.zeros(5), 'var': jnp.ones(5)}}
  for x in (x1, x2):
    want = ref.train()(torch.from_numpy(x)).detach().numpy()
    got, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
    variables = dict(variables, **updates)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(variables['batch_stats']['var'], ref.running_var.numpy(), rtol=1e-6)
  np.testing.assert_allclose(variables['batch_stats']['mean'], ref.running_mean.numpy(), rtol=1e-6,
                             atol=1e-7)
  want = ref.eval()(torch.from_numpy(x1)).detach().numpy()
  np.testing.assert_allclose(module.apply(variables, jnp.asarray(x1)), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ configs


def test_configs_alpha_by_size_and_recipe():
  s, b = mae_lut.get_config('model=S/16'), mae_lut.get_config('model=B/16')
  assert (s.lut.alpha, b.lut.alpha) == (1.0, 0.25)
  assert b.lut.enabled and b.data.augment == 'lut_two_view' and b.mae.mask_ratio == 0.75
  assert (b.mae.decoder_depth, b.mae.decoder_width, b.lut.head_dim) == (8, 512, 4096)
  assert b.optim.base_lr * b.batch_size / b.optim.lr_base_batch == pytest.approx(2.4e-3)
  assert b.warmup_steps == round(40 * 1_281_167 / 4096)
  assert mae_lut.get_config('model=L/16,alpha=0.5').lut.alpha == 0.5
  with pytest.raises(ValueError, match='alpha'):
    mae_lut.get_config('model=L/16')


@pytest.mark.parametrize('key,value,match', [
    ('data.augment', 'rrc_flip', 'lut_two_view'),
    ('mae.mask_ratio', 0.4, 'mask_ratio >= 0.5'),
])
def test_bad_combinations_fail_at_start(key, value, match):
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(tiny_config(**{key: value}))


# --------------------------------------------------------------------- global BN over devices

_SHARDED_SCRIPT = textwrap.dedent('''
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {root!r})
    from tests import test_lut
    assert jax.device_count() == 4
    fw = test_lut.registry.build(test_lut.tiny_config())
    batch = test_lut.tiny_batch()
    # Very different shards, so per-device statistics would differ from global ones.
    scale = jnp.repeat(jnp.arange(1.0, 5.0), 2)[:, None, None, None]
    batch = {{k: v * scale + scale for k, v in batch.items()}}
    params, state = fw.init(jax.random.PRNGKey(0), batch)
    def run(b):
      loss, (metrics, new_state) = fw.loss(params, state, b, jax.random.PRNGKey(1), 0)
      return metrics['loss_lut'], new_state['lut']['batch_stats']
    from mimjax import sharding
    mesh = sharding.make_mesh(fw.config.mesh)  # the trainer's mesh: all 4 devices on 'data'
    sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    one = jax.device_put(batch, jax.devices()[0])
    got, stats = jax.jit(run)(sharded)
    want, want_stats = jax.jit(run)(one)
    assert len(sharded['image'].sharding.device_set) == 4
    per_shard = [float(jax.jit(run)({{k: v[2 * i:2 * i + 2] for k, v in one.items()}})[0])
                 for i in range(4)]
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
    print(json.dumps(dict(sharded=float(got), single=float(want), per_shard=per_shard,
                          stats_err=float(np.abs(flat(stats) - flat(want_stats)).max()))))
''')


@pytest.mark.slow  # a fresh 4-device process: about a minute on 2 cores
def test_batchnorm_statistics_are_global_across_devices():
  proc = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT.format(root=ROOT)],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['sharded'] == pytest.approx(result['single'], rel=1e-5)
  assert result['stats_err'] < 1e-5
  # Per-device statistics would have given a different loss.
  assert abs(np.mean(result['per_shard']) - result['single']) > 1e-3


# ----------------------------------------------------------------------------- training run


@pytest.mark.slow  # about 1.5 minutes on 2 cores
def test_runlocal_mae_lut_losses_decrease(tmp_path):
  from mimjax import train  # pylint: disable=g-import-not-at-top
  c = mae_lut.get_config('runlocal,model=S/16')
  c.model.variant = 'mu/4'
  c.batch_size = 32
  c.total_steps = 40
  c.warmup_steps = 5
  c.lut.head_dim = 64
  c.log.every_steps = 10
  c.log.progress_bar = False
  c.log.images_every_steps = 0
  c.checkpoint.every_steps = 1000
  train.train(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  first, last = rows[0], rows[-1]
  assert last['step'] == 40
  for key in ('loss', 'loss_mae', 'loss_lut'):
    assert last[key] < first[key], (key, first[key], last[key])
