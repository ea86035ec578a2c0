"""The input pipeline on the real Fashion-MNIST files (Debian's dataset-fashion-mnist via TFDS);
a dataset without usable images or an empty or unparsable split is one line before a run starts."""
import copy
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import load_config
from conftest import one_line_error
from conftest import set_fields
from mimjax import errors
from mimjax import train
from mimjax import validation
from mimjax.data import augment
from mimjax.data import features
from mimjax.data import pipeline
from mimjax.data import sources


@pytest.fixture(scope='module')
def config():
  return load_config('configs/mae.py:runlocal', **{
      'batch_size': 32, 'data.train_split': 'train[:1024]', 'data.shuffle_buffer': 1024})


def test_fashion_mnist_is_prepared_from_the_debian_files(config):
  builder = sources.get_builder('fashion_mnist', config.data.data_dir)
  assert builder.info.splits['train'].num_examples == 60_000
  assert builder.info.splits['test'].num_examples == 10_000
  assert builder.info.features['label'].num_classes == 10
  # The first training example of the original IDX file, read independently of TFDS.
  images = sources.read_idx(f'{sources.DEBIAN_FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz',
                            60_000, (28, 28, 1))
  labels = sources.read_idx(f'{sources.DEBIAN_FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz',
                            60_000, ())
  assert labels[0] == 9 and images.mean() > 60  # ankle boot; the known mean pixel is ~72.9
  np.testing.assert_allclose(images.mean() / 255, 0.286, atol=0.001)


def test_train_batches_shapes_and_normalisation(config):
  batch = next(pipeline.train_batches(config, 0, 0, 1))
  assert batch['image'].shape == (32, 28, 28, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].max() < 10
  # Grayscale replicated to three identical channels.
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  # Normalised with the dataset statistics: roughly zero mean, unit spread.
  assert abs(batch['image'].mean()) < 0.5 and 0.6 < batch['image'].std() < 1.4


def test_resume_position_is_exact(config):
  stream = pipeline.train_batches(config, 0, 0, 1)
  for _ in range(40):  # past the end of the first epoch (1024 / 32 = 32 batches)
    expected = next(stream)
  resumed = next(pipeline.train_batches(config, 39 * 32, 0, 1))
  np.testing.assert_array_equal(resumed['image'], expected['image'])
  np.testing.assert_array_equal(resumed['label'], expected['label'])


def test_epochs_are_reshuffled(config):
  stream = pipeline.train_batches(config, 0, 0, 1)
  epoch = [next(stream)['label'] for _ in range(64)]
  assert not np.array_equal(np.concatenate(epoch[:32]), np.concatenate(epoch[32:]))
  # ... yet every epoch is a permutation of the same examples.
  np.testing.assert_array_equal(np.sort(np.concatenate(epoch[:32])),
                                np.sort(np.concatenate(epoch[32:])))


def test_hosts_read_disjoint_halves(config):
  first = pipeline.eval_batches(config, 'test[:200]', 100, process_index=0, process_count=2)
  second = pipeline.eval_batches(config, 'test[:200]', 100, process_index=1, process_count=2)
  a = np.concatenate([b['image'][b['valid']] for b in first])
  b = np.concatenate([b['image'][b['valid']] for b in second])
  assert len(a) == len(b) == 100
  assert not any(np.array_equal(x, y) for x in a[:10] for y in b)


def test_eval_batches_pad_with_valid_mask(config):
  batches = list(pipeline.eval_batches(config, 'test[:100]', 64, 0, 1))
  assert [b['image'].shape[0] for b in batches] == [64, 64]
  assert [int(b['valid'].sum()) for b in batches] == [64, 36]


def test_random_resized_crop_respects_scale():
  import tensorflow as tf
  image = tf.reshape(tf.range(64 * 64, dtype=tf.float32), (64, 64, 1))
  for i in range(20):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        (64, 64, 1), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=(i, 0), area_range=(0.2, 0.5),
        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True,
        min_object_covered=0.0)
    area = float(size[0] * size[1]) / (64 * 64)
    assert 0.15 <= area <= 0.55 or area == 1.0  # 1.0 is the documented fallback
  out = augment.random_resized_crop(image, tf.constant([1, 2]), 32, (0.2, 1.0))
  assert out.shape == (32, 32, 1)


def test_unknown_dataset_and_split_name_the_fix(config):
  with pytest.raises(errors.DatasetError, match='Unknown dataset .fashion_mnst.*fashion_mnist'):
    sources.get_builder('fashion_mnst')
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.train_split = 'validation'
  with pytest.raises(errors.DatasetError, match='has no split'):
    next(pipeline.train_batches(config, 0, 0, 1))


