"""Initialisation against the references' own: timm's VisionTransformer as DeiT builds it ('timm'),
SimMIM's ViT ('simmim', the init of timm's Beit plus a std-0.02 patch embedding) and its mask
token, and zero MLP biases as MAE's `_init_weights` sets them. Distributions are compared with
two-sample KS tests against freshly initialised torch models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conftest import load_config
from mimjax import registry
from mimjax.models import vit

torch = pytest.importorskip('torch')
timm_vit = pytest.importorskip('timm.models.vision_transformer')
timm_beit = pytest.importorskip('timm.models.beit')

SHAPE = dict(width=192, depth=2, mlp_dim=768, num_heads=3, patch_size=16, image_size=64)


def init(**kw):
  model = vit.ViT(**SHAPE, **kw)
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))['params']


def same_distribution(ours, theirs):
  ours, theirs = np.asarray(ours).ravel(), np.asarray(theirs.detach()).ravel()
  return scipy.stats.ks_2samp(ours, theirs).pvalue > 1e-3


def torch_params(model):
  return dict(model.named_parameters())


def test_timm_init_is_deits_vit():
  params = init(weight_init='timm', posemb='learn', num_classes=1000, head_init_std=0.02)
  torch.manual_seed(0)
  ref = torch_params(timm_vit.VisionTransformer(
      img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=1000))
  blk = params['Transformer']['encoderblock_1']
  attn, mlp = blk['MultiHeadDotProductAttention_0'], blk['MlpBlock_0']
  pairs = [(attn['query']['kernel'], ref['blocks.1.attn.qkv.weight'][:192]),
           (attn['value']['kernel'], ref['blocks.1.attn.qkv.weight'][384:]),
           (attn['out']['kernel'], ref['blocks.1.attn.proj.weight']),
           (mlp['Dense_0']['kernel'], ref['blocks.1.mlp.fc1.weight']),
           (mlp['Dense_1']['kernel'], ref['blocks.1.mlp.fc2.weight']),
           (params['head']['kernel'], ref['head.weight']),
           (params['pos_embedding'], ref['pos_embed']),
           # timm leaves the patch embedding at PyTorch's Conv2d default, U(+-1/sqrt(fan_in))
           (params['embedding']['kernel'], ref['patch_embed.proj.weight'])]
  for ours, theirs in pairs:
    assert same_distribution(ours, theirs)
  assert abs(np.std(params['head']['kernel']) / 0.02 - 1) < 0.03
  for bias in (attn['query']['bias'], attn['key']['bias'], attn['out']['bias'],
               mlp['Dense_0']['bias'], mlp['Dense_1']['bias'], params['head']['bias']):
    assert not np.any(np.asarray(bias))


def test_simmim_init_is_timm_beits_with_a_trunc_normal_patch_embedding():
  params = init(weight_init='simmim', posemb='none', rel_pos='shared', layerscale=0.1)
  torch.manual_seed(0)
  ref = torch_params(timm_beit.Beit(
      img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=0,
      use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
      init_values=0.1))
  blk = params['Transformer']['encoderblock_1']
  attn, mlp = blk['MultiHeadDotProductAttention_0'], blk['MlpBlock_0']
  pairs = [(attn['query']['kernel'], ref['blocks.1.attn.qkv.weight'][:192]),
           (attn['out']['kernel'], ref['blocks.1.attn.proj.weight']),  # / sqrt(2 * 2)
           (mlp['Dense_0']['kernel'], ref['blocks.1.mlp.fc1.weight']),
           (mlp['Dense_1']['kernel'], ref['blocks.1.mlp.fc2.weight']),
           (params['cls'], ref['cls_token'])]
  for ours, theirs in pairs:
    assert same_distribution(ours, theirs)
  assert 'bias' not in attn['key'] and not np.any(np.asarray(mlp['Dense_1']['bias']))
  # SimMIM's _init_weights also draws the patch-embedding conv with trunc_normal_(std=.02)
  # (timm's Beit leaves it at PyTorch's default): an untruncated N(0, 0.02^2).
  kernel = np.asarray(params['embedding']['kernel']).ravel()
  assert abs(kernel.std() / 0.02 - 1) < 0.03 and 0.035 < np.mean(np.abs(kernel) > 0.04) < 0.056


def test_simmim_mask_token_is_an_untruncated_trunc_normal():
  # models/simmim.py: trunc_normal_(mask_token, std=.02), timm's cut at +-2 absolute.
  fw = registry.build(load_config('configs/simmim.py:runlocal'))
  draws = np.asarray(fw.model.mask_token_init(jax.random.PRNGKey(0), (100_000,)))
  torch.manual_seed(0)
  ref = torch.nn.init.trunc_normal_(torch.empty(100_000), std=0.02)
  assert same_distribution(draws, ref)
  assert 0.04 < np.mean(np.abs(draws) > 0.04) < 0.051  # 4.55% beyond 2 std: no cut there


def test_default_init_has_zero_mlp_biases_as_mae():
  # MAE's _init_weights: xavier_uniform_ on every Linear, constant 0 on its bias.
  mlp = init()['Transformer']['encoderblock_0']['MlpBlock_0']
  assert not np.any(np.asarray(mlp['Dense_0']['bias']))
  assert not np.any(np.asarray(mlp['Dense_1']['bias']))
