"""The labelled subset of low-label fine-tuning (`data.label_fraction`): stratified, seeded."""
import collections

import numpy as np
import pytest

from conftest import load_config
from conftest import tiny_overrides
from mimjax import errors
from mimjax.data import pipeline


def test_stratified_indices_take_the_same_count_of_every_class():
  # 40 labels: 10 of class 0, 10 of class 1, 20 of class 2. Fraction 0.2 -> round(0.2 * 40 / 3)
  # = round(2.67) = 3 of each class; fraction 0.1 -> round(1.33) = 1 of each.
  labels = np.array([0] * 10 + [1] * 10 + [2] * 20)
  big = pipeline.stratified_indices(labels, 0.2, seed=0)
  assert collections.Counter(labels[big].tolist()) == {0: 3, 1: 3, 2: 3}
  assert list(big) == sorted(big) and len(set(big.tolist())) == 9
  small = pipeline.stratified_indices(labels, 0.1, seed=0)
  assert collections.Counter(labels[small].tolist()) == {0: 1, 1: 1, 2: 1}
  assert set(small.tolist()) <= set(big.tolist())  # the 10% labels hold the 1% ones
  np.testing.assert_array_equal(big, pipeline.stratified_indices(labels, 0.2, seed=0))
  others = [pipeline.stratified_indices(labels, 0.2, seed=s) for s in (1, 2, 3)]
  assert any(set(o.tolist()) != set(big.tolist()) for o in others)  # the seed draws the subset
  with pytest.raises(errors.DatasetError, match='class 0 has 10'):
    pipeline.stratified_indices(labels, 0.9, seed=0)  # 12 of each class


def test_training_reads_only_the_labelled_subset():
  # train[:1000] holds about 100 images of each class; fraction 0.05 takes 5 of each: 50 images.
  # Batches of 10 over 5 steps read the subset exactly once (an epoch is a permutation of it).
  config = load_config('configs/finetune.py:runlocal', **tiny_overrides(**{
      'data.train_split': 'train[:1000]', 'data.label_fraction': 0.05, 'batch_size': 10,
      'data.augment': 'center'}))
  batches = pipeline.train_batches(config)
  epochs = [[next(batches) for _ in range(5)] for _ in range(2)]
  labels = [np.concatenate([b['label'] for b in e]) for e in epochs]
  assert collections.Counter(labels[0].tolist()) == {c: 5 for c in range(10)}
  images = [sorted(map(bytes, np.concatenate([b['image'] for b in e]))) for e in epochs]
  assert images[0] == images[1]  # the second epoch reads the same 50 images
  config.seed += 1
  other = pipeline.train_batches(config)
  assert sorted(map(bytes, np.concatenate([next(other)['image'] for _ in range(5)]))) != images[0]


def test_an_image_folder_gives_the_same_count_of_every_class(tmp_path):
  # 3 classes of 6 images; fraction 1/3 -> round(18 / 3 / 3) = 2 of each class: one batch of 6 is
  # the whole subset, read again each epoch. A flat folder has no labels to stratify by.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for c, name in enumerate(('ant', 'bee', 'cow')):
    (tmp_path / 'train' / name).mkdir(parents=True)
    (tmp_path / 'val' / name).mkdir(parents=True)
    for i in range(6):
      Image.new('RGB', (20, 20), (40 * i, 80 * c, 90)).save(tmp_path / 'train' / name / f'{i}.png')
  config = load_config('configs/finetune.py:runlocal', **tiny_overrides(**{
      'data.name': str(tmp_path), 'data.train_split': 'train', 'data.eval_split': 'val',
      'data.label_fraction': 1 / 3, 'batch_size': 6, 'data.augment': 'center'}))
  batches = pipeline.train_batches(config)
  epochs = [next(batches) for _ in range(3)]  # the whole folder would be 18 distinct images
  for batch in epochs:
    assert collections.Counter(batch['label'].tolist()) == {0: 2, 1: 2, 2: 2}
  assert len({bytes(image) for batch in epochs for image in batch['image']}) == 6
  flat = tmp_path / 'flat'
  flat.mkdir()
  for i in range(6):
    Image.new('RGB', (20, 20), (40 * i, 0, 0)).save(flat / f'{i}.png')
  with config.unlocked():
    config.data.name = str(flat)
    config.data.folder_holdout_min = 1
  with pytest.raises(errors.DatasetError, match='needs class labels'):
    next(pipeline.train_batches(config))


def test_each_host_takes_a_disjoint_part_of_the_label_subset():
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  labels = np.repeat(np.arange(10), 50)
  subset = pipeline.stratified_indices(labels, 0.1, seed=0)
  parts = [pipeline.host_part(subset, 0.1, i, 3) for i in range(3)]
  assert all(len(p) for p in parts)
  joined = np.concatenate(parts)
  assert len(set(joined.tolist())) == len(joined)  # disjoint
  assert sorted(joined.tolist()) == subset.tolist()  # together the subset
  with pytest.raises(errors.DatasetError, match='selects 2 images, fewer than the 3 processes'):
    pipeline.host_part(subset[:2], 0.004, 2, 3)


def test_label_subset_refuses_a_large_tfds_split_and_imbalance_is_explained(monkeypatch):
  import types  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  splits = {'train': types.SimpleNamespace(num_bytes=3 << 30)}
  builder = types.SimpleNamespace(info=types.SimpleNamespace(splits=splits))
  monkeypatch.setattr(pipeline.sources, 'get_builder', lambda *a: builder)
  with pytest.raises(errors.DatasetError, match='3.0 GiB.*label subset is for small datasets'):
    pipeline._tfds_records.__wrapped__('big', None, False, 'train')  # pylint: disable=protected-access
  with pytest.raises(errors.DatasetError, match='1.0 works only on balanced data'):
    pipeline.stratified_indices(np.array([0, 0, 0, 1]), 1.0, seed=0)