def test_every_host_yields_the_same_number_of_eval_batches(config):
  # 129 examples over 2 hosts: 65 and 64, i.e. 2 and 1 batches of 64 without equalising.
  counts = []
  for host in range(2):
    batches = list(pipeline.eval_batches(config, 'test[:129]', 64, host, 2))
    counts.append((len(batches), sum(int(b['valid'].sum()) for b in batches)))
  assert counts == [(2, 65), (2, 64)]


def _repeated(augment_name, **extra):
  return load_config('configs/supervised.py:runlocal', **{
      'batch_size': 24, 'data.train_split': 'train[:96]', 'data.shuffle_buffer': 96,
      'data.repeated_aug': 3, 'data.augment': augment_name, **extra})


def test_repeated_augmentation_each_image_three_times_differently_augmented():
  assert load_config('configs/supervised.py').data.repeated_aug == 3  # DeiT main.py default
  center = pipeline.train_batches(_repeated('center'), 0, 0, 1)
  images = np.concatenate([next(center)['image'] for _ in range(12)])  # 288 = 3 x 96 positions
  triples = images.reshape(96, 3, -1)
  # The un-augmented copies of each block of 3 positions are one image ...
  assert all(np.array_equal(t[0], t[1]) and np.array_equal(t[0], t[2]) for t in triples)
  # ... and the 96 blocks are the 96 distinct training images, each exactly once.
  assert len({t[0].tobytes() for t in triples}) == 96
  # With random augmentation the same positions hold the same images (same labels, same order)
  # augmented three different ways.
  config = _repeated('rrc_flip')
  labels_center = np.concatenate([b['label'] for b in
                                  [next(pipeline.train_batches(_repeated('center'), 24 * s, 0, 1))
                                   for s in range(4)]])
  stream = pipeline.train_batches(config, 0, 0, 1)
  batches = [next(stream) for _ in range(4)]
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), labels_center)
  augmented = np.concatenate([b['image'] for b in batches]).reshape(32, 3, -1)
  assert not any(np.array_equal(t[i], t[j]) for t in augmented for i, j in ((0, 1), (0, 2), (1, 2)))
  # Resuming at step 3 (example 72) continues the repeated stream exactly, also from the middle of
  # an image's copies (example 73); two hosts read disjoint images.
  np.testing.assert_array_equal(next(pipeline.train_batches(config, 72, 0, 1))['image'],
                                batches[3]['image'])
  np.testing.assert_array_equal(next(pipeline.train_batches(config, 73, 0, 1))['image'][:23],
                                batches[3]['image'][1:])
  host0 = next(pipeline.train_batches(_repeated('center'), 0, 0, 2))['image'][::3]
  host1 = next(pipeline.train_batches(_repeated('center'), 0, 1, 2))['image'][::3]
  assert not any(np.array_equal(x, y) for x in host0 for y in host1)


def test_repeated_augmentation_must_be_positive():
  with pytest.raises(errors.ConfigError, match='repeated_aug'):
    validation.validate(_repeated('center', **{'data.repeated_aug': 0}))


def test_the_config_check_knows_every_registered_augmentation():
  """features.NAMES (what validation accepts without TensorFlow) is augment's registry."""
  assert sorted(features.NAMES) == sorted(augment.AUGMENTATIONS)


@pytest.mark.parametrize('features,part', [
    ({'text': tfds.features.Text()}, 'has no `image` feature'),
    ({'image': tfds.features.Image(shape=(None, None, 4))}, 'has 4-channel images')])
def test_dataset_without_image_or_with_4_channels(tiny_mae_config, tmp_path, monkeypatch, features,
                                                  part):
  info = types.SimpleNamespace(splits={'train': None, 'test': None},
                               features=tfds.features.FeaturesDict(features))
  monkeypatch.setattr(sources, 'get_builder', lambda *a: types.SimpleNamespace(info=info))
  with pytest.raises(errors.DatasetError) as e:
    train.train(tiny_mae_config, str(tmp_path / 'run'))
  one_line_error(e, part)
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('split,part', [('train[:0]', 'holds no examples'),
                                        ('train[:abc]', 'cannot be read')])
def test_an_empty_or_unparsable_split_is_one_line(tiny_mae_config, tmp_path, split, part):
  with pytest.raises(errors.DatasetError) as e:
    train.train(set_fields(tiny_mae_config, **{'data.train_split': split}), str(tmp_path / 'run'))
  one_line_error(e, repr(split), part)
  assert not (tmp_path / 'run').exists()
