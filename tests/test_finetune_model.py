"""MAE's fine-tuning model (`models_vit.py` with global_pool, `main_finetune.py`): the mean patch
token of the last block, normalised by a fresh `fc_norm` (no final norm), a head drawn from timm's
trunc_normal_(std=2e-5), fc_norm outside the layer-wise decay, and an export that timm's own
VisionTransformer(global_pool='avg', fc_norm=True) computes identically."""
import jax
import numpy as np
import pytest

from conftest import load_config
from mimjax import errors
from mimjax import export
from mimjax import optim
from mimjax import validation

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')


def finetune_config(**overrides):
  return load_config('configs/finetune.py:runlocal', **{'model.variant': 'mu/4', **overrides})


def init_params(config, seed=0, perturb=0.0):
  """Encoder params; `perturb` > 0 moves every leaf off its symmetric init (LayerNorm 1/0, zero
  biases), where a swapped or missing mapping would go unnoticed."""
  size = config.data.image_size
  model = export.build_encoder(config)
  params = model.init(jax.random.PRNGKey(seed),
                      np.zeros((1, size, size, config.data.channels), np.float32))['params']
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x) + perturb * rng.randn(*x.shape).astype(np.float32), params)


def images(config, n=3):
  size = config.data.image_size
  return np.random.RandomState(1).randn(n, size, size, config.data.channels).astype(np.float32)


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def test_pooled_feature_is_fc_norm_of_the_mean_last_block_patch_token():
  config = finetune_config()
  params = init_params(config, perturb=0.2)
  assert 'encoder_norm' not in params['Transformer']  # models_vit.py: `del self.norm`
  out = export.build_encoder(config).apply({'params': params}, images(config),
                                           capture_layers=True)
  last = np.asarray(out['layers'][-1])
  np.testing.assert_array_equal(np.asarray(out['tokens']), last)  # no final norm on the tokens
  # models_vit.py forward_features: x[:, 1:, :].mean(dim=1), then fc_norm; then the head.
  pooled = layer_norm(last[:, 1:].mean(1), params['fc_norm']['scale'], params['fc_norm']['bias'])
  np.testing.assert_allclose(out['pooled'], pooled, atol=1e-5)
  np.testing.assert_allclose(out['logits'], pooled @ params['head']['kernel']
                             + params['head']['bias'], atol=1e-5)


def test_head_and_fc_norm_init_as_main_finetune():
  config = finetune_config(**{'model.num_classes': 1000})
  params = init_params(config)
  kernel = np.asarray(params['head']['kernel']).ravel()  # 32 x 1000 draws
  # trunc_normal_(std=2e-5) cuts at the absolute bounds +-2: an untruncated N(0, 2e-5^2), so
  # 4.55% of the draws lie beyond 2 std (a cut at 2 std would leave none there).
  assert np.std(kernel) == pytest.approx(2e-5, rel=0.03)
  assert abs(np.mean(kernel)) < 1e-6
  assert 0.035 < np.mean(np.abs(kernel) > 4e-5) < 0.056
  assert not np.asarray(params['head']['bias']).any()  # timm's _init_weights: Linear bias 0
  np.testing.assert_array_equal(params['fc_norm']['scale'], 1.0)  # a fresh LayerNorm
  np.testing.assert_array_equal(params['fc_norm']['bias'], 0.0)


def test_fc_norm_gets_the_top_layer_lr():
  config = finetune_config()
  params = {'encoder': init_params(config)}
  depth, decay = 1, config.optim.layer_decay
  factors = optim.layer_decay_factors(params, depth, decay)['encoder']
  # MAE's get_layer_id_for_vit: names outside cls_token/pos_embed/patch_embed/blocks.* (fc_norm,
  # head) are layer num_layers + 1 -> scale 1; pos_embed is layer 0 -> decay ** (depth + 1).
  assert factors['fc_norm']['scale'] == 1.0 and factors['head']['kernel'] == 1.0
  assert factors['pos_embedding'] == pytest.approx(decay ** (depth + 1))


def test_export_equals_timm_global_pool_avg_fc_norm(tmp_path):
  config = finetune_config()
  params = init_params(config, perturb=0.2)
  path = str(tmp_path / 'ft.safetensors')
  sidecar = export.export_params(config, params, path)
  kwargs = sidecar['timm_kwargs']
  assert kwargs['global_pool'] == 'avg' and kwargs['fc_norm'] is True
  model = timm.create_model(sidecar['timm_model'], **kwargs)
  assert isinstance(model.norm, torch.nn.Identity)  # timm drops the final norm under fc_norm
  model.load_state_dict(safetensors_torch.load_file(path), strict=True)
  model.eval()
  x = images(config)
  with torch.no_grad():
    feats = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    logits = model.forward_head(feats).numpy()
  out = export.build_encoder(config).apply({'params': params}, x)
  np.testing.assert_allclose(feats.numpy(), out['tokens'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, out['logits'], atol=1e-4, rtol=0)


def test_npz_export_of_fc_norm_is_refused(tmp_path):
  config = finetune_config()
  with pytest.raises(errors.InteropError, match='fc_norm'):
    export.export_params(config, init_params(config), str(tmp_path / 'ft.npz'), fmt='npz')
  assert not list(tmp_path.iterdir())


def test_negative_head_init_std_is_refused():
  with pytest.raises(errors.ConfigError, match='head_init_std'):
    validation.validate(finetune_config(**{'model.head_init_std': -2e-5}))
