"""Watching pre-training (issue 20, item 3): the online kNN monitor, held-out reconstruction grids,
evaluation results kept per options and step, and Weights & Biases tracking in offline mode."""
import glob
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT, config_flags, load_config, tiny_overrides
from mimjax import checkpoint
from mimjax import errors
from mimjax import evaluate
from mimjax import sharding
from mimjax import train
from mimjax import validation
from mimjax import visualize
from mimjax.data import fit
from mimjax.data import pipeline
from mimjax.eval import features as features_lib
from mimjax.eval import loading
from mimjax.eval import monitor

HAS_WANDB = importlib.util.find_spec('wandb') is not None
BANK, QUERIES, K = 256, 128, 5
# A tiny MAE (norm_pix_loss, as the recipe) evaluated by the kNN monitor at steps 3 and 6.
WATCHED = tiny_overrides(**{
    'mae.decoder_width': 32, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2,
    'eval.every_steps': 3, 'eval.knn_monitor.bank_examples': BANK,
    'eval.knn_monitor.query_examples': QUERIES, 'eval.knn_monitor.k': K,
    'log.images_every_steps': 6})


@pytest.fixture(scope='module')
def watched(tmp_path_factory):
  """A trained workdir (W&B on, offline, when wandb is installed)."""
  workdir = str(tmp_path_factory.mktemp('watched'))
  config = load_config('configs/mae.py:runlocal', **WATCHED, **{'log.wandb': HAS_WANDB})
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('WANDB_MODE', 'offline')
    mp.setenv('WANDB_SILENT', 'true')
    train.train(config, workdir)
  return workdir


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _reference_knn_top1(bank_x, bank_y, query_x, query_y, k, temperature, num_classes=10):
  """DINO's weighted kNN written out in float64 numpy: cosine similarity, the k most similar bank
  images vote exp(sim / T) for their class."""
  bank = bank_x / np.linalg.norm(bank_x, axis=1, keepdims=True)
  query = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
  sims = query.astype(np.float64) @ bank.astype(np.float64).T
  votes = np.zeros((len(query), num_classes))
  for i, row in enumerate(sims):
    nearest = np.argsort(-row)[:k]
    np.add.at(votes[i], bank_y[nearest], np.exp(row[nearest] / temperature))
  return float(np.mean(votes.argmax(axis=1) == query_y))


def _reference_for_checkpoint(workdir, step):
  """kNN top-1 of the checkpoint's encoder: the first BANK train and QUERIES test images."""
  run = loading.load_run(workdir, step)
  bank_x, bank_y = features_lib.extract(run, run.config.data.train_split, 'pooled')
  query_x, query_y = features_lib.extract(run, run.config.data.eval_split, 'pooled')
  return _reference_knn_top1(bank_x[:BANK], bank_y[:BANK], query_x[:QUERIES], query_y[:QUERIES],
                             K, run.config.eval.knn_temperature)


def test_knn_monitor_logs_the_knn_of_the_held_out_subset(watched):
  records = _records(watched)
  assert [r['step'] for r in records if 'eval_knn_top1' in r] == [3, 6]
  logged = {r['step']: r['eval_knn_top1'] for r in records if 'eval_knn_top1' in r}
  # Float32 on device against float64 here: a near-tie may flip one query at most.
  assert logged[6] == pytest.approx(_reference_for_checkpoint(watched, 6), abs=1 / QUERIES + 1e-9)
  with open(os.path.join(watched, 'eval_mae.json')) as f:
    history = json.load(f)
  assert [r['step'] for r in history['history']] == [3, 6]
  assert history['final']['knn_top1'] == logged[6]
  assert history['best']['knn_top1'] == max(logged.values())


def test_knn_monitor_compiles_once_and_repeats_the_logged_values(watched):
  config = load_config('configs/mae.py:runlocal', **WATCHED)
  knn_monitor = monitor.KnnMonitor(config, sharding.make_mesh(config.mesh))
  logged = {r['step']: r['eval_knn_top1'] for r in _records(watched) if 'eval_knn_top1' in r}
  for step in (3, 6):
    params, _ = checkpoint.restore(watched, step)
    assert knn_monitor(_State(params)) == {'knn_top1': logged[step]}
  # One compilation of each function for both evaluations (static shapes, fixed batch count).
  assert knn_monitor._embed._cache_size() == 1 and knn_monitor._hits._cache_size() == 1


class _State:
  """The part of a train state the monitor reads."""

  def __init__(self, params):
    self.params = params


