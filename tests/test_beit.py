"""BEiT backbone: relative position bias and BEiT init against timm's `Beit`, and export/import."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conftest import load_config
from configs import common
from mimjax import export
from mimjax.interop import beit as beit_lib
from mimjax.models import vit

torch = pytest.importorskip('torch')
timm_beit = pytest.importorskip('timm.models.beit')
safetensors_torch = pytest.importorskip('safetensors.torch')

KW = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=16,
          layerscale=0.1, weight_init='beit')


def randomize(params, seed=0):
  """Every leaf replaced by N(0, 0.3^2) noise (zero-initialised tables and biases included)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def images(seed=0):
  return np.random.RandomState(seed).randn(2, 16, 16, 3).astype(np.float32)


def timm_tokens(model, x):
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def test_relative_position_index_equals_timm():
  expected = timm_beit.gen_relative_position_index((14, 14)).numpy()
  np.testing.assert_array_equal(vit.relative_position_index(14), expected)
  assert vit.relative_position_index(14).max() == 27 * 27 + 2


@pytest.mark.parametrize('rel_pos,posemb', [('block', 'none'), ('shared', 'learn'),
                                            ('both', 'none')])
def test_export_equals_timm_beit(rel_pos, posemb):
  model = vit.ViT(**KW, rel_pos=rel_pos, posemb=posemb)
  x = images()
  params = randomize(model.init(jax.random.PRNGKey(0), x)['params'])
  ours = np.asarray(model.apply({'params': params}, x)['tokens'])
  table = np.asarray(params['pos_embedding']) if posemb == 'learn' else None
  sd = beit_lib.to_beit(params, table)
  ref = timm_beit.Beit(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                       mlp_ratio=2.0, use_abs_pos_emb=posemb == 'learn',
                       use_rel_pos_bias=rel_pos != 'shared',
                       use_shared_rel_pos_bias=rel_pos == 'shared', init_values=0.1,
                       global_pool='token', use_fc_norm=False, num_classes=0)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  np.testing.assert_allclose(timm_tokens(ref, x), ours, atol=1e-4, rtol=0)


