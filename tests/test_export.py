"""Export to timm: timm's own VisionTransformer, loaded with the exported weights, must compute the
same features as the mimjax encoder (safetensors and big_vision npz routes), the CLI must export
a checkpoint written by a real training run, and an --out that cannot be written is one line
before the workdir is read."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from configs import mae as mae_config
from conftest import one_line_error
from mimjax import errors
from mimjax import export

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (variant, image size, cls token, pool, posemb, layer scale, classes)
VARIANTS = {
    'cls_tok_sincos': ('mu/4', 16, True, 'tok', 'sincos2d', 0.0, 0),
    'gap_nocls_learn_ls': ('mu/4', 16, False, 'gap', 'learn', 0.1, 0),
    'cls_gap_sincos_ls_head': ('mu/4', 16, True, 'gap', 'sincos2d', 1e-4, 5),
    'patch8_learn_head': ('mu/8', 24, True, 'tok', 'learn', 0.0, 3),
    'patch16_pico': ('pico/16', 32, True, 'tok', 'sincos2d', 0.0, 0),
}


def make_config(variant, image_size, cls_token, pool, posemb, layerscale, num_classes):
  c = mae_config.get_config('runlocal')
  c.model.variant = variant
  c.data.image_size = image_size
  c.model.cls_token = cls_token
  c.model.pool = pool
  c.model.posemb = posemb
  c.model.layerscale = layerscale
  c.model.num_classes = num_classes
  return c


def random_params(config, seed=0):
  """Encoder params with every leaf perturbed, so no weight is at a symmetric default (LayerNorm
  scale 1, zero biases, zero head) where a swapped or transposed mapping would go unnoticed."""
  model = export.build_encoder(config)
  size = config.data.image_size
  params = model.init(jax.random.PRNGKey(seed), np.zeros((1, size, size, 3), np.float32))['params']
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.RandomState(seed)
  leaves = [np.asarray(x) + 0.2 * rng.randn(*x.shape).astype(np.float32) for x in leaves]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def images(config, n=2, seed=1):
  size = config.data.image_size
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def timm_features(model, x_nhwc):
  model.eval()
  with torch.no_grad():
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    feats = model.forward_features(x)
    return feats.numpy(), model.forward_head(feats).numpy()


def mimjax_outputs(config, params, x):
  out = export.build_encoder(config).apply({'params': params}, x)
  return np.asarray(out['tokens']), np.asarray(out.get('logits', out['pooled']))


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_safetensors_matches_timm(tmp_path, name):
  config = make_config(*VARIANTS[name])
  params = random_params(config)
  path = str(tmp_path / 'enc.safetensors')
  sidecar = export.export_params(config, params, path)
  model = timm.create_model(sidecar['timm_model'], **sidecar['timm_kwargs'])
  model.load_state_dict(safetensors_torch.load_file(path), strict=True)
  x = images(config)
  feats, head = timm_features(model, x)
  want_feats, want_head = mimjax_outputs(config, params, x)
  assert feats.shape == want_feats.shape
  np.testing.assert_allclose(feats, want_feats, atol=1e-4, rtol=0)
  # forward_head: the pooled features (num_classes=0) or the logits.
  np.testing.assert_allclose(head, want_head, atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_npz_matches_timm_loader(tmp_path, name):
  config = make_config(*VARIANTS[name])
  params = random_params(config)
  path = str(tmp_path / 'enc.npz')
  sidecar = export.export_params(config, params, path, fmt='npz')
  assert all(k.startswith('params/') for k in np.load(path).files)
  model = timm.create_model(sidecar['timm_model'], **sidecar['timm_kwargs'])
  model.load_pretrained(path)  # timm's big_vision .npz loader
  x = images(config)
  feats, head = timm_features(model, x)
  want_feats, want_head = mimjax_outputs(config, params, x)
  np.testing.assert_allclose(feats, want_feats, atol=1e-4, rtol=0)
  np.testing.assert_allclose(head, want_head, atol=1e-4, rtol=0)


@pytest.mark.parametrize('fmt', ['safetensors', 'npz'])
def test_create_timm_model_one_call(tmp_path, fmt):
  config = make_config(*VARIANTS['gap_nocls_learn_ls'])
  config.data.mean, config.data.std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
  params = random_params(config)
  path = str(tmp_path / f'enc.{fmt}')
  export.export_params(config, params, path, fmt=fmt)
  model = export.create_timm_model(path)
  data_cfg = timm.data.resolve_data_config({}, model=model)
  assert tuple(data_cfg['mean']) == (0.1, 0.2, 0.3)
  assert tuple(data_cfg['std']) == (0.4, 0.5, 0.6)
  assert tuple(data_cfg['input_size']) == (3, 16, 16)
  x = images(config)
  np.testing.assert_allclose(timm_features(model, x)[0], mimjax_outputs(config, params, x)[0],
                             atol=1e-4, rtol=0)


def test_export_materialises_sincos_with_zero_cls_slot(tmp_path):
  config = make_config(*VARIANTS['cls_tok_sincos'])
  params = random_params(config)
  path = str(tmp_path / 'enc.safetensors')
  sidecar = export.export_params(config, params, path)
  sd = safetensors_torch.load_file(path)
  assert sidecar['timm_kwargs']['no_embed_class'] is False
  assert tuple(sd['pos_embed'].shape) == (1, 17, 32)  # cls slot + 4x4 patches
  assert not sd['pos_embed'][0, 0].any()  # MAE's zero slot: the cls token gets no position
  # MAE's table: channel 0 is sin(x * 1) with x the column index, so patch row 0 reads sin(0..3).
  np.testing.assert_allclose(sd['pos_embed'][0, 1:5, 0].numpy(), np.sin(np.arange(4)), atol=1e-6)


def test_export_refuses_moto_tokenizer(tmp_path):
  config = common.base_config()
  config.model.variant = 'mu/4'
  config.data.image_size = 16
  config.model.tokenizer_norm = 'spatial'  # MoTo; set by the MoTo config when merged
  params = random_params(make_config(*VARIANTS['cls_tok_sincos']))
  with pytest.raises(errors.InteropError, match='MoTo'):
    export.export_params(config, params, str(tmp_path / 'x.safetensors'))
  # Params of a replaced tokenizer are refused even without the config field.
  params = dict(params)
  params['tokenizer'] = params.pop('embedding')
  with pytest.raises(errors.InteropError, match='cannot represent'):
    export.export_params(make_config(*VARIANTS['cls_tok_sincos']), params,
                         str(tmp_path / 'y.safetensors'))
  assert not os.listdir(tmp_path)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  from mimjax import train  # pylint: disable=g-import-not-at-top
  config = mae_config.get_config('runlocal')
  config.model.variant = 'mu/4'
  config.total_steps = 2
  config.batch_size = 8
  config.data.shuffle_buffer = 100
  config.log.progress_bar = False
  config.log.images_every_steps = 0
  config.mae.decoder_width = 16
  config.mae.decoder_depth = 1
  config.mae.decoder_heads = 2
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train(config, workdir)
  return workdir


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'mimjax.export', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # trains for 2 steps first (about a minute on 2 shared cores)
@pytest.mark.parametrize('fmt', ['safetensors', 'npz'])
def test_cli_exports_trained_checkpoint(trained_workdir, tmp_path, fmt):
  out = str(tmp_path / f'enc.{fmt}')
  result = _cli('--workdir', trained_workdir, '--out', out, '--format', fmt)
  assert result.returncode == 0, result.stderr
  sidecar = json.load(open(out + '.json'))
  assert sidecar['source']['step'] == 2 and sidecar['source']['framework'] == 'mae'
  assert sidecar['mean'] == [0.286] * 3 and sidecar['image_size'] == 28
  model = timm.create_model(sidecar['timm_model'], **sidecar['timm_kwargs'])
  if fmt == 'npz':
    model.load_pretrained(out)
  else:
    sd = safetensors_torch.load_file(out)
    assert not any('decoder' in k or 'mask' in k for k in sd)  # training-only parts left out
    model.load_state_dict(sd, strict=True)
  config, params, step = export.load_encoder(trained_workdir)
  assert step == 2
  x = images(config)
  np.testing.assert_allclose(timm_features(model, x)[0],
                             export.forward_features(config, params, x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_missing_step_fails_cleanly(trained_workdir, tmp_path):
  result = _cli('--workdir', trained_workdir, '--out', str(tmp_path / 'x.safetensors'),
                '--step', '7')
  assert result.returncode == 1
  assert 'no checkpoint 7' in result.stderr.lower() and 'Traceback' not in result.stderr
  assert 'holds steps' in result.stderr  # the steps that do exist are named


def test_export_out_directory_and_npz_name(trained, tmp_path):
  _, workdir = trained
  with pytest.raises(errors.ConfigError) as e:
    export.export_checkpoint(workdir, str(tmp_path))
  one_line_error(e, 'is a directory')
  out = str(tmp_path / 'enc.bin')
  export.export_checkpoint(workdir, out, fmt='npz')
  assert sorted(os.listdir(tmp_path)) == sorted(['run', 'enc.bin', 'enc.bin.json'])
  assert 'params/embedding/kernel' in np.load(out).files


@pytest.mark.parametrize('kind', ['parent is a file', 'read-only', 'hub onto a file'])
def test_export_paths_that_cannot_be_written_are_one_line_before_reading(tmp_path, monkeypatch,
                                                                         kind):
  """Checked before the workdir is read (it does not exist here), so nothing is written."""
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  out, fmt, part = str(blocker / 'enc.safetensors'), 'safetensors', 'is a file, not a directory'
  if kind == 'read-only':  # simulated: tests run as root, for whom chmod does not bite
    readonly = str(tmp_path / 'ro')
    os.mkdir(readonly)
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: p != readonly and real_access(p, mode))
    out, part = os.path.join(readonly, 'sub', 'enc.safetensors'), 'is not writable'
  elif kind == 'hub onto a file':
    out, fmt, part = str(blocker), 'hub', 'writes a folder'
  with pytest.raises(errors.ConfigError) as e:
    export.export_checkpoint(str(tmp_path / 'no-run'), out, fmt=fmt)
  one_line_error(e, '--out', part)
  assert sorted(os.listdir(tmp_path)) == (['file', 'ro'] if kind == 'read-only' else ['file'])
