"""Fine-tuning in PyTorch: the timm model folder (`--format hub`) loads with `local-dir:` in a
process that never imports mimjax, its fine-tuning command is accepted by timm, and timm train.py
checkpoints import safely."""
import argparse
import errno
import json
import os
import random
import re
import runpy
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_config
from test_export import images, make_config, random_params, trained_workdir  # noqa: F401
from mimjax import errors
from mimjax import export
from mimjax import registry
from mimjax.interop import hub
from mimjax.interop import timm as timm_lib
from mimjax.interop import torch_files

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# timm's train.py is in its repository, not in the pip package: its parser is read from there.
TIMM_TRAIN_PY = os.environ.get('TIMM_TRAIN_PY', '')

# Runs with cwd outside the checkout and no PYTHONPATH: mimjax cannot be imported there.
_PLAIN_TIMM = r'''
import json, sys
import numpy as np, timm, torch
model = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval()
x = torch.from_numpy(np.load(sys.argv[2])).permute(0, 3, 1, 2)
with torch.no_grad():
  np.save(sys.argv[3], model.forward_features(x).numpy())
cfg = timm.data.resolve_data_config({}, model=model)
assert not any(m.startswith('mimjax') for m in sys.modules)
print(json.dumps(dict(cfg, num_classes=model.num_classes, label_names=model.pretrained_cfg.get(
    'label_names'))))
'''


