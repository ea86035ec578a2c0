"""Initialisation against the references' own: timm's VisionTransformer as DeiT builds it ('timm'),
SimMIM's ViT and mask token (BEiT's +-1 std cut), and zero MLP biases as MAE's `_init_weights` sets
them. Distributions are compared with two-sample KS tests against torch's own draws."""
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


def test_simmim_backbone_and_mask_token_are_cut_at_one_std():
  # models/simmim.py: VisionTransformerForSimMIM._trunc_normal_ is trunc_normal_(a=-std, b=std),
  # and it draws every Linear / Conv weight, the cls token and the mask token (std 0.02).
  config = load_config('configs/simmim.py:runlocal')
  assert config.model.weight_init == 'beit'
  fw = registry.build(config)
  draws = np.asarray(fw.model.mask_token_init(jax.random.PRNGKey(0), (100_000,)))
  torch.manual_seed(0)
  ref = torch.nn.init.trunc_normal_(torch.empty(100_000), std=0.02, a=-0.02, b=0.02)
  assert same_distribution(draws, ref)
  params = init(weight_init='beit', posemb='none', rel_pos='shared')
  out = params['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_0']['out']['kernel']
  assert same_distribution(out, ref[:out.size] / 2)  # block 2: divided by sqrt(2 * 2)
  assert same_distribution(params['embedding']['kernel'], ref[:params['embedding']['kernel'].size])


def test_default_init_has_zero_mlp_biases_as_mae():
  # MAE's _init_weights: xavier_uniform_ on every Linear, constant 0 on its bias.
  mlp = init()['Transformer']['encoderblock_0']['MlpBlock_0']
  assert not np.any(np.asarray(mlp['Dense_0']['bias']))
  assert not np.any(np.asarray(mlp['Dense_1']['bias']))
