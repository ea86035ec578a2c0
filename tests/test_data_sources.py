"""Step-independent resume (TFDS and image folders) and image folders as a data source.

The folders are written here: one flat colour per class, so a batch's label can be checked
against its pixels, in every format the issue names (RGB/CMYK JPEG, RGBA/grayscale PNG) plus
files that must be skipped (garbage bytes with a .jpg name, a text file).
"""
import copy
import logging
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import load_config
from conftest import run_module
from conftest import tiny_overrides
from mimjax import errors
from mimjax import evaluate
from mimjax import recipe_lib
from mimjax import sharding
from mimjax import train
from mimjax import validation
from mimjax.data import augment
from mimjax.data import fit
from mimjax.data import pipeline
from mimjax.data import sources

CLASSES = {'ant': (220, 30, 30), 'bee': (30, 220, 30), 'cow': (30, 30, 220)}  # sorted: labels 0,1,2
FORMATS = [('RGB', 'JPEG'), ('CMYK', 'JPEG'), ('RGBA', 'PNG'), ('RGB', 'PNG')]


def _write(path, colour, mode, fmt, size):
  image = Image.new('RGB', size, colour).convert(mode)
  image.save(path, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))


def _write_class_folder(directory, per_class, rng):
  for name, colour in CLASSES.items():
    os.makedirs(directory / name)
    for i in range(per_class):
      mode, fmt = FORMATS[i % len(FORMATS)]
      size = (int(rng.integers(30, 60)), int(rng.integers(30, 60)))  # any size, any aspect
      _write(directory / name / f'{i}.{fmt.lower()}', colour, mode, fmt, size)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """root/train/<class>/ and root/val/<class>/, with two unreadable files and a grayscale PNG."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  _write_class_folder(root / 'train', 8, rng)
  _write_class_folder(root / 'val', 4, rng)
  (root / 'train' / 'ant' / 'broken.jpg').write_bytes(b'not an image at all')
  (root / 'train' / 'bee' / 'notes.txt').write_text('hello')
  Image.new('L', (40, 33), 128).save(root / 'val' / 'bee' / 'gray.png')
  return root


def _config(name, **overrides):
  return load_config('configs/mae.py:runlocal', **{
      'data.name': str(name), 'data.train_split': 'train', 'data.eval_split': 'val',
      'data.mean': (0.5, 0.5, 0.5), 'data.std': (0.5, 0.5, 0.5), 'data.cache': False,
      'batch_size': 8, **overrides})


def _pixels(batch):
  """The images' mean RGB in [0, 255] (undoing the mean/std 0.5 normalisation)."""
  return (batch['image'] * 0.5 + 0.5).mean(axis=(1, 2)) * 255


def test_folder_lists_labels_and_counts_unreadable_files(folder):
  sources._scan.cache_clear()  # pylint: disable=protected-access  # listed (and warned) once
  with pytest.warns(UserWarning, match='2 file.*not readable.*skipped'):
    split = sources.folder_split(str(folder), 'train', 0.02)
  assert split.class_names == ('ant', 'bee', 'cow')
  assert len(split.paths) == 24 and list(np.bincount(split.labels)) == [8, 8, 8]
  assert all(os.path.basename(os.path.dirname(p)) == split.class_names[label]
             for p, label in zip(split.paths, split.labels))


def test_folder_eval_batches_decode_every_format_with_the_right_label(folder):
  config = _config(folder)
  batches = list(pipeline.eval_batches(config, 'val', 8, 0, 1))
  images = np.concatenate([_pixels(b)[b['valid']] for b in batches])
  labels = np.concatenate([b['label'][b['valid']] for b in batches])
  assert len(labels) == 13  # 12 coloured images and the grayscale one
  colours = np.array(list(CLASSES.values()), np.float32)
  for rgb, label in zip(images, labels):
    if np.ptp(rgb) < 1:  # the grayscale PNG: 128 replicated to three channels, in class bee
      assert label == 1 and abs(rgb[0] - 128) < 1
    else:  # JPEG (also CMYK) round trips stay within a few levels of the class colour
      assert np.abs(rgb - colours[label]).max() < 8, (rgb, label)