def _plain_timm(folder, x, tmp_path):
  """(features, data config) of the folder computed by timm in a process without mimjax."""
  np.save(tmp_path / 'x.npy', x)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run([sys.executable, '-c', _PLAIN_TIMM, str(folder), str(tmp_path / 'x.npy'),
                        str(tmp_path / 'y.npy')], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return np.load(tmp_path / 'y.npy'), json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize('variant', [('mu/4', 16, True, 'tok', 'sincos2d', 0.0, 0),
                                     ('mu/8', 24, False, 'gap', 'learn', 0.1, 10)])
def test_hub_folder_loads_in_plain_timm_with_its_transform(tmp_path, variant):
  config = make_config(*variant)
  config.data.eval_crop_fraction = 0.875
  params = random_params(config)
  folder = tmp_path / 'hub'
  umask = os.umask(0o022)
  try:
    hub_config, _ = export.export_params(config, params, str(folder), 'hub',
                                         dict(workdir=str(tmp_path / 'my_run'), step=7))
  finally:
    os.umask(umask)
  assert sorted(os.listdir(folder)) == ['README.md', 'config.json', hub.COMMAND_FILE,
                                        'model.safetensors']
  assert all(os.stat(folder / n).st_mode & 0o777 == 0o644 for n in os.listdir(folder))
  assert hub_config['verified'] < 1e-5
  for name in os.listdir(folder):  # nothing of this machine would be published with the folder
    assert str(tmp_path) not in (folder / name).read_bytes().decode('latin-1'), name
  # a 32-wide model is not named as timm's 768-wide base; timm's tiny is its smallest ViT
  assert hub_config['architecture'] == 'vit_tiny_patch16_224'
  x = images(config)
  features, data_config = _plain_timm(folder, x, tmp_path)
  np.testing.assert_allclose(features, export.forward_features(config, params, x), atol=1e-4,
                             rtol=0)
  size = variant[1]
  assert data_config['input_size'] == [3, size, size] and data_config['crop_pct'] == 0.875
  assert data_config['mean'] == [0.286] * 3 and data_config['std'] == [0.353] * 3
  assert data_config['interpolation'] == 'bicubic' and data_config['crop_mode'] == 'center'
  assert data_config['num_classes'] == variant[6]
  if variant[6] == 10:  # Fashion-MNIST's classes, from its TFDS metadata
    assert data_config['label_names'][:2] == ['T-shirt/top', 'Trouser']
  card = (folder / 'README.md').read_text()
  assert card.startswith('---\nlibrary_name: timm\n') and 'python train.py' in card
  assert 'run `my_run`' in card and 'v1.0.31/train.py' in card and '--device cpu' in card


def _recipe(command):
  """{'--flag': [values]} of a printed `python train.py ...` command."""
  out, key = {}, None
  for a in shlex.split(command)[2:]:
    if a.startswith('-'):
      key = a
      out[key] = []
    else:
      out[key].append(a)
  return out


def _printed_command(tmp_path):
  """(folder, parsed command) of the hub export of a small ViT, as the CLI prints it."""
  config = make_config('mu/4', 16, True, 'tok', 'sincos2d', 0.0, 0)
  folder = tmp_path / 'hub'
  _, command = export.export_params(config, random_params(config), str(folder), 'hub',
                                    dict(step=1))
  return folder, _recipe(command)


def _train_transform(model, r):
  """timm's training transform with the printed command's augmentation settings."""
  return timm.data.create_transform(
      **timm.data.resolve_data_config({}, model=model), is_training=True,
      auto_augment=r['--aa'][0], re_prob=float(r['--reprob'][0]), re_mode=r['--remode'][0])


def test_finetune_command_runs_through_timm_training_api(tmp_path):
  """Two steps of timm's own training pieces, configured with the printed command's values."""
  import timm.loss, timm.optim, timm.scheduler  # noqa: E401  pylint: disable=g-import-not-at-top
  folder, r = _printed_command(tmp_path)
  assert r['--model'] == [f'local-dir:{folder}'] and r['--num-classes'] == ['10']
  num = int(r['--num-classes'][0])
  model = timm.create_model(r['--model'][0], pretrained=True, num_classes=num,
                            drop_path_rate=float(r['--drop-path'][0]), global_pool=r['--gp'][0])
  batch = int(r['-b'][0])
  optimizer = timm.optim.create_optimizer_v2(
      model, opt=r['--opt'][0], lr=float(r['--lr-base'][0]) * batch / int(r['--lr-base-size'][0]),
      weight_decay=float(r['--weight-decay'][0]), layer_decay=float(r['--layer-decay'][0]),
      betas=tuple(map(float, r['--opt-betas'])))
  scheduler, epochs = timm.scheduler.create_scheduler_v2(
      optimizer, sched=r['--sched'][0], num_epochs=int(r['--epochs'][0]),
      warmup_epochs=int(r['--warmup-epochs'][0]), min_lr=float(r['--min-lr'][0]))
  assert epochs == 100
  transform = _train_transform(model, r)
  mixup = timm.data.Mixup(mixup_alpha=float(r['--mixup'][0]), cutmix_alpha=float(r['--cutmix'][0]),
                          label_smoothing=float(r['--smoothing'][0]), num_classes=num)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  pics = [Image.fromarray(rng.randint(0, 255, (20, 20, 3), np.uint8)) for _ in range(4)]
  before = model.patch_embed.proj.weight.detach().clone()
  for epoch in range(2):
    x, y = mixup(torch.stack([transform(p) for p in pics]), torch.arange(4))
    loss = timm.loss.SoftTargetCrossEntropy()(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step(epoch + 1)
    assert torch.isfinite(loss)
  assert x.shape == (4, 3, 16, 16)
  assert not torch.equal(before, model.patch_embed.proj.weight)


def _first_failure(transform, image, n):
  """Index of the first of n draws (Python's, NumPy's and torch's global generators seeded 0:
  timm's RandAugment draws its magnitudes from the first and its ops from the second) where
  `transform(image)` raises ValueError, or None."""
  random.seed(0)
  np.random.seed(0)
  torch.manual_seed(0)
  for i in range(n):
    try:
      transform(image)
    except ValueError as e:
      assert 'bits must be between' in str(e)  # Pillow 13's refusal of timm's 0-bit posterize
      return i
  return None


def test_printed_augmentation_survives_20000_images_where_the_old_one_crashes(tmp_path):
  """The printed `--aa` through timm's whole training transform (crop, flip, RandAugment,
  normalise, erasing) on 20,000 draws, as one epoch of train.py would: the same transform with
  the command before the magnitude cap (`rand-m9-mstd0.5-inc1`) dies on the same draws, within
  a few hundred (about 1 image in 600 with timm 1.0.31 and Pillow 13)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder, r = _printed_command(tmp_path)
  model = timm.create_model(r['--model'][0], pretrained=True)
  image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (16, 16, 3), np.uint8))
  old = dict(r, **{'--aa': ['rand-m9-mstd0.5-inc1']})
  assert _first_failure(_train_transform(model, old), image, 2000) is not None
  assert _first_failure(_train_transform(model, r), image, 20_000) is None


@pytest.mark.slow  # trains for 2 steps first
def test_cli_hub_export_and_command_accepted_by_timm_train_parser(trained_workdir, tmp_path):  # noqa: F811
  folder = tmp_path / 'hub'
  result = subprocess.run([sys.executable, '-m', 'mimjax.export', '--workdir', trained_workdir,
                           '--format', 'hub', '--out', str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  command = [line for line in result.stdout.splitlines() if line.startswith('python train.py ')]
  assert len(command) == 1 and 'Checked: ' in result.stdout
  command = command[0]
  in_folder = (folder / hub.COMMAND_FILE).read_text().splitlines()[-1]  # names the folder "$HERE"
  assert in_folder.replace('"local-dir:$HERE"', shlex.quote(f'local-dir:{folder}')) == command
  assert '--num-classes 10' in command  # Fashion-MNIST's labels
  config, params, _ = export.load_encoder(trained_workdir)
  x = images(config)
  features, _ = _plain_timm(folder, x, tmp_path)
  np.testing.assert_allclose(features, export.forward_features(config, params, x), atol=1e-4,
                             rtol=0)
  if not os.path.exists(TIMM_TRAIN_PY):
    pytest.skip(f'timm train.py not at {TIMM_TRAIN_PY} (set TIMM_TRAIN_PY)')
  parser = runpy.run_path(TIMM_TRAIN_PY, run_name='timm_train')['parser']
  args = parser.parse_args(shlex.split(command)[2:] + ['--device', 'cpu'])
  assert args.model == f'local-dir:{folder}' and args.pretrained and args.num_classes == 10
  assert (args.opt, args.opt_betas, args.lr_base, args.layer_decay) == ('adamw', [0.9, 0.999],
                                                                        5e-4, 0.65)
  assert (args.mixup, args.cutmix, args.smoothing, args.reprob) == (0.8, 1.0, 0.1, 0.25)


def test_timm_train_checkpoint_imports_and_code_in_a_pickle_is_refused(tmp_path):
  """A checkpoint written by timm's own CheckpointSaver (state_dict, args, optimizer) imports."""
  import timm.optim, timm.utils  # noqa: E401  pylint: disable=g-import-not-at-top
  model = timm.create_model('vit_base_patch16_224', img_size=16, patch_size=4, embed_dim=32,
                            depth=1, num_heads=2, num_classes=10)
  optimizer = timm.optim.create_optimizer_v2(model, opt='adamw', lr=1e-3)
  model(torch.randn(2, 3, 16, 16)).sum().backward()
  optimizer.step()
  args = argparse.Namespace(model='local-dir:x', opt_betas=[0.9, 0.999], model_kwargs={})
  saver = timm.utils.CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path),
                                     recovery_dir=str(tmp_path), max_history=1)
  saver.save_checkpoint(0, metric=1.0)
  path = str(tmp_path / 'model_best.pth.tar')
  params, arch, model_values = timm_lib.import_timm(path)
  assert arch.num_classes == 10 and model_values['variant'] == 'mu/4'
  np.testing.assert_array_equal(params['head']['kernel'], model.head.weight.detach().numpy().T)

  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {tmp_path}/ran',))
  torch.save({'state_dict': model.state_dict(), 'args': Payload()}, tmp_path / 'evil.pth.tar')
  with pytest.raises(errors.InteropError, match='posix.system'):
    torch_files.read_state_dict(str(tmp_path / 'evil.pth.tar'))
  assert not os.path.exists(tmp_path / 'ran')


