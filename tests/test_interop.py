"""Import from PyTorch: timm ViT state dicts and official MAE checkpoints -> mimjax, checked against
timm's forward and a reference re-implementation of the MAE forward pass; a malformed init file
(not a state dict, unsafe, wrong shapes or keys, not a PyTorch file) is one line before a run
starts."""
import copy
import functools
import os

import jax
import numpy as np
import optax
import pytest

from configs import mae as mae_config
from conftest import one_line_error
from conftest import set_fields
from mimjax import errors
from mimjax import export
from mimjax import registry
from mimjax import train
from mimjax import train_step
from mimjax.interop import mae as mae_lib
from mimjax.interop import pretrained
from mimjax.interop import timm as timm_lib
from mimjax.interop import torch_files
from mimjax.models import vit

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
from timm.layers import PatchEmbed  # noqa: E402  (after the importorskip above)
from timm.models.vision_transformer import Block  # noqa: E402


def randomize_(module, seed=0):
  """Every parameter drawn at random (LayerNorms included) so a swapped mapping shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.requires_grad:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return module


def timm_vit(seed=0, **kw):
  args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
  return randomize_(timm.create_model('vit_base_patch16_224', **{**args, **kw}), seed).eval()


def state_dict_np(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def mimjax_tokens(params, x_nhwc, **kw):
  args = dict(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=4, image_size=16,
              posemb='learn')
  out = vit.ViT(**{**args, **kw}).apply({'params': params}, x_nhwc)
  return np.asarray(out['tokens']), np.asarray(out['pooled'])


def torch_features(model, x_nhwc):
  with torch.no_grad():
    feats = model.forward_features(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    return feats.numpy(), model.forward_head(feats, pre_logits=True).numpy()


X = np.random.RandomState(3).randn(2, 16, 16, 3).astype(np.float32)

ROUND_TRIP = {
    'cls_token': dict(),
    'layerscale_head': dict(init_values=0.1, num_classes=7),
    'gap_no_cls': dict(class_token=False, global_pool='avg', fc_norm=False),
}


@pytest.mark.parametrize('name', sorted(ROUND_TRIP))
def test_timm_round_trip_is_exact(name):
  model = timm_vit(**ROUND_TRIP[name])  # timm's default layout: pos_embed has a cls slot
  sd = state_dict_np(model)
  params, arch = timm_lib.from_timm(sd, num_heads=2)
  back = timm_lib.to_timm(params, params['pos_embedding'])
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert arch.layerscale == ('init_values' in ROUND_TRIP[name])


@pytest.mark.parametrize('name', sorted(ROUND_TRIP))
@pytest.mark.parametrize('no_embed_class', [True, False])
def test_imported_timm_matches_timm_forward(name, no_embed_class):
  kw = ROUND_TRIP[name]
  model = timm_vit(no_embed_class=no_embed_class, **kw)
  params, arch = timm_lib.from_timm(state_dict_np(model), num_heads=2)
  tokens, pooled = mimjax_tokens(params, X, cls_token=arch.cls_token,
                                 pool='gap' if kw.get('global_pool') == 'avg' else 'tok',
                                 layerscale=0.1 if arch.layerscale else 0.0,
                                 num_classes=arch.num_classes)
  want_tokens, want_pooled = torch_features(model, X)
  np.testing.assert_allclose(tokens, want_tokens, atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)


def test_no_embed_class_import_then_export_keeps_function():
  """timm (no cls slot) -> mimjax (zero slot) -> timm (default layout): the same features."""
  model = timm_vit(no_embed_class=True)
  params, _ = timm_lib.from_timm(state_dict_np(model), num_heads=2)
  back = timm_vit(no_embed_class=False, seed=9)
  back.load_state_dict({k: torch.from_numpy(v) for k, v in
                        timm_lib.to_timm(params, params['pos_embedding']).items()})
  np.testing.assert_allclose(torch_features(back, X)[0], torch_features(model, X)[0], atol=1e-5)


def test_safetensors_and_pth_files_load_the_same(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  sd = timm_vit().state_dict()
  save_file(dict(sd), str(tmp_path / 'a.safetensors'))
  torch.save({'model': sd}, str(tmp_path / 'b.pth'))
  a = torch_files.read_state_dict(str(tmp_path / 'a.safetensors'))
  b = torch_files.read_state_dict(str(tmp_path / 'b.pth'))
  assert sorted(a) == sorted(b) == sorted(sd)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_unsupported_timm_layouts_are_refused():
  fc_norm = state_dict_np(timm_vit(class_token=False, global_pool='avg'))  # fc_norm=True with avg
  params, arch = timm_lib.from_timm(fc_norm, num_heads=2)  # imports (into model.fc_norm)
  assert arch.fc_norm and 'fc_norm' in params and 'encoder_norm' not in params['Transformer']
  fc_norm['norm.weight'], fc_norm['norm.bias'] = fc_norm['fc_norm.weight'], fc_norm['fc_norm.bias']
  with pytest.raises(errors.InteropError, match='both norm and fc_norm'):
    timm_lib.from_timm(fc_norm, num_heads=2)
  regs = timm_vit(reg_tokens=4, no_embed_class=True)
  with pytest.raises(errors.InteropError, match='reg_token'):
    timm_lib.from_timm(state_dict_np(regs), num_heads=2)


# ---------------------------------------------------------------------------------------------
# Starting a mimjax run from the weights.

def small_mae_config(**model):
  c = mae_config.get_config('runlocal')
  c.model.variant = 'mu/4'
  c.data.image_size = 16
  c.mae.decoder_width, c.mae.decoder_depth, c.mae.decoder_heads = 16, 2, 2
  for k, v in model.items():
    c.model[k] = v
  return c


def fresh_state(config, init):
  framework = registry.build(config)
  batch = {'image': np.zeros((2, 16, 16, 3), np.float32)}
  tx = optax.sgd(0.1)
  init_fn = train_step.init_state_fn(framework, tx, batch, seed=0)
  abstract = jax.eval_shape(init_fn)
  return init_fn(pretrained.load(config, abstract.params) if init else None)


def test_training_starts_from_timm_weights(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  model = randomize_(timm.create_model(
      'vit_base_patch16_224', img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
      num_classes=0, no_embed_class=False), seed=4)
  path = str(tmp_path / 'w.safetensors')
  save_file(dict(model.state_dict()), path)
  config = small_mae_config(posemb='learn')
  config.init.checkpoint = path
  state = fresh_state(config, init=True)
  enc = state.params['encoder']
  tokens = export.forward_features(config, enc, X)
  np.testing.assert_allclose(tokens, torch_features(model.eval(), X)[0], atol=1e-4, rtol=0)
  random_state = fresh_state(config, init=False)  # the decoder is the random one
  for a, b in zip(jax.tree_util.tree_leaves(state.params['decoder']),
                  jax.tree_util.tree_leaves(random_state.params['decoder'])):
    np.testing.assert_array_equal(a, b)

  config.model.posemb = 'sincos2d'  # learned weights need a learned position embedding
  with pytest.raises(errors.ConfigError, match='model.posemb'):
    fresh_state(config, init=True)
  config.model.posemb, config.model.variant = 'learn', 'mu/8'
  with pytest.raises(errors.ConfigError, match='variant'):
    fresh_state(config, init=True)


def test_cls_slot_folds_into_cls_for_a_sincos_config(tmp_path):
  """Fixed sin-cos patch positions with a learned cls slot start a sincos2d run exactly."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  model = timm_vit(depth=1, seed=8)
  with torch.no_grad():
    model.pos_embed[0, 1:] = torch.from_numpy(mae_sincos(32, 4)[0, 1:])
  path = str(tmp_path / 'w.safetensors')
  save_file(dict(model.state_dict()), path)
  config = small_mae_config(posemb='sincos2d')
  config.init.checkpoint = path
  enc = fresh_state(config, init=True).params['encoder']
  assert 'pos_embedding' not in enc
  np.testing.assert_allclose(export.forward_features(config, enc, X), torch_features(model, X)[0],
                             atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Official MAE checkpoints, against a reference re-implementation of MAE's forward pass.

def mae_sincos(width, grid):
  """MAE's get_2d_sincos_pos_embed(width, grid, cls_token=True), written out independently."""
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_d(width // 2, gw), one_d(width // 2, gh)], axis=1)
  return np.concatenate([np.zeros((1, width)), emb]).astype(np.float32)[None]


class ReferenceMAE(torch.nn.Module):
  """The MAE architecture (encoder on kept patches, decoder over all positions) in torch."""

  def __init__(self, img=16, patch=4, dim=32, depth=1, heads=2, ddim=16, ddepth=2, dheads=2):
    super().__init__()
    norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    grid = img // patch
    self.patch_embed = PatchEmbed(img, patch, 3, dim)
    self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = torch.nn.Parameter(torch.from_numpy(mae_sincos(dim, grid)),
                                        requires_grad=False)
    self.blocks = torch.nn.ModuleList([Block(dim, heads, 4, qkv_bias=True, norm_layer=norm)
                                       for _ in range(depth)])
    self.norm = norm(dim)
    self.decoder_embed = torch.nn.Linear(dim, ddim)
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, ddim))
    self.decoder_pos_embed = torch.nn.Parameter(torch.from_numpy(mae_sincos(ddim, grid)),
                                                requires_grad=False)
    self.decoder_blocks = torch.nn.ModuleList([
        Block(ddim, dheads, 4, qkv_bias=True, norm_layer=norm) for _ in range(ddepth)])
    self.decoder_norm = norm(ddim)
    self.decoder_pred = torch.nn.Linear(ddim, patch * patch * 3)

  def forward(self, imgs, noise, len_keep):
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
    b, n, d = x.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_embed(self.norm(x))
    mask_tokens = self.mask_token.repeat(b, n + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:], ids_keep


