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


def _entries(cache_dir):
  """This test's entries in the cache directory (other pytest workers share it and write theirs)."""
  return {name for name in os.listdir(cache_dir) if name.startswith('jit_harness_program')}


def _jitted(salt):
  """A new function object (so jit's in-memory caches miss) named for `_entries`."""
  def harness_program(x):
    return _program(x, salt)
  return jax.jit(harness_program)


def test_the_persistent_cache_is_on_and_a_shape_change_still_counts_as_a_recompilation():
  cache_dir = jax.config.jax_compilation_cache_dir
  assert cache_dir and cache_dir == os.environ['JAX_COMPILATION_CACHE_DIR']
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)  # cache even this one
  try:
    salt = 1.0 + random.random()  # a program no earlier run can have cached
    before = _entries(cache_dir)
    _jitted(salt)(jnp.ones((48, 48)))
    written = _entries(cache_dir) - before
    assert len(written) == 1, written
    again = _jitted(salt)
    again(jnp.ones((48, 48)))  # the same program: XLA's compile comes from disk
    assert _entries(cache_dir) - before == written  # a hit writes nothing new
    assert again._cache_size() == 1  # pylint: disable=protected-access
    again(jnp.ones((40, 40)))  # a new shape is traced and counted anew, cache or not
    assert again._cache_size() == 2  # pylint: disable=protected-access
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_time)