def test_dtm_backbone_hub_folder_is_a_timm_beit_with_the_same_tokens(tmp_path):
  """configs/distill.py:dtm's backbone (rel-pos per block and shared, no absolute table, layer
  scale), fresh random weights with non-zero tables: the folder loads with `local-dir:` in plain
  timm and gives the JAX tokens to 1e-4 relative."""
  config = load_config('configs/distill.py:runlocal,dtm')
  assert (config.model.rel_pos, config.model.posemb) == ('both', 'none') and config.model.layerscale
  params = random_params(config)
  tables = [params['Transformer']['rel_pos_bias']['relative_position_bias_table']] + [
      params['Transformer'][f'encoderblock_{i}']['rel_pos_bias']['relative_position_bias_table']
      for i in range(4)]
  assert all(np.all(np.asarray(t) != 0) for t in tables)
  folder = tmp_path / 'dtm'
  hub_config, _ = export.export_params(config, params, str(folder), 'hub', dict(step=1))
  assert hub_config['architecture'].startswith('beit_')
  x = images(config)
  features, _ = _plain_timm(folder, x, tmp_path)
  ours = export.forward_features(config, params, x)
  assert np.max(np.abs(features - ours)) <= 1e-4 * np.max(np.abs(ours))


@pytest.mark.parametrize('variant,beit,name', [
    ('S/16', False, 'vit_small_patch16_224'), ('H/14', False, 'vit_huge_patch14_224'),
    ('B/16', True, 'beit_base_patch16_224'), ('L/16', True, 'beit_large_patch16_224'),
    ('pico/4', False, 'vit_tiny_patch16_224'), ('M/16', True, 'beit_base_patch16_224')])