def test_mae_checkpoint_matches_reference_forward(tmp_path):
  ref = randomize_(ReferenceMAE(), seed=5).eval()
  path = str(tmp_path / 'mae_visualize.pth')
  torch.save({'model': ref.state_dict(), 'epoch': 799}, path)
  params, arch, model_cfg, mae_cfg = mae_lib.import_mae(path, num_heads=2, decoder_heads=2)
  assert model_cfg == dict(posemb='sincos2d', cls_token=True, layerscale=False, variant='mu/4')
  assert mae_cfg == dict(decoder_width=16, decoder_depth=2, decoder_heads=2, decoder_mlp_ratio=4)
  assert arch.image_size == 16

  noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    want, ids_keep = ref(torch.from_numpy(X).permute(0, 3, 1, 2), noise, len_keep=4)
  config = small_mae_config()
  framework = registry.build(config)
  params['encoder'].pop('pos_embedding')  # fixed sin-cos in this config
  _, dec = framework.model.apply({'params': params}, X, ids_keep.numpy().astype(np.int32))
  np.testing.assert_allclose(np.asarray(dec['pred']), want.numpy(), atol=1e-4, rtol=0)

  # Continued pre-training: a fresh run takes encoder and decoder from the file.
  config.init.checkpoint, config.init.format = path, 'mae'
  state = fresh_state(config, init=True)
  _, dec = framework.model.apply({'params': {k: state.params[k] for k in ('encoder', 'decoder')}},
                                 X, ids_keep.numpy().astype(np.int32))
  np.testing.assert_allclose(np.asarray(dec['pred']), want.numpy(), atol=1e-4, rtol=0)
  config.mae.decoder_depth = 3
  with pytest.raises(errors.ConfigError, match='decoder_depth'):
    fresh_state(config, init=True)


