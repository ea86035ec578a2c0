"""The round trip to PyTorch and back, per encoder family (plain ViT, MAE's fine-tuning model, the
BEiT / DTM backbone): mimjax -> every export format -> timm's forward equals the JAX one -> one
timm optimizer step -> timm train.py checkpoint -> import into a fresh run -> mimjax's forward
equals timm's. Every comparison is against timm's own model; weights are fresh and random (rel-pos
tables, layer scales and norms included), so a swapped or dropped tensor shows."""
import argparse
import os

import jax
import numpy as np
import pytest

from configs import distill
from configs import finetune
from test_export import make_config
from mimjax import errors
from mimjax import export
from mimjax.interop import pretrained

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
timm_optim = pytest.importorskip('timm.optim')

TOL = 1e-4  # relative: max |difference| / max |reference|


def _family(name):
  """A small config of each family (16 px, patch 4: seconds on a CPU)."""
  if name == 'vit':
    c = make_config('mu/4', 16, True, 'tok', 'learn', 0.1, 5)
  elif name == 'mae_finetune':  # models_vit.py with global_pool: no final norm, fc_norm, a head
    c = finetune.get_config('runlocal')
  else:  # the DTM recipe's backbone: rel-pos per block and shared, no absolute table, layer scale
    c = distill.get_config('runlocal,dtm')
  with c.unlocked():
    c.model.variant, c.data.image_size, c.model.num_classes = 'mu/4', 16, 5
    c.model.dtype = 'float32'
  return c


def _random_params(config, seed=0):
  """Init params, every leaf plus N(0, 0.2^2) noise (zero tables and biases become non-zero)."""
  model = export.build_encoder(config)
  size = config.data.image_size
  params = model.init(jax.random.PRNGKey(seed), np.zeros((1, size, size, 3), np.float32))['params']
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(x) + 0.2 * rng.randn(*x.shape).astype(np.float32) for x in leaves])


def _jax(config, params, x):
  out = export.build_encoder(config).apply({'params': params}, x)
  return np.asarray(out['tokens']), np.asarray(out['logits'])


def _timm(model, x):
  model.eval()
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    return tokens.numpy(), model.forward_head(tokens).numpy()


def _close(ours, ref):
  for a, b in zip(ours, ref):
    assert np.max(np.abs(a - b)) <= TOL * np.max(np.abs(b)), np.max(np.abs(a - b))


def _load(out, fmt):
  if fmt == 'hub':
    return timm.create_model(f'local-dir:{out}', pretrained=True)
  return export.create_timm_model(out)


@pytest.mark.parametrize('family,fmts', [('vit', ('safetensors', 'npz', 'hub')),
                                         ('mae_finetune', ('safetensors', 'hub')),
                                         ('dtm', ('safetensors', 'hub'))])
def test_round_trip(tmp_path, family, fmts):
  config = _family(family)
  params = _random_params(config)
  if family == 'dtm':
    tables = params['Transformer']['rel_pos_bias']['relative_position_bias_table']
    assert np.all(np.asarray(tables) != 0)
  x = np.random.RandomState(5).randn(2, 16, 16, 3).astype(np.float32)
  ours = _jax(config, params, x)
  for fmt in ('safetensors', 'npz', 'hub'):
    out = str(tmp_path / f'{family}.{fmt}')
    if fmt not in fmts:  # timm's npz loader has no Beit and no fc_norm: refused, nothing written
      with pytest.raises(errors.InteropError):
        export.export_params(config, params, out, fmt)
      assert not os.path.exists(out) and not os.path.exists(out + '.json')
      continue
    export.export_params(config, params, out, fmt)
    model = _load(out, fmt)
    _close(_timm(model, x), ours)

    model.train()  # one step of timm's AdamW on a classification loss, as train.py would
    optimizer = timm_optim.create_optimizer_v2(model, opt='adamw', lr=1e-2, weight_decay=0.05,
                                               layer_decay=0.65)
    loss = torch.nn.functional.cross_entropy(
        model(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.tensor([1, 3]))
    loss.backward()
    optimizer.step()
    stepped = _timm(model, x)
    assert np.max(np.abs(stepped[1] - ours[1])) > 1e-3  # the step changed the model
    checkpoint = str(tmp_path / f'{family}_{fmt}.pth.tar')  # timm train.py's checkpoint layout
    torch.save({'epoch': 1, 'arch': 'x', 'state_dict': model.state_dict(),
                'args': argparse.Namespace(model=f'local-dir:{out}')}, checkpoint)

    fresh = config.copy_and_resolve_references()  # the fine-tuning run that starts from it
    with fresh.unlocked():
      fresh.init.checkpoint, fresh.init.format = checkpoint, 'timm'
      if fmt == 'npz':  # the npz export folded layer scale into the weights (as its error says)
        fresh.model.layerscale = 0.0
    abstract = {'encoder': jax.eval_shape(lambda: export.build_encoder(fresh).init(
        jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)))['params']}
    loaded = pretrained.load(fresh, abstract)['encoder']
    assert sorted(loaded) == sorted(abstract['encoder'])  # head and fc_norm come back too
    _close(_jax(fresh, loaded, x), stepped)