def test_config_json_names_timms_model_of_that_size(variant, beit, name):
  """config.json's `architecture` is timm's registered model of the same dimensions where timm has
  one (checked against timm's own default arguments), else the smallest of the class."""
  config = make_config(variant, 224, True, 'tok', 'sincos2d', 0.0, 0)
  assert hub.architecture(config, beit) == name and timm.is_model(name)
  kw = export.vit.parse_variant(variant)
  with torch.device('meta'):  # the architecture without allocating H/14's weights
    model = timm.create_model(name, pretrained=False)
  same = (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads,
          model.patch_embed.patch_size[0]) == (kw['width'], kw['depth'], kw['num_heads'],
                                               kw['patch_size'])
  assert same == (variant.partition('/')[0] not in ('pico', 'M'))


def test_hub_export_without_a_timm_architecture_is_refused_and_writes_nothing(tmp_path):
  """timm's Beit always has a cls token: a rel-pos encoder without one has no timm class."""
  config = make_config('mu/4', 16, False, 'gap', 'sincos2d', 0.0, 0)
  with config.unlocked():
    config.model.rel_pos, config.model.posemb = 'block', 'none'
  with pytest.raises(errors.InteropError, match='cls token'):
    export.export_params(config, random_params(config), str(tmp_path / 'hub'), 'hub')
  assert os.listdir(tmp_path) == []


def test_an_export_that_timm_reads_differently_is_deleted(tmp_path, monkeypatch):
  """The self-check: weights written wrong (here one block's qkv bias dropped to zero) make timm
  compute something else, so the export fails with the difference and leaves nothing behind."""
  config = make_config('mu/4', 16, True, 'tok', 'sincos2d', 0.0, 0)
  params = random_params(config)
  to_timm = timm_lib.to_timm

  def broken(*args):
    sd = to_timm(*args)
    sd['blocks.0.attn.qkv.bias'] = np.zeros_like(sd['blocks.0.attn.qkv.bias'])
    return sd
  monkeypatch.setattr(timm_lib, 'to_timm', broken)
  for fmt, out in (('safetensors', tmp_path / 'e.safetensors'), ('hub', tmp_path / 'folder')):
    with pytest.raises(errors.InteropError, match='does not compute what the JAX encoder'):
      export.export_params(config, params, str(out), fmt)
    assert sorted(os.listdir(tmp_path)) == [], fmt


_TF_FIRST = r'''
import sys
if sys.argv[2] == 'train-first':  # mimjax.train's order: TensorFlow (its data pipeline) at import,
  from mimjax import train  # noqa: F401  then config.init.checkpoint read with torch.load alone,
  from mimjax.interop import torch_files  # which, unlike torch._dynamo, is safe after TensorFlow
  assert 'tensorflow' in sys.modules and 'torch' not in sys.modules
  assert sorted(torch_files.read_state_dict(sys.argv[3])) == ['w']
import jax, numpy as np
from configs import mae
from mimjax import errors, export
config = mae.get_config('runlocal')
config.model.variant, config.data.image_size = 'mu/4', 16
params = export.build_encoder(config).init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))
try:
  export.export_params(config, params['params'], sys.argv[1], 'hub')
except errors.InteropError as e:
  print('refused:', e)
  sys.exit(3)
import torch
from mimjax.data import pipeline  # TensorFlow, loaded after the export as a training run would
assert 'tensorflow' in sys.modules
torch.optim.AdamW([torch.zeros(2, requires_grad=True)]).step()
print('ok')
'''