def test_reconstruction_grid_shows_held_out_images(watched):
  """The PNG at step 6 is MAE's grid of the first 8 test images (never trained on)."""
  run = loading.load_run(watched, 6)
  batch = next(pipeline.eval_batches(run.config, run.config.data.eval_split, 8))
  batch = {k: v for k, v in batch.items() if k != 'valid'}
  forward = lambda p, s, b: run.framework.forward(p, s, b, jax.random.PRNGKey(0), False)[2]
  outputs = jax.jit(forward)(run.params, run.model_state, batch)
  expected = run.framework.visualize(jax.device_get(outputs), batch)['reconstruction_norm_pix']
  with Image.open(os.path.join(watched, 'images', 'reconstruction_norm_pix_0000006.png')) as png:
    np.testing.assert_array_equal(np.asarray(png), expected)


def test_norm_pix_grid_shows_the_prediction_in_standardised_space():
  """One 4x4 grayscale image, 2x2 patches; patch 0 visible, patches 1-3 masked."""
  data = type('Data', (), {'mean': (0.0,), 'std': (1.0,)})()
  image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 16
  mask = np.array([[False, True, True, True]])
  # Patch 0 holds pixels (0, 1, 4, 5) / 16: mean 2.5 / 16, unbiased variance 17 / 3 / 256 (MAE's
  # torch .var()), so its standardised values are (x - 2.5) / sqrt(17 / 3) (+ MAE's eps 1e-6).
  std = np.sqrt(17 / 3 / 256 + 1e-6) * 16
  patch0 = (np.array([0, 1, 4, 5]) - 2.5) / std
  shown0 = np.round(np.clip(patch0 / 4 + 0.5, 0, 1) * 255)  # 0 -> mid-grey, +-2 std -> white/black
  # Every patch of this ramp is the same ramp shifted, so every standardised patch equals patch 0.
  pred = np.zeros((1, 4, 4), np.float32)  # predicts each masked patch's own mean
  grid = visualize.norm_pix_reconstruction_grid(image, pred, mask, 2, data)
  target, predicted = _tile(grid, 2), _tile(grid, 3)
  np.testing.assert_array_equal(target[:2, :2].ravel(), shown0)
  np.testing.assert_array_equal(target[2:, 2:].ravel(), shown0)
  np.testing.assert_array_equal(predicted[:2, :2], target[:2, :2])  # visible: pasted target
  assert (predicted[:2, 2:] == 128).all() and (predicted[2:] == 128).all()  # zeros: mid-grey
  # A perfect prediction in standardised space shows as the target, whatever the patch's own
  # brightness and contrast (which the model never predicts).
  perfect = np.tile(patch0.astype(np.float32), (1, 4, 1))
  grid = visualize.norm_pix_reconstruction_grid(image, perfect, mask, 2, data)
  np.testing.assert_array_equal(_tile(grid, 3), _tile(grid, 2))


def _tile(grid, column, size=4, scale=24, pad=2):
  """The [size, size] grey values of one image of a one-row titled grid (tiles enlarged `scale`
  times to at least 96 px, `pad` px apart)."""
  x, y = pad + column * (size * scale + pad), visualize.TITLE_HEIGHT + pad
  return grid[y:y + size * scale:scale, x:x + size * scale:scale, 0]


