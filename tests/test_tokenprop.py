"""TokenProp: decoder shapes, pixel shuffle, loss values, and the plug-in on supervised and MAE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import mae as mae_config
from configs import supervised as supervised_config
from mimjax import errors
from mimjax import registry
from mimjax import validation
from mimjax.models import vit
from mimjax.plugins import tokenprop


@pytest.mark.parametrize('grid,out', [(7, 28), (14, 64), (16, 64), (14, 56)])
def test_decoder_output_size(grid, out):
  decoder = tokenprop.TokenPropDecoder(grid_size=grid, hidden=32, output_size=out)
  tokens = jnp.ones((2, grid * grid, 24))
  params = decoder.init(jax.random.PRNGKey(0), tokens)['params']
  assert decoder.apply({'params': params}, tokens).shape == (2, out, out, 3)


def test_decoder_layers_follow_table_16():
  # Table 16 for the 196 tokens of a 224-px ViT-S/16: input map 16 x 16; residual 3x3 blocks of
  # 256, 256 channels at 16; pixel shuffle to 64 channels at 32; 64 at 32; pixel shuffle to 16
  # channels at 64; 3 at 64.
  decoder = tokenprop.TokenPropDecoder(grid_size=14, hidden=256)
  tokens = jnp.ones((1, 196, 384))
  params = decoder.init(jax.random.PRNGKey(0), tokens)['params']
  shapes = jax.tree_util.tree_map(jnp.shape, params)
  assert shapes['block_0']['conv']['kernel'] == (3, 3, 384, 256)
  assert shapes['block_0']['shortcut']['kernel'] == (1, 1, 384, 256)
  assert shapes['block_1']['conv']['kernel'] == (3, 3, 256, 256)
  assert 'shortcut' not in shapes['block_1'] and 'shortcut' not in shapes['block_2']
  assert shapes['block_2']['conv']['kernel'] == (3, 3, 64, 64)
  assert shapes['block_out']['conv']['kernel'] == (3, 3, 16, 3)
  assert shapes['block_out']['shortcut']['kernel'] == (1, 1, 16, 3)
  _, state = decoder.apply({'params': params}, tokens, capture_intermediates=True)
  sizes = {name: state['intermediates'][name]['__call__'][0].shape
           for name in ('block_0', 'block_1', 'block_2', 'block_out')}
  assert sizes == {'block_0': (1, 16, 16, 256), 'block_1': (1, 16, 16, 256),
                   'block_2': (1, 32, 32, 64), 'block_out': (1, 64, 64, 3)}


def test_output_block_is_residual_without_relu():
  decoder = tokenprop.TokenPropDecoder(grid_size=4, hidden=16, output_size=16)
  tokens = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
  params = decoder.init(jax.random.PRNGKey(0), tokens)['params']
  assert float(decoder.apply({'params': params}, tokens).min()) < 0  # normalised images are


def test_pixel_shuffle_matches_tf_depth_to_space():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 32)).astype(np.float32)
  np.testing.assert_array_equal(tokenprop.pixel_shuffle(jnp.asarray(x), 2),
                                tf.nn.depth_to_space(x, 2).numpy())


def test_reconstruction_loss_hand_values():
  pred = jnp.zeros((1, 2, 2, 1))
  images = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  assert float(tokenprop.reconstruction_loss(pred, images)) == pytest.approx(7.5)  # (1+4+9+16)/4
  # A constant image stays constant when resized down: (3 - 1)^2 = 4.
  assert float(tokenprop.reconstruction_loss(pred + 1.0, jnp.full((1, 8, 8, 1), 3.0))) == \
      pytest.approx(4.0)


def _batch(config, n=4):
  s = config.data.image_size
  rng = np.random.default_rng(0)
  return {'image': jnp.asarray(rng.normal(size=(n, s, s, 3)), jnp.float32),
          'label': jnp.arange(n) % 10}


def test_plugin_on_supervised_owns_decoder_outside_encoder():
  config = supervised_config.get_config('runlocal,tokenprop')
  config.unlock()
  config.model.variant = 'mu/4'
  validation.validate(config)
  framework = registry.build(config)
  batch = _batch(config)
  params, _ = framework.init(jax.random.PRNGKey(0), batch)
  assert set(params) == {'encoder', 'tokenprop'}
  plain = vit.from_config(config).init(jax.random.PRNGKey(0), batch['image'])['params']
  assert jax.tree_util.tree_structure(params['encoder']) == jax.tree_util.tree_structure(plain)
  assert set(params['tokenprop']) == {'block_0', 'block_1', 'block_2', 'block_out'}

  loss, (metrics, _) = framework.loss(params, {}, batch, jax.random.PRNGKey(1), 0)
  rec = metrics['loss_tokenprop']
  np.testing.assert_allclose(loss, metrics['loss_supervised'] + 1e-3 * rec, rtol=1e-6)
  # The term is the L2 between G(tokenizer tokens) and the image the encoder saw (mixed).
  _, _, outputs = framework.forward(params, {}, batch, jax.random.PRNGKey(2), True)
  assert not np.allclose(outputs.image, batch['image'])  # mixup / cutmix changed the input
  plugin = framework.plugins[0]
  term, plugin_metrics, _ = plugin.loss(params, None, outputs, batch, None, 0, True)
  pred = plugin.decoder.apply({'params': params['tokenprop']}, outputs.encoder['tokenizer'])
  expected = np.mean((np.asarray(pred) - np.asarray(outputs.image)) ** 2)
  np.testing.assert_allclose(plugin_metrics['loss_tokenprop'], expected, rtol=1e-5)
  np.testing.assert_allclose(term, 1e-3 * expected, rtol=1e-5)


def test_plugin_on_mae_reads_all_patch_tokens():
  config = mae_config.get_config('runlocal')
  config.unlock()
  config.model.variant = 'mu/4'
  config.tokenprop.enabled = True
  validation.validate(config)
  framework = registry.build(config)
  batch = _batch(config)
  params, _ = framework.init(jax.random.PRNGKey(0), batch)
  _, _, outputs = framework.forward(params, {}, batch, jax.random.PRNGKey(1), True)
  assert outputs.encoder['patch_tokens'].shape[1] == 12  # 25% of 49 visible
  assert outputs.encoder['tokenizer'].shape == (4, 49, 32)  # the full grid
  loss, (metrics, _) = framework.loss(params, {}, batch, jax.random.PRNGKey(1), 0)
  assert np.isfinite(loss) and metrics['loss_tokenprop'] > 0


def test_rejects_non_positive_weight():
  config = supervised_config.get_config('runlocal,tokenprop')
  config.unlock()
  config.tokenprop.weight = 0.0
  with pytest.raises(errors.ConfigError, match='tokenprop.weight'):
    validation.validate(config)