@pytest.mark.parametrize('order', ['export-first', 'train-first'])
def test_entry_points_are_safe_next_to_tensorflow(tmp_path, order):
  """TensorFlow loaded before torch._dynamo segfaults torch (rc 139 on `import tensorflow, torch;
  torch.optim.AdamW(...)`). An export, which loads both, must leave torch usable after the data
  pipeline loads TensorFlow; the trainer (TensorFlow first) reads torch checkpoints; and an export
  called after TensorFlow was loaded refuses with the reason instead of crashing."""
  checkpoint = tmp_path / 'model_best.pth.tar'
  torch.save({'state_dict': {'w': torch.ones(2)}, 'args': argparse.Namespace(model='x')},
             checkpoint)
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-c', _TF_FIRST, str(tmp_path / 'hub'), order,
                        str(checkpoint)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  if order == 'train-first':
    assert out.returncode == 3 and 'TensorFlow was loaded in this process before' in out.stdout
    assert not os.path.exists(tmp_path / 'hub')
  else:
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == 'ok', out.stderr[-2000:]


def test_colab_notebook_never_loads_torch_next_to_its_tensorflow():
  """The notebook trains (TensorFlow) in its own kernel; nothing in it may load torch or timm
  there (directly or through an in-process export), which would crash that kernel."""
  with open(os.path.join(REPO, 'launch', 'colab.ipynb')) as f:
    cells = json.load(f)['cells']
  code = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
  assert 'from mimjax import train' in code  # the check reads the cells that matter
  assert not re.search(r'\b(import|from)\s+(torch|timm|open_clip)\b|mimjax\.export|'
                       r'from mimjax import .*\bexport\b|mimjax\.interop', code)


def _args(args):
  """{flag: [values]} of a timm train.py argument list."""
  parsed, flag = {}, None
  for a in args:
    if a.startswith('-') and not a.lstrip('-').replace('.', '').isdigit():
      flag = a
      parsed[flag] = []
    else:
      parsed[flag].append(a)
  return parsed


@pytest.mark.parametrize('recipe,expected', [
    ('configs/mae.py:runlocal', {'--lr-base': '0.0005', '--lr-base-size': '256', '-b': '128',
                                 '--layer-decay': '0.65', '--warmup-epochs': '5',
                                 '--warmup-lr': '0.0'}),
    ('configs/mae_lut.py:runlocal', {'--lr-base': '0.001', '--layer-decay': '0.75'}),
    ('configs/simmim.py:runlocal', {'--lr-base': '0.00125', '--lr-base-size': '512', '-b': '256',
                                    '--layer-decay': '0.65', '--warmup-epochs': '20',
                                    '--warmup-lr': '1e-06', '--clip-grad': '5.0'}),
    ('configs/distill.py:runlocal,teacher=ema,dtm', {'--lr-base': '0.0005',
                                                     '--lr-base-size': '1024',
                                                     '--warmup-epochs': '10'})])
def test_the_finetune_command_is_the_recipe_of_the_runs_method(recipe, expected):
  """Each method's exported command carries its own recipe (the one its framework names, as the
  export asks it), not MAE's for all; gradient clipping only where the recipe clips."""
  config = load_config(recipe)
  args = _args(hub.finetune_args(config, None, _method_recipe(config)))
  assert {k: args[k][0] for k in expected} == expected
  assert ('--clip-grad' in args) == ('--clip-grad' in expected)


def _method_recipe(config):
  """The fine-tuning recipe the export writes for a run of `config`."""
  return registry.FRAMEWORKS[config.framework].finetune_recipe(config)