def _timm_native(kind, seed=0):
  """A timm model built by timm, every parameter N(0, 0.3^2) (its zero tables and biases too)."""
  torch.manual_seed(seed)
  if kind == 'vit':
    model = timm.create_model('vit_base_patch16_224', img_size=16, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, global_pool='avg', fc_norm=True,
                              num_classes=5)
  else:  # timm's default Beit pooling is avg, which gives it fc_norm and no final norm
    model = timm.create_model('beit_base_patch16_224', img_size=16, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, global_pool='avg', num_classes=5)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


@pytest.mark.parametrize('kind,where', [('vit', 'pth.tar'), ('beit', 'safetensors'),
                                        ('beit', 'hub')])
def test_timm_fc_norm_models_import_into_the_fine_tuning_model(tmp_path, kind, where):
  """timm's own fc_norm models (ViT fc_norm=True, Beit avg pooling) start a mimjax fine-tuning run
  (model.fc_norm, gap) and compute timm's tokens and logits; a timm train.py checkpoint
  (CheckpointSaver's `.pth.tar`), a .safetensors file and a timm model folder alike."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import timm.utils  # pylint: disable=g-import-not-at-top
  model = _timm_native(kind)
  assert 'fc_norm.weight' in model.state_dict() and 'norm.weight' not in model.state_dict()
  if where == 'pth.tar':
    optimizer = timm_optim.create_optimizer_v2(model, opt='adamw', lr=1e-3)
    saver = timm.utils.CheckpointSaver(model, optimizer, args=argparse.Namespace(model='x'),
                                       checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=1.0)
    path = str(tmp_path / 'model_best.pth.tar')
  elif where == 'safetensors':
    path = str(tmp_path / 'beit.safetensors')
    safetensors.torch.save_file(model.state_dict(), path)
  else:
    path = str(tmp_path / 'folder')
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 16, 16))
    timm.models.save_for_hf(model, path, model_args=dict(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, global_pool='avg'))
  config = finetune.get_config('runlocal')
  with config.unlocked():
    config.model.variant, config.data.image_size, config.model.num_classes = 'mu/4', 16, 5
    config.model.posemb = 'learn' if kind == 'vit' else 'none'
    if kind == 'beit':  # beit_base_patch16_224 has layer scale (init_values 0.1)
      config.model.rel_pos, config.model.weight_init, config.model.layerscale = 'block', 'beit', 0.1
    config.init.checkpoint, config.init.format = path, 'timm'
  abstract = {'encoder': jax.eval_shape(lambda: export.build_encoder(config).init(
      jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)))['params']}
  loaded = pretrained.load(config, abstract)['encoder']
  x = np.random.RandomState(5).randn(2, 16, 16, 3).astype(np.float32)
  _close(_jax(config, loaded, x), _timm(model, x))


def test_import_errors_name_the_real_reason(tmp_path):
  """A Beit without fc_norm is no longer refused for it, and the message of a broken file names
  what is wrong with it rather than a check that ran first."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  sd = _timm_native('beit').state_dict()
  sd.pop('fc_norm.weight')
  sd.pop('fc_norm.bias')
  path = str(tmp_path / 'no_norm.safetensors')
  safetensors.torch.save_file(sd, path)
  config = finetune.get_config('runlocal')
  with config.unlocked():
    config.model.variant, config.data.image_size = 'mu/4', 16
    config.model.posemb, config.model.rel_pos = 'none', 'block'
    config.init.checkpoint, config.init.format = path, 'timm'
  with pytest.raises(errors.ConfigError, match='neither norm nor fc_norm'):
    pretrained.load(config, {})
  with config.unlocked():
    config.model.rel_pos = 'none'
  safetensors.torch.save_file(_timm_native('beit').state_dict(), path)
  with pytest.raises(errors.ConfigError, match='is a timm Beit .*rel_pos=both'):
    pretrained.load(config, {})
