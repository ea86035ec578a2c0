"""Input pipeline: TFDS split -> per-host tf.data stream -> numpy batches for one process.

The training stream is a pure function of (seed, position): a seeded per-epoch shuffle, then each
example's augmentation seeded by its position in the stream. Resuming at step s skips
s * local_batch raw (still encoded) records and continues exactly where the interrupted run was.
"""
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mimjax import errors
from mimjax.data import augment
from mimjax.data import sources

# tf.data must not grab the accelerator; JAX owns it.
tf.config.set_visible_devices([], 'GPU')


def _builder_with_split(config, split):
  builder = sources.get_builder(config.data.name, config.data.data_dir, config.data.download)
  if split not in builder.info.splits and split.split('[')[0] not in builder.info.splits:
    raise errors.DatasetError(
        f'Dataset {config.data.name!r} has no split {split!r}; it has '
        f'{sorted(builder.info.splits)}. Set config.data.train_split / eval_split.')
  features = builder.info.features
  if 'image' not in features.keys():
    raise errors.DatasetError(
        f'Dataset {config.data.name!r} has no `image` feature (it has {sorted(features.keys())}); '
        'mimjax trains on image datasets.')
  channels = features['image'].shape[-1]
  if channels not in (None, 1, 3):
    raise errors.DatasetError(
        f'Dataset {config.data.name!r} has {channels}-channel images; mimjax takes 1 (grayscale, '
        'replicated to 3) or 3 (RGB). Choose an RGB or grayscale dataset.')
  return builder


def check_splits(config):
  """DatasetError unless the dataset (prepared if needed) has the splits the run reads."""
  _builder_with_split(config, config.data.train_split)
  if config.eval.every_steps:
    _builder_with_split(config, config.data.eval_split)


def _raw_split(config, split, process_index, process_count):
  builder = _builder_with_split(config, split)
  host_split = tfds.even_splits(split, n=process_count)[process_index]
  ds = builder.as_dataset(split=host_split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  image_feature = builder.info.features['image']
  num_examples = builder.info.splits[host_split].num_examples
  return ds, image_feature, num_examples


def _augmenter(config, name, image_feature):
  fn = augment.AUGMENTATIONS[name]

  def process(index, example, seed):
    image = image_feature.decode_example(example['image'])
    features = fn(image, tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)]),
                  config.data)
    if 'label' in example:
      features['label'] = tf.cast(example['label'], tf.int32)
    return features
  return process


def local_batch_size(global_batch, process_count=None):
  process_count = process_count or jax.process_count()
  if global_batch % process_count:
    raise errors.ConfigError(f'batch_size {global_batch} does not divide over {process_count} processes; '
                             f'choose a multiple of {process_count}.')
  return global_batch // process_count


def train_batches(config, start_step=0, process_index=None, process_count=None):
  """Endless iterator of this host's training batches (dicts of numpy arrays), from `start_step`."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = process_count or jax.process_count()
  batch = local_batch_size(config.batch_size, process_count)
  ds, image_feature, _ = _raw_split(config, config.data.train_split, process_index, process_count)
  if config.data.cache:
    ds = ds.cache()
  seed = config.seed * 1000 + process_index
  ds = ds.shuffle(config.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().skip(start_step * batch)
  process = _augmenter(config, config.data.augment, image_feature)
  ds = ds.map(lambda i, ex: process(i, ex, seed), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True).prefetch(2)
  return ds.as_numpy_iterator()


def eval_batches(config, split, batch_size, process_index=None, process_count=None):
  """One pass over this host's part of `split`, centre-cropped, in fixed-size batches.

  The last batch is padded to `batch_size`; `valid` (bool [batch]) marks the real examples, so
  every batch has the same shape and evaluation compiles once. Every host yields the same number
  of batches (hosts with fewer examples add all-invalid ones), so collectives never wait on a host
  that has finished.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = process_count or jax.process_count()
  ds, image_feature, _ = _raw_split(config, split, process_index, process_count)
  process = _augmenter(config, 'center', image_feature)
  ds = ds.enumerate().map(lambda i, ex: process(i, ex, 0), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(2)
  host_sizes = [num_examples(config, s) for s in tfds.even_splits(split, n=process_count)]
  num_batches = -(-max(host_sizes) // batch_size)
  pad = lambda v, n: np.concatenate([v, np.zeros((n,) + v.shape[1:], v.dtype)])  # noqa: E731
  batch = None
  for batch in ds.as_numpy_iterator():
    n = len(batch['image'])
    batch = {k: pad(v, batch_size - n) for k, v in batch.items()}
    batch['valid'] = np.arange(batch_size) < n
    num_batches -= 1
    yield batch
  for _ in range(num_batches):  # this host ran out first
    yield {k: np.zeros_like(v) for k, v in batch.items()}


def num_examples(config, split):
  builder = sources.get_builder(config.data.name, config.data.data_dir, config.data.download)
  return builder.info.splits[split].num_examples
