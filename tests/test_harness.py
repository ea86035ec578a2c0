"""The test run's own machinery: the persistent compilation cache set up in conftest.py speeds the
suite up without hiding the recompilation checks other tests make."""
import os
import random

import jax
import jax.numpy as jnp


def _program(x, salt):
  for _ in range(12):
    x = jnp.tanh(x @ x.T) + salt * x
  return x


def test_the_persistent_cache_is_on_and_a_shape_change_still_counts_as_a_recompilation():
  cache_dir = jax.config.jax_compilation_cache_dir
  assert cache_dir and cache_dir == os.environ['JAX_COMPILATION_CACHE_DIR']
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)  # cache even this one
  try:
    salt = 1.0 + random.random()  # a program no earlier run can have cached
    before = set(os.listdir(cache_dir))
    first = jax.jit(lambda x: _program(x, salt))  # a new function object: jit's own caches miss
    first(jnp.ones((48, 48)))
    written = set(os.listdir(cache_dir)) - before
    assert any(name.startswith('jit_') for name in written), written
    again = jax.jit(lambda x: _program(x, salt))
    again(jnp.ones((48, 48)))  # the same program: XLA's compile comes from disk
    assert set(os.listdir(cache_dir)) - before == written  # a hit writes nothing new
    assert again._cache_size() == 1  # pylint: disable=protected-access
    again(jnp.ones((40, 40)))  # a new shape is traced and counted anew, cache or not
    assert again._cache_size() == 2  # pylint: disable=protected-access
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_time)
