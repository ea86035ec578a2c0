"""MAE masking: static shapes, exact counts, independence across samples, uniform coverage."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax import masking


def test_counts_and_shapes():
  keep, mask = masking.random_keep(jax.random.PRNGKey(0), 8, 196, 0.75)
  assert keep.shape == (8, 49) and keep.dtype == jnp.int32
  assert mask.shape == (8, 196)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), 196 - 49)
  for k, m in zip(np.asarray(keep), np.asarray(mask)):
    assert len(set(k.tolist())) == 49  # no duplicates
    assert not m[k].any()  # kept patches are exactly the unmasked ones


def test_num_kept_matches_mae_rounding():
  # MAE: len_keep = int(L * (1 - mask_ratio)).
  assert masking.num_kept(196, 0.75) == 49
  assert masking.num_kept(49, 0.75) == 12
  assert masking.num_kept(50, 0.6) == 20
  with pytest.raises(ValueError):
    masking.num_kept(4, 0.9)


def test_samples_are_independent_and_uniform():
  _, mask = masking.random_keep(jax.random.PRNGKey(1), 4000, 16, 0.75)
  mask = np.asarray(mask, np.float64)
  # Every patch is masked with probability 12/16 in every sample.
  np.testing.assert_allclose(mask.mean(0), 0.75, atol=0.03)
  # Distinct samples get distinct masks, and masks of two samples are uncorrelated.
  assert len({m.tobytes() for m in mask[:100]}) > 95
  corr = np.corrcoef(mask[0::2].ravel(), mask[1::2].ravel())[0, 1]
  assert abs(corr) < 0.03


def test_static_shapes_under_jit():
  fn = jax.jit(lambda rng: masking.random_keep(rng, 4, 49, 0.75))
  for i in range(3):
    keep, _ = fn(jax.random.PRNGKey(i))
    assert keep.shape == (4, 12)
  assert fn._cache_size() == 1
