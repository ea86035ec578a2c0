"""The jitted update (`mimjax.train_step`): a non-finite update is never applied, even from a
finite loss and gradient, and a finite one is; checked exactly on `LinearRegression`, a real (if
small) framework that test_train.py's update checks use too."""
import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import set_fields
from mimjax import train_step as train_step_lib
from mimjax.frameworks import base


class LinearRegression(base.Framework):
  """A real (if small) framework: least squares of a linear map, for exact update checks."""
  name = 'linreg'

  def build_model(self):
    return nn.Dense(1, use_bias=False)

  def init_model(self, rng, batch):
    return {'encoder': self.model.init(rng, batch['x'])['params']}

  def forward(self, params, model_state, batch, rng, train):
    pred = self.model.apply({'params': params['encoder']}, batch['x'])[:, 0]
    return jnp.mean((pred - batch['y']) ** 2), {}, base.ForwardOutputs(encoder={}, image=batch['x'])


def _linreg_step(config):
  batch = {'x': jnp.ones((4, 3), jnp.float32), 'y': jnp.ones((4,), jnp.float32)}
  framework = LinearRegression(config)
  init_fn, _, tx, lr = train_step_lib.build(framework, config, batch)
  return init_fn(), jax.jit(train_step_lib.make_train_step(framework, tx, lr)), batch


def test_nan_params_from_a_finite_loss_are_not_applied(tiny_mae_config):
  """Adam with b2 = 1: the second moment's bias correction is 0/0, so the update is NaN although
  the loss and gradient are finite (optax itself gives NaN here); the state must stay put."""
  config = set_fields(copy.deepcopy(tiny_mae_config), **{'optim.b2': 1.0})
  state, step, batch = _linreg_step(config)
  # What optax alone does with these gradients: NaN updates from a finite gradient.
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  adam = optax.adam(1e-3, b2=1.0)
  updates, _ = adam.update(grads, adam.init(state.params))
  assert np.isnan(np.asarray(jax.tree_util.tree_leaves(updates)[0])).all()

  before = jax.device_get(state.params)
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert float(metrics['nonfinite']) == 1.0
  np.testing.assert_array_equal(jax.device_get(new_state.params)['encoder']['kernel'],
                                before['encoder']['kernel'])


def test_finite_update_is_applied(tiny_mae_config):
  state, step, batch = _linreg_step(set_fields(copy.deepcopy(tiny_mae_config), warmup_steps=0))
  new_state, metrics = step(state, batch)
  assert float(metrics['nonfinite']) == 0.0
  assert not np.array_equal(jax.device_get(new_state.params)['encoder']['kernel'],
                            jax.device_get(state.params)['encoder']['kernel'])
