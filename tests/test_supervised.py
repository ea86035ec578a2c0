"""Supervised framework: label smoothing, mixup / cutmix, eval metrics, config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mae as mae_config
from configs import supervised as supervised_config
from mimjax import errors
from mimjax import registry
from mimjax import losses
from mimjax import mixup
from mimjax import validation


def test_label_smoothing_cross_entropy_matches_optax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 6)
  targets = losses.smooth_labels(labels, 10, 0.1)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(targets[0, labels[0]], 0.9 + 0.01, rtol=1e-6)  # timm: 1 - s + s/K
  reference = optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.1)).mean()
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, targets), reference, rtol=1e-6)


def _constant_images(n=4, size=16):
  """Image i is constant i + 1, so every mixed pixel tells where it came from."""
  return jnp.broadcast_to(jnp.arange(1.0, n + 1.0)[:, None, None, None], (n, size, size, 3))


@pytest.mark.parametrize('seed', range(5))
def test_cutmix_lambda_is_the_unpasted_area(seed):
  images = _constant_images()
  targets = losses.smooth_labels(jnp.array([0, 1, 2, 3]), 5, 0.1)
  mixed, mixed_targets, lam = mixup.mix(jax.random.PRNGKey(seed), images, targets,
                                        mixup_alpha=0.0, cutmix_alpha=1.0)
  partner = images[::-1]
  from_partner = np.asarray(mixed == partner)[..., 0]
  from_self = np.asarray(mixed == images)[..., 0]
  assert np.all(from_partner | from_self)
  np.testing.assert_allclose(from_partner[0].mean(), 1.0 - float(lam), atol=1e-6)
  # The same box for every sample in the batch (timm's batch mode).
  np.testing.assert_array_equal(from_partner[0], from_partner[1])
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)


@pytest.mark.parametrize('seed', range(3))
def test_mixup_blends_images_and_targets_with_one_lambda(seed):
  images = _constant_images()
  targets = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 4)
  mixed, mixed_targets, lam = mixup.mix(jax.random.PRNGKey(seed), images, targets,
                                        mixup_alpha=0.8, cutmix_alpha=0.0)
  lam = float(lam)
  assert 0.0 < lam < 1.0
  expected = lam * np.arange(1, 5) + (1 - lam) * np.arange(4, 0, -1)
  np.testing.assert_allclose(mixed[:, 0, 0, 0], expected, rtol=1e-5)
  # Sample 0 is mixed with sample 3: its target is lam on class 0 and 1 - lam on class 3.
  np.testing.assert_allclose(mixed_targets[0], [lam, 0, 0, 1 - lam], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)


def test_switch_picks_both_kinds_and_no_mix_keeps_the_batch():
  images = _constant_images()
  targets = jax.nn.one_hot(jnp.arange(4), 4)
  kinds = set()
  for seed in range(20):
    mixed, _, _ = mixup.mix(jax.random.PRNGKey(seed), images, targets, 0.8, 1.0)
    is_cutmix = bool(np.all((mixed == images) | (mixed == images[::-1])))
    kinds.add(is_cutmix)
  assert kinds == {True, False}
  mixed, mixed_targets, lam = mixup.mix(jax.random.PRNGKey(0), images, targets, 0.8, 1.0,
                                        mix_prob=0.0)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(mixed_targets, targets)
  assert float(lam) == 1.0


def test_eval_metrics_count_top1_top5_over_valid_examples():
  config = supervised_config.get_config('runlocal')
  config.unlock()
  config.model.variant = 'mu/4'
  framework = registry.build(config)
  images = jnp.zeros((4, 28, 28, 3))
  params, _ = framework.init(jax.random.PRNGKey(0), {'image': images, 'label': jnp.zeros(4, int)})
  # Make the logits ignore the image: bias ranks class 9 > 8 > ... > 0.
  head = params['encoder']['head']
  params['encoder']['head'] = {'kernel': jnp.zeros_like(head['kernel']),
                               'bias': jnp.arange(10.0)}
  batch = {'image': images, 'label': jnp.array([9, 6, 5, 9]),
           'valid': jnp.array([True, True, True, False])}
  out = framework.eval_metrics(params, {}, batch)
  # top-5 = {9, 8, 7, 6, 5}: labels 9, 6, 5 are all in it; only the first is top-1; the last is
  # padding.
  assert {k: float(v) for k, v in out.items()} == {'top1': 1.0, 'top5': 3.0, 'count': 3.0}


def test_config_checks():
  config = supervised_config.get_config('runlocal')
  config.unlock()
  config.model.num_classes = 0
  with pytest.raises(errors.ConfigError, match='num_classes'):
    validation.validate(config)
  config = mae_config.get_config('runlocal')
  config.unlock()
  config.eval.every_steps = 10  # self-supervised: the kNN monitor, whose bank must hold k images
  validation.validate(config)
  config.eval.knn_monitor.k = config.eval.knn_monitor.bank_examples + 1
  with pytest.raises(errors.ConfigError, match='eval.knn_monitor.k'):
    validation.validate(config)
  config = supervised_config.get_config('runlocal')
  config.unlock()
  config.model.tokenizer_norm = 'batchnorm'
  with pytest.raises(errors.ConfigError, match='tokenizer_norm'):
    validation.validate(config)