def test_simmim_backbone_is_timm_beit_with_a_shared_bias(tmp_path):
  # configs/simmim.py's encoder (shrunk): SimMIM's ViT, i.e. timm's Beit without an absolute
  # position embedding and with one shared relative position bias, loaded strictly.
  config = load_config('configs/simmim.py', **{'model.variant': 'mu/4', 'data.image_size': 16})
  model = export.build_encoder(config)
  x = images()
  params = randomize(model.init(jax.random.PRNGKey(0), x)['params'])
  out = str(tmp_path / 'simmim.safetensors')
  kwargs = dict(export.export_params(config, params, out)['timm_kwargs'])
  del kwargs['pretrained_cfg_overlay']
  assert (kwargs['use_abs_pos_emb'], kwargs['use_rel_pos_bias'],
          kwargs['use_shared_rel_pos_bias']) == (False, False, True)
  ref = timm_beit.Beit(**kwargs)
  mine = safetensors_torch.load_file(out)
  assert {k: tuple(v.shape) for k, v in mine.items()} == {
      k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert not any(k.startswith('blocks.0.attn.k_bias') for k in mine)
  ref.load_state_dict(mine, strict=True)
  ours = np.asarray(model.apply({'params': params}, x)['tokens'])
  np.testing.assert_allclose(timm_tokens(ref, x), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize('block,shared', [(True, True), (False, True), (True, False)])
def test_import_from_timm_beit(block, shared):
  torch.manual_seed(0)
  ref = timm_beit.Beit(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                       mlp_ratio=2.0, use_abs_pos_emb=False, use_rel_pos_bias=block,
                       use_shared_rel_pos_bias=shared, init_values=0.1, global_pool='token',
                       use_fc_norm=False, num_classes=0)
  with torch.no_grad():  # tables and biases are zero-initialised: make every weight matter
    for p in ref.parameters():
      p.normal_(0, 0.3)
  sd = {k: v.numpy() for k, v in ref.state_dict().items() if 'relative_position_index' not in k}
  params, model_values = beit_lib.from_beit(sd, num_heads=2)
  assert model_values['rel_pos'] == {(True, True): 'both', (False, True): 'shared',
                                     (True, False): 'block'}[(block, shared)]
  assert model_values['posemb'] == 'none'
  model = vit.ViT(**KW, rel_pos=model_values['rel_pos'], posemb='none')
  x = images(1)
  ours = np.asarray(model.apply({'params': params}, x)['tokens'])
  np.testing.assert_allclose(ours, timm_tokens(ref, x), atol=1e-4, rtol=0)


def test_mae_token_dropping_gathers_the_bias():
  """With keep_idx, kept tokens see the bias of their original positions: equal to the full
  sequence when an attention-free check is used, i.e. keeping every patch in a permuted order."""
  model = vit.ViT(**KW, rel_pos='both', posemb='none')
  x = images(2)
  params = randomize(model.init(jax.random.PRNGKey(0), x)['params'])
  perm = np.stack([np.random.RandomState(s).permutation(16) for s in range(2)])
  full = np.asarray(model.apply({'params': params}, x)['patch_tokens'])
  kept = np.asarray(model.apply({'params': params}, x, keep_idx=jnp.asarray(perm))['patch_tokens'])
  np.testing.assert_allclose(kept, np.take_along_axis(full, perm[..., None], 1), atol=1e-5)


def test_beit_init_statistics():
  """Kernels: N(0, 0.02^2) truncated at +-0.02 (the reference's trunc_normal_(a=-std, b=std)),
  output projections of block l divided by sqrt(2 l); biases zero; no k bias."""
  model = vit.ViT(**vit.parse_variant('pico/4'), image_size=32, rel_pos='both',
                  weight_init='beit')
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  unit_std = scipy.stats.truncnorm(-1, 1).std()  # ~0.5396
  for i in range(4):
    blk = params['Transformer'][f'encoderblock_{i}']
    attn, mlp = blk['MultiHeadDotProductAttention_0'], blk['MlpBlock_0']
    bound = 0.02 / np.sqrt(2 * (i + 1))
    for kernel in (attn['out']['kernel'], mlp['Dense_1']['kernel']):
      kernel = np.asarray(kernel)
      assert abs(kernel.std() / (bound * unit_std) - 1) < 0.03
      assert np.abs(kernel).max() <= bound * (1 + 1e-6)
    q = np.asarray(attn['query']['kernel'])
    assert abs(q.std() / (0.02 * unit_std) - 1) < 0.03
    assert 'bias' not in attn['key'] and not np.any(np.asarray(attn['query']['bias']))
    assert not np.any(np.asarray(mlp['Dense_1']['bias']))
    assert not np.any(np.asarray(blk['rel_pos_bias']['relative_position_bias_table']))


def test_export_cli_writes_a_timm_beit(tmp_path):
  """export_params on a rel-pos config -> the sidecar rebuilds a timm Beit with the same tokens."""
  c = common.base_config()
  common.apply_runlocal(c)
  c.data.image_size = 16
  c.model.variant = 'mu/4'
  c.model.rel_pos, c.model.posemb, c.model.weight_init = 'both', 'none', 'beit'
  model = vit.ViT(**vit.encoder_kwargs(c.model, 16))
  x = images(3)
  params = randomize(model.init(jax.random.PRNGKey(0), x)['params'])
  out = str(tmp_path / 'enc.safetensors')
  sidecar = export.export_params(c, params, out)
  assert sidecar['timm_model'] == beit_lib.TIMM_MODEL
  ref = export.create_timm_model(out).eval()
  assert isinstance(ref, timm_beit.Beit)
  np.testing.assert_allclose(timm_tokens(ref, x), export.forward_features(c, params, x),
                             atol=1e-4, rtol=0)