def test_monitor_settings_and_data_are_checked_before_anything_is_written(tmp_path):
  config = load_config('configs/simmim.py:runlocal', **tiny_overrides(**{
      'eval.every_steps': 3, 'eval.knn_monitor.bank_examples': 4, 'eval.knn_monitor.k': 5}))
  with pytest.raises(errors.ConfigError, match='knn_monitor.k=5 .* bank_examples=4'):
    validation.validate(config)
  config = load_config('configs/mae.py:runlocal', **WATCHED)
  with config.unlocked():
    config.eval.knn_monitor.query_examples = 257  # 'test[:256]' holds 256: lowered, not refused
  assert fit.fit(config, knn_monitor=True) == ['eval.knn_monitor.query_examples 257 -> 256']
  folder = tmp_path / 'flat'
  folder.mkdir()
  for i in range(6):
    Image.fromarray(np.full((28, 28, 3), 40 * i, np.uint8)).save(folder / f'{i}.png')
  config = load_config('configs/mae.py:runlocal', **{
      **WATCHED, 'data.name': str(folder), 'data.train_split': 'train', 'data.eval_split': 'val',
      'data.folder_holdout': 0.5, 'eval.knn_monitor.bank_examples': 1,
      'eval.knn_monitor.query_examples': 1, 'eval.knn_monitor.k': 1})
  with pytest.raises(errors.DatasetError, match='no class labels.*eval.every_steps=0'):
    train.train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_evaluate_keeps_every_result_keyed_by_options_and_step(watched, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(watched, workdir)
  # A file written before results were kept (one result) stays, as the first entry.
  with open(os.path.join(workdir, 'eval_knn.json'), 'w') as f:
    json.dump({'protocol': 'knn', 'step': 3, 'top1': 0.5}, f)
  gap = evaluate.evaluate(workdir, 'knn', feature='gap', k=[5])
  cls = evaluate.evaluate(workdir, 'knn', feature='cls', k=[5])
  early = evaluate.evaluate(workdir, 'knn', step=3, feature='gap', k=[5])
  again = evaluate.evaluate(workdir, 'knn', feature='gap', k=[5])  # replaces its own entry only
  entries = evaluate.read_results(workdir, 'knn')
  assert [(e['options'], e['step']) for e in entries] == [
      ({}, 3), ({'feature': 'cls', 'k': [5]}, 6), ({'feature': 'gap', 'k': [5]}, 3),
      ({'feature': 'gap', 'k': [5]}, 6)]
  assert entries[0]['top1'] == 0.5
  assert [e['top1'] for e in entries[1:]] == [cls['top1'], early['top1'], again['top1']]
  assert again['top1'] == gap['top1'] and cls['feature'] == 'cls'


def _wandb_records(path):
  """The protobuf records of a W&B .wandb file: the ':W&B' header (7 bytes), then LevelDB log
  records (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
  blocks."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  pos, block, parts = 7, 32768, b''
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    length, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
    parts += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      parts = b''
      yield record


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install '.[wandb]')")
def test_wandb_offline_run_holds_the_logged_metrics_and_pictures(watched):
  (path,) = glob.glob(os.path.join(watched, 'wandb', 'offline-run-*', 'run-*.wandb'))
  history = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json)
              for item in r.history.item}
             for r in _wandb_records(path) if r.WhichOneof('record_type') == 'history']
  for logged, record in zip(history, _records(watched), strict=True):
    assert logged['_step'] == record['step']
    for key, value in record.items():
      if key != 'step':
        assert logged[key] == pytest.approx(value, rel=1e-12)
  assert history[-1]['reconstruction_norm_pix/_type'] == 'image-file'
  config = load_config('configs/mae.py:runlocal', **{'log.wandb': True})
  assert validation.validate(config) is None  # installed: accepted


def test_wandb_missing_is_refused_with_the_extra_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'wandb' else real(name, *a))
  config = load_config('configs/mae.py:runlocal', **{'log.wandb': True})
  with pytest.raises(errors.ConfigError, match=r"pip install 'mimjax\[wandb\]'"):
    validation.validate(config)


@pytest.mark.slow  # a training and two evaluations as subprocesses on 2 simulated devices: ~2 min
def test_user_watches_mae_runlocal_on_two_devices(tmp_path):
  """The README's commands: train with the monitor on, then two kNN evaluations that both stay."""
  workdir = tmp_path / 'mae'
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  overrides = {k: v for k, v in WATCHED.items() if k != 'log.images_every_steps'}
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=tmp_path, env=env,  # noqa
                                     capture_output=True, text=True, timeout=900)
  trained = run('mimjax.train', '--config', 'mae:runlocal', *config_flags(overrides),
                f'--workdir={workdir}')
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'devices: 2 x cpu' in trained.stdout
  records = _records(workdir)
  console = [line for line in trained.stdout.splitlines() if 'eval_knn_top1' in line]
  assert len(console) == 2 and f"eval_knn_top1 {records[-1]['eval_knn_top1']:.4f}" in console[1]
  assert records[-1]['eval_knn_top1'] == pytest.approx(_reference_for_checkpoint(str(workdir), 6),
                                                       abs=1 / QUERIES + 1e-9)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = {v.tag for path in glob.glob(str(workdir / 'tensorboard' / '*'))
          for event in tf.compat.v1.train.summary_iterator(path) for v in event.summary.value}
  assert 'eval_knn_top1' in tags
  for feature in ('gap', 'cls'):
    done = run('mimjax.evaluate', f'--workdir={workdir}', '--protocol=knn', f'--feature={feature}')
    assert done.returncode == 0, done.stderr[-3000:]
  entries = evaluate.read_results(str(workdir), 'knn')
  assert [(e['options'], e['step']) for e in entries] == [
      ({'feature': 'gap'}, 6), ({'feature': 'cls'}, 6)]