def test_flat_folder_holds_out_a_fixed_fraction_without_labels(tmp_path):
  for i in range(40):
    _write(tmp_path / f'{i:02d}.jpg', (i * 6, 0, 0), 'RGB', 'JPEG', (32, 32))
  train_split = sources.folder_split(str(tmp_path), 'train', 0.25)
  held = sources.folder_split(str(tmp_path), 'val', 0.25)
  assert train_split.labels is None and train_split.class_names == ()
  assert not set(train_split.paths) & set(held.paths)
  assert len(train_split.paths) + len(held.paths) == 40 and 2 <= len(held.paths) <= 18
  batch = next(pipeline.train_batches(_config(tmp_path, **{'data.folder_holdout': 0.25}), 0, 0, 1))
  assert set(batch) == {'image'} and batch['image'].shape == (8, 28, 28, 3)


def _examples(config, position, count, batch_size):
  """`count` consecutive training examples from `position`, read in batches of `batch_size`."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.batch_size = batch_size
  stream = pipeline.train_batches(config, position, 0, 1)
  batches = [next(stream) for _ in range(-(-count // batch_size))]
  return {k: np.concatenate([b[k] for b in batches])[:count] for k in batches[0]}


@pytest.mark.parametrize('source', ['tfds', 'folder'])
def test_resumed_stream_equals_the_uninterrupted_one(source, folder):
  """Positions mid-epoch, on epoch boundaries and several epochs in; the resumed run also uses
  another batch size, since the position counts examples, not steps."""
  if source == 'tfds':
    config = load_config('configs/mae.py:runlocal', **{
        'data.train_split': 'train[:100]', 'data.shuffle_buffer': 50, 'data.cache': False})
    epoch = 100
  else:
    config, epoch = _config(folder), 24
  straight = _examples(config, 0, 5 * epoch + 8, 16)
  for position in (3, epoch, epoch + 7, 2 * epoch, 4 * epoch + 5):
    resumed = _examples(config, position, 8, 4)
    for key in straight:
      np.testing.assert_array_equal(resumed[key], straight[key][position:position + 8])
  # Every epoch is a permutation of the split, and consecutive epochs differ in order.
  first, second = straight['label'][:epoch], straight['label'][epoch:2 * epoch]
  np.testing.assert_array_equal(np.sort(first), np.sort(second))
  assert not np.array_equal(first, second)


class _CountingBuilder:
  """A TFDS builder whose records bump `counter` as they are read from storage."""

  def __init__(self, builder, counter):
    self._builder, self._counter = builder, counter

  def __getattr__(self, name):
    return getattr(self._builder, name)

  def as_dataset(self, **kwargs):
    def count(example):
      with tf.control_dependencies([self._counter.assign_add(1)]):
        return tf.nest.map_structure(tf.identity, example)
    return self._builder.as_dataset(**kwargs).map(count)


def test_records_read_to_resume_do_not_grow_with_the_step(monkeypatch):
  counter = tf.Variable(0, dtype=tf.int64)
  get_builder = sources.get_builder
  monkeypatch.setattr(sources, 'get_builder', lambda *a: _CountingBuilder(get_builder(*a), counter))
  config = load_config('configs/mae.py:runlocal', **{
      'data.train_split': 'train[:1000]', 'data.shuffle_buffer': 100, 'data.cache': False})
  source = pipeline._source(config, 'train[:1000]', 0, 1, seed=7)  # pylint: disable=protected-access
  reads = {}
  for position in (500, 500 + 3 * 1000, 500 + 1000 * 1000):  # the same offset in epochs 0, 3, 1000
    counter.assign(0)
    next(iter(pipeline._stream(source, position)))  # pylint: disable=protected-access
    reads[position] = int(counter.numpy())
  # A shuffle buffer of 100 must be full to emit, so the 501st record of an epoch needs 600 reads
  # (601 when tf.data has read one record ahead), in every epoch; skipping the whole stream, as
  # before, would read 1,000,500 at the last position.
  assert set(reads.values()) <= {600, 601}, reads


@pytest.mark.slow  # ~3 min on the 2 shared cores (compiling train, kNN and linear probe)
def test_training_and_knn_and_linear_evaluation_on_a_folder(folder, tmp_path):
  config = load_config('configs/mae.py:runlocal', **tiny_overrides(**{
      'data.name': str(folder), 'data.train_split': 'train', 'data.eval_split': 'val',
      'data.cache': False, 'batch_size': 8, 'total_steps': 3, 'eval.batch_size': 8,
      'mae.decoder_width': 32, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2,
      'eval.linear.batch_size': 8, 'eval.linear.train_split': 'train[:16]',
      'eval.linear.holdout_split': 'train[16:]'}))
  workdir = str(tmp_path / 'run')
  final = train.train(config, workdir)
  assert final['step'] == 3 and np.isfinite(final['loss'])
  with open(os.path.join(workdir, sources.LABELS_FILE)) as f:
    assert f.read().split() == ['ant', 'bee', 'cow']
  for protocol in ('knn', 'linear'):
    assert 0.0 <= evaluate.evaluate(workdir, protocol)['top1'] <= 1.0


def test_fused_jpeg_crop_equals_decoding_then_cropping(tmp_path):
  """random-resized-crop on still-encoded JPEG bytes decodes only the window, yet gives the same
  pixels as decoding the whole image first (the box depends only on the shape and the seed).

  Exact for 4:4:4 JPEGs, as here; with subsampled (4:2:0) chroma, libjpeg's upsampling lacks the
  neighbours outside the window, so the window's border pixels differ slightly in colour.
  """
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(tmp_path / 'x.jpg',
                                                                          quality=90, subsampling=0)
  data = tf.io.read_file(str(tmp_path / 'x.jpg'))
  for seed in range(5):
    fused = augment.random_resized_crop(augment.Encoded(data, (None, None, 3)),
                                        tf.constant([seed, 1]), 32, (0.2, 1.0))
    whole = augment.random_resized_crop(tf.io.decode_jpeg(data, channels=3),
                                        tf.constant([seed, 1]), 32, (0.2, 1.0))
    np.testing.assert_array_equal(fused.numpy(), whole.numpy())


def test_missing_folder_fails_validation_naming_the_fix(tmp_path):
  with pytest.raises(errors.DatasetError, match='does not exist'):
    validation.check_run(_config(tmp_path / 'nowhere'))
  assert not os.path.exists(tmp_path / 'nowhere')


def test_hosts_split_a_folder_into_disjoint_parts_with_every_class(folder):
  config = _config(folder)
  parts = [list(pipeline.eval_batches(config, 'val', 8, host, 2)) for host in range(2)]
  labels = [np.concatenate([b['label'][b['valid']] for b in batches]) for batches in parts]
  assert sorted(map(len, labels)) == [6, 7]  # 13 images, every other file to each host
  assert all(set(part) == {0, 1, 2} for part in labels)
  np.testing.assert_array_equal(np.bincount(np.concatenate(labels)), [4, 5, 4])


def test_a_truncated_jpeg_is_skipped_not_fatal(tmp_path):
  for i in range(6):
    _write(tmp_path / f'{i}.jpg', (40 * i, 90, 90), 'RGB', 'JPEG', (40, 40))
  data = (tmp_path / '0.jpg').read_bytes()
  (tmp_path / '0.jpg').write_bytes(data[:len(data) // 3])  # passes the header check, fails decoding
  config = _config(tmp_path, **{'data.folder_holdout': 0.0, 'data.folder_holdout_min': 0})
  batches = list(pipeline.eval_batches(config, 'train', 8, 0, 1))
  assert sum(int(b['valid'].sum()) for b in batches) == 5


def write_small_jpegs(root, per_class, side=16, seed=0):
  """root/<class>/<i>.jpg: `per_class` small noisy JPEGs per class of CLASSES (a user's folder)."""
  rng = np.random.default_rng(seed)
  for (name, colour), count in zip(CLASSES.items(), per_class):
    os.makedirs(root / name)
    for i in range(count):
      pixels = np.clip(rng.normal(colour, 30, (side, side, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / name / f'{i}.jpg', quality=90)


@pytest.fixture(scope='module')
def user_folder(tmp_path_factory):
  """300 images, 3 classes, no train/ or val/ folders: the folder of the issue's new user."""
  root = tmp_path_factory.mktemp('user_images')
  write_small_jpegs(root, (100, 100, 100))
  return root


def test_folder_hold_out_is_stratified_and_slices_mix_classes(tmp_path):
  write_small_jpegs(tmp_path, (30, 50, 120), side=8)
  held = sources.folder_split(str(tmp_path), 'val', 0.1, 10)
  train_part = sources.folder_split(str(tmp_path), 'train', 0.1, 10)
  assert list(np.bincount(held.labels)) == [10, 10, 12]  # max(10 %, 10) of each class
  assert list(np.bincount(train_part.labels)) == [20, 40, 108]
  assert not set(held.paths) & set(train_part.paths)
  assert list(np.bincount(sources.folder_split(str(tmp_path), 'val', 0.1, 0).labels)) == [3, 5, 12]
  # Any slice holds every class in its share of the split (files were written class by class).
  first = sources.folder_split(str(tmp_path), 'train[:42]', 0.1, 10)
  share = np.array([20, 40, 108]) * 42 / 168
  assert np.abs(np.bincount(first.labels, minlength=3) - share).max() <= 1, first.labels
  assert first.paths == train_part.paths[:42]  # the same fixed order every time
  assert sources.folder_split(str(tmp_path), 'train[25%:]', 0.1, 10).paths == train_part.paths[42:]


def test_an_existing_directory_is_a_folder_unless_a_tfds_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs('my_images')
  os.makedirs('fashion_mnist')  # e.g. run from inside the TFDS data directory
  assert sources.is_folder('my_images') and sources.is_folder('./my_images')
  assert not sources.is_folder('fashion_mnist') and not sources.is_folder('my_imagez')
  with pytest.raises(errors.DatasetError, match=r'\./my_imagez'):
    sources.get_builder('my_imagez')


def test_fit_sizes_the_monitor_and_probe_and_measures_the_folder(user_folder):
  config = load_config('configs/mae.py:runlocal', **{
      'data.name': str(user_folder), 'eval.every_steps': 10})
  changes = fit.fit(config, knn_monitor=True)
  mon, lin = config.eval.knn_monitor, config.eval.linear
  assert (mon.bank_examples, mon.query_examples) == (270, 30)  # 10 held out per class
  assert (lin.train_split, lin.holdout_split, lin.batch_size) == ('train[:243]', 'train[243:]', 128)
  pixels = np.concatenate([np.asarray(Image.open(p), np.float64).reshape(-1, 3)
                           for p in sorted(user_folder.glob('*/*.jpg'))[::10]]) / 255
  np.testing.assert_allclose(config.data.mean, pixels.mean(0), atol=0.02)
  np.testing.assert_allclose(config.data.std, pixels.std(0), atol=0.03)
  assert len(changes) == 7 and all(any(c.startswith(k) for c in changes) for k in (
      'data.mean', 'data.std', 'eval.knn_monitor.bank_examples', 'eval.linear.batch_size'))
  assert fit.fit(config, knn_monitor=True) == []  # fitted once: nothing left to change
  assert fit.note([], 'x') == '' and fit.note(changes, 'x').count('\n') == 0


def test_a_users_folder_trains_and_evaluates_given_only_its_name(user_folder, tmp_path, capsys,
                                                                caplog):
  """The default-suite representative of the slow test below: MAE, 2 steps, a tiny ViT."""
  config = load_config('configs/mae.py:runlocal', **{
      'data.name': str(user_folder), 'eval.every_steps': 2, 'total_steps': 2, 'warmup_steps': 1,
      'model.variant': 'mu/4', 'batch_size': 16, 'mae.decoder_width': 32, 'mae.decoder_depth': 1,
      'mae.decoder_heads': 2, 'log.progress_bar': False, 'log.images_every_steps': 0,
      'eval.batch_size': 32})
  workdir = str(tmp_path / 'run')
  assert 0 <= train.train(config, workdir)['eval_knn_top1'] <= 1
  assert capsys.readouterr().out.startswith('note: fitted to the data of ')
  with caplog.at_level(logging.WARNING):  # Orbax's warning of a missing step metadata: dropped
    knn = evaluate.evaluate(workdir, 'knn', k=[5])
  assert not [r for r in caplog.records if '_CHECKPOINT_METADATA' in r.getMessage()]
  assert (knn['test_examples'], knn['train_examples']) == (30, 270)
  overrides = {'eval.linear.epochs': 1, 'eval.linear.base_lrs': (0.1,)}
  probe = evaluate.evaluate(workdir, 'linear', config_overrides=overrides)
  assert (probe['test_examples'], probe['train_examples'], probe['holdout_examples']) == (
      30, 243, 27) and probe['epochs'] == 1
  assert 'n=30 train_n=243 holdout_n=27' in evaluate._summary(probe)  # pylint: disable=protected-access
  assert evaluate.read_results(workdir, 'linear')[-1]['options'] == {
      'config': {'eval.linear.epochs': 1, 'eval.linear.base_lrs': [0.1]}}
  with pytest.raises(errors.ConfigError, match='only config.eval.*not data.name'):
    evaluate.evaluate(workdir, 'knn', config_overrides={'data.name': 'x'})


@pytest.mark.slow  # every recipe: a training and two evaluations, ~1 min each on 2 CPU cores
@pytest.mark.parametrize('recipe', recipe_lib.recipe_names())
def test_every_recipe_runs_on_a_users_folder_given_only_its_name(recipe, user_folder, tmp_path):
  """The commands a new user types: only data.name added (and a 3-step run with the monitor)."""
  workdir = str(tmp_path / 'run')
  trained = run_module(['mimjax.train', '--config', f'{recipe}:runlocal', '--workdir', workdir,
                        f'--config.data.name={user_folder}', '--config.total_steps=3',
                        '--config.eval.every_steps=3'])
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'note: fitted to the data' in trained.stdout and 'eval_' in trained.stdout
  for protocol in ('knn', 'linear'):
    evaluated = run_module(['mimjax.evaluate', '--workdir', workdir, '--protocol', protocol])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert re.search(r'top1=[\d.]+ .*\bn=30\b', evaluated.stdout), evaluated.stdout


def test_reconstruction_grids_of_a_small_split_have_no_blank_rows(tmp_path):
  write_small_jpegs(tmp_path, (3, 2, 2), side=8)
  config = _config(tmp_path, **{'data.eval_split': 'val'})  # all but one image per class held out
  batch = train.held_out_pictures_batch(config, sharding.make_mesh(config.mesh))
  assert batch['image'].shape[0] == 4 and sorted(np.asarray(batch['label'])) == [0, 0, 1, 2]


def test_a_dry_run_on_an_unprepared_dataset_creates_nothing(tmp_path, monkeypatch, capsys):
  """`--dry_run` with a TFDS dataset not prepared in data_dir: one line naming the dataset, the
  directory and the fix; it never downloads or prepares (that once left an empty dataset folder
  under ~/tensorflow_datasets), and data_dir and the workdir stay as they were."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  prepared = []
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      lambda self, *a, **k: prepared.append(self.name))
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  config = load_config('configs/mae.py:runlocal', **tiny_overrides(**{
      'data.name': 'cifar10', 'data.data_dir': str(data_dir)}))
  with pytest.raises(SystemExit) as e, errors.reported():
    train.train(config, str(tmp_path / 'run'), dry_run=True)
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'Traceback' not in err, err
  assert err.startswith(f"error: Dataset 'cifar10' is not prepared under {data_dir}, and "
                        '--dry_run prepares nothing'), err
  assert f'tfds build cifar10 --data_dir={data_dir}' in err
  assert prepared == [] and os.listdir(tmp_path) == ['tfds'] and os.listdir(data_dir) == []