def test_the_folder_names_its_recipe(tmp_path):
  config = make_config('mu/4', 16, True, 'tok', 'sincos2d', 0.0, 0)
  with config.unlocked():
    config.lut.enabled = True
  hub.export_hub(config, random_params(config), str(tmp_path / 'hub'), {}, _method_recipe(config))
  script = (tmp_path / 'hub' / hub.COMMAND_FILE).read_text()
  assert 'with the mae_lut recipe' in script and '--lr-base 0.001 ' in script
  assert 'the `mae_lut` fine-tuning' in (tmp_path / 'hub' / 'README.md').read_text()


def test_a_hub_export_that_fails_midway_leaves_nothing_and_keeps_the_earlier_one(tmp_path,
                                                                                 monkeypatch):
  """A full disk while the model card (the last file) is written: no folder, no temporary folder,
  no parent folder made for it; an earlier complete export at the same --out stays as it was."""
  config = make_config('mu/4', 16, True, 'tok', 'sincos2d', 0.0, 0)
  params = random_params(config)
  card = hub._model_card  # pylint: disable=protected-access

  def full_disk(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(hub, '_model_card', full_disk)
  out = tmp_path / 'new' / 'hub'
  with pytest.raises(OSError, match='No space left'):
    export.export_params(config, params, str(out), 'hub')
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(hub, '_model_card', card)
  export.export_params(config, params, str(out), 'hub')
  assert os.listdir(out.parent) == ['hub'] and sorted(os.listdir(out)) == sorted(hub.FILES)
  before = {name: (out / name).read_bytes() for name in hub.FILES}
  monkeypatch.setattr(hub, '_model_card', full_disk)
  with pytest.raises(OSError, match='No space left'):
    export.export_params(config, random_params(config, seed=1), str(out), 'hub')
  assert os.listdir(out.parent) == ['hub']
  assert {name: (out / name).read_bytes() for name in hub.FILES} == before


def _folder(path):
  """{name: text} of a folder's files."""
  import os  # pylint: disable=g-import-not-at-top
  return {n: open(os.path.join(path, n)).read() for n in sorted(os.listdir(path))}


def test_a_hub_export_over_an_earlier_one_is_swapped_whole(tmp_path, monkeypatch):
  import os  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'hub'
  out.mkdir()
  earlier = {'config.json': 'old', 'model.safetensors': 'old', 'notes.txt': 'mine'}
  for name, text in earlier.items():
    (out / name).write_text(text)

  def export_new(staging):
    for name in ('config.json', 'model.safetensors'):
      with open(os.path.join(staging, name), 'w') as f:
        f.write('new')

  real_rename, real_replace = os.rename, os.replace
  calls = []

  def failing_rename(src, dst):
    calls.append(src)
    if len(calls) == 3:  # staging -> out, after out -> .old
      raise OSError(28, 'No space left on device')
    return real_rename(src, dst)

  monkeypatch.setattr(os, 'rename', failing_rename)
  with pytest.raises(OSError):
    with export.staged_folder(str(out), ('config.json', 'model.safetensors')) as staging:
      export_new(staging)
  assert _folder(out) == earlier and os.listdir(tmp_path) == ['hub']  # the earlier one intact
  monkeypatch.setattr(os, 'rename', real_rename)
  monkeypatch.setattr(os, 'replace', lambda *a: (_ for _ in ()).throw(OSError(5, 'I/O error')))
  with pytest.raises(OSError, match='not moved back are in'):
    with export.staged_folder(str(out), ('config.json', 'model.safetensors')) as staging:
      export_new(staging)
  assert _folder(out) == {'config.json': 'new', 'model.safetensors': 'new'}  # the new one whole
  old = [n for n in os.listdir(tmp_path) if n.endswith('.old')]
  assert len(old) == 1 and _folder(tmp_path / old[0])['notes.txt'] == 'mine'
  monkeypatch.setattr(os, 'replace', real_replace)
  (tmp_path / old[0] / 'notes.txt').rename(out / 'notes.txt')
  with export.staged_folder(str(out), ('config.json', 'model.safetensors')) as staging:
    for name in ('config.json', 'model.safetensors'):
      (tmp_path / os.path.basename(staging) / name).write_text('newer')
  assert _folder(out) == {'config.json': 'newer', 'model.safetensors': 'newer', 'notes.txt': 'mine'}
  assert sorted(os.listdir(tmp_path)) == sorted(['hub', old[0]])