def test_mae_decoder_with_learned_positions_is_refused(tmp_path):
  ref = randomize_(ReferenceMAE(), seed=6)
  with torch.no_grad():
    ref.decoder_pos_embed.add_(0.1)
  path = str(tmp_path / 'mae.pth')
  torch.save({'model': ref.state_dict()}, path)
  with pytest.raises(errors.InteropError, match='decoder_pos_embed'):
    mae_lib.import_mae(path, num_heads=2, decoder_heads=2)


def _timm_state_dict():
  return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=28, patch_size=4,
                           depth=1, num_classes=0).state_dict()


class _Unsafe:
  def __reduce__(self):
    return (os.system, ('echo this must never run',))


def _bad_init_files(directory):
  """{case: (path, expected message part)} of files a fresh run must refuse to start from."""
  sd = _timm_state_dict()
  wrong_qkv = dict(sd, **{'blocks.0.attn.qkv.weight': sd['blocks.0.attn.qkv.weight'][:10]})
  missing = {k: v for k, v in sd.items() if k != 'blocks.0.norm1.bias'}
  cases = {'list': ([1, 2], 'holds a list, not a state dict'),
           'unsafe': (_Unsafe(), 'refused as unsafe'),
           'qkv': (wrong_qkv, 'blocks.0.attn.qkv.weight has shape (10, 192)'),
           'missing': (missing, "no 'blocks.0.norm1.bias'")}
  files = {}
  for name, (obj, part) in cases.items():
    path = os.path.join(directory, f'{name}.pth')
    torch.save(obj, path)
    files[name] = (path, part)
  text = os.path.join(directory, 'notes.pth')
  with open(text, 'w') as f:
    f.write('not weights\n')
  files['text'] = (text, 'is not a PyTorch checkpoint')
  return files


def test_malformed_init_files_are_one_line_errors(tiny_mae_config, tmp_path):
  for name, (path, part) in _bad_init_files(str(tmp_path)).items():
    config = set_fields(copy.deepcopy(tiny_mae_config), **{'init.checkpoint': path})
    workdir = tmp_path / f'run_{name}'
    with pytest.raises(errors.ConfigError) as e:
      train.train(config, str(workdir))
    one_line_error(e, part, path)
    assert not workdir.exists(), name
