"""Input pipeline: a TFDS split or an image folder -> per-host tf.data stream -> numpy batches.

The training stream is a pure function of (seed, position), position counted in examples: epoch e
is the host's records in an order seeded by (seed, e), each record optionally repeated
(`data.repeated_aug` consecutive copies, DeiT's repeated augmentation), and each example's
augmentation is seeded by its position in the stream, so copies get different augmentations.
Resuming at a position therefore skips whole epochs arithmetically and reads at most one epoch's
records: none for an image folder, whose epoch order is a full permutation of its file list, and at
most the epoch's records before the position for TFDS, whose records are read in sequence through
a shuffle buffer.
"""
import functools
from typing import Callable, NamedTuple

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mimjax import errors
from mimjax.data import augment
from mimjax.data import sources

# tf.data must not grab the accelerator; JAX owns it.
tf.config.set_visible_devices([], 'GPU')

_ENDLESS = 2 ** 62  # number of epochs in an endless stream


class Source(NamedTuple):
  """One host's part of a split as records (dicts with 'image', maybe 'label'), however stored."""
  ordered: tf.data.Dataset  # every record once, in stored order (evaluation)
  epoch: Callable  # int64 scalar epoch -> that epoch's records in their shuffled order
  load: Callable  # record -> (encoded image bytes, label or None)
  shape: tuple  # decoded image shape, None for sizes that vary
  num_examples: int


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
  try:
    size = builder.info.splits[split].num_examples
  except ValueError as e:  # TFDS's slice syntax, e.g. 'train[:abc]'
    raise errors.DatasetError(f'Split {split!r} of {config.data.name!r} cannot be read: '
                              f'{str(e).splitlines()[0]} Use e.g. train, train[:10%] or '
                              'train[:1000].') from e
  if size < 1:
    raise errors.DatasetError(f'Split {split!r} of {config.data.name!r} holds no examples; choose '
                              'a slice with at least one (e.g. train[:1000]).')
  return builder


def check_splits(config):
  """DatasetError unless the data has the splits the run reads (a TFDS dataset is prepared if
  needed; an image folder must exist)."""
  if sources.is_folder(config.data.name):
    sources.check_folder(config.data.name)
    return
  _builder_with_split(config, config.data.train_split)
  if config.eval.every_steps or config.log.images_every_steps:  # held-out evaluation, pictures
    _builder_with_split(config, config.data.eval_split)


def _tfds_source(config, split, process_index, process_count, seed, reads):
  """Records read in sequence; an epoch's order is a shuffle buffer seeded by (seed, epoch).

  With data.cache the records are kept in memory only when `reads` (records the caller will read)
  goes past one pass: a cache read in part is discarded, with a TensorFlow warning, and one pass
  never reads it again. (TFDS's own automatic cache of small datasets is off for that reason.)
  """
  builder = _builder_with_split(config, split)
  host_split = tfds.even_splits(split, n=process_count)[process_index]
  ds = builder.as_dataset(split=host_split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))  # data.cache decides
  if config.data.cache and reads > builder.info.splits[host_split].num_examples:
    ds = ds.cache()

  def epoch(e):
    return ds.shuffle(config.data.shuffle_buffer, seed=seed * 1_000_003 + e,
                      reshuffle_each_iteration=False)

  load = lambda ex: (ex['image'], ex.get('label'))  # noqa: E731
  return Source(ds, epoch, load, tuple(builder.info.features['image'].shape),
                builder.info.splits[host_split].num_examples)


def _folder_source(config, split, process_index, process_count, seed, reads):
  """Files read by index; an epoch's order is a permutation of the host's files seeded by
  (seed, epoch), so skipping examples reads nothing (`reads` is not needed: nothing is cached)."""
  del reads
  part = sources.config_split(config, split)
  if not len(part.paths):
    raise errors.DatasetError(f'Split {split!r} of the image folder {config.data.name} holds no '
                              'images; choose a split (or slice) that does.')
  take = slice(process_index, None, process_count)  # strided: every host sees every class
  records = {'image': np.asarray(part.paths[take], dtype=str)}
  if part.labels is not None:
    records['label'] = part.labels[take]
  load = lambda r: (tf.io.read_file(r['image']), r.get('label'))  # noqa: E731
  return _in_memory(records, seed, load, (None, None, config.data.channels))


def stratified_indices(labels, fraction, seed):
  """Sorted indices of a class-stratified subset of `labels`: round(fraction * len(labels) /
  classes), at least 1, of every class. Each class's images are taken in an order drawn from
  `seed` that does not depend on `fraction`, so a smaller fraction's subset is part of a larger
  one's. DatasetError when a class has fewer images than that."""
  labels = np.asarray(labels)
  classes = np.unique(labels)
  per_class = max(1, round(fraction * len(labels) / len(classes)))
  rng = np.random.default_rng(seed)
  chosen = []
  for label in classes:
    members = np.flatnonzero(labels == label)
    if len(members) < per_class:
      raise errors.DatasetError(
          f'data.label_fraction={fraction} takes {per_class} images of every class (every class '
          f'gets the same count, so 1.0 works only on balanced data), but class {label} has '
          f'{len(members)}; lower it.')
    chosen.append(members[rng.permutation(len(members))[:per_class]])
  return np.sort(np.concatenate(chosen))


def host_part(subset, fraction, process_index, process_count):
  """This host's part of the labelled `subset` (indices): every process_count-th one, so the
  hosts' parts are disjoint and together the subset. DatasetError when the subset has fewer
  images than there are hosts (a host would get none)."""
  if len(subset) < process_count:
    raise errors.DatasetError(
        f'data.label_fraction={fraction} selects {len(subset)} images, fewer than the '
        f'{process_count} processes that each need one; raise it or use fewer processes.')
  return subset[process_index::process_count]


# The largest TFDS split the labelled subset reads into memory.
MAX_LABELLED_BYTES = 2 << 30


@functools.lru_cache(maxsize=4)
def _tfds_records(name, data_dir, download, split):
  """(encoded images, labels) of a whole TFDS split in stored order, as numpy arrays; a split of
  more than MAX_LABELLED_BYTES is refused (it is read into memory)."""
  builder = sources.get_builder(name, data_dir, download)
  num_bytes = builder.info.splits[split].num_bytes
  if num_bytes > MAX_LABELLED_BYTES:
    raise errors.DatasetError(
        f'data.label_fraction reads the whole split {name}:{split} ({num_bytes / 2**30:.1f} GiB) '
        f'into memory, more than {MAX_LABELLED_BYTES >> 30} GiB; the label subset is for small '
        'datasets: for a large one, make the subset a folder dataset or a TFDS split of its own.')
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  batches = list(ds.map(lambda ex: (ex['image'], ex['label'])).batch(8192).as_numpy_iterator())
  return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _labelled_source(config, split, process_index, process_count, seed, reads):
  """The class-stratified subset of `split` that data.label_fraction names (drawn from
  config.seed, the same on every host), held in memory; each host takes every
  process_count-th image of it, and an epoch is a permutation seeded by (seed, epoch)."""
  del reads
  d = config.data
  if sources.is_folder(d.name):
    part = sources.config_split(config, split)
    images, labels = np.asarray(part.paths, dtype=str), part.labels
    load = lambda r: (tf.io.read_file(r['image']), r['label'])  # noqa: E731
    shape = (None, None, d.channels)
  else:
    builder = _builder_with_split(config, split)
    images, labels = _tfds_records(d.name, d.data_dir, d.download, split)
    load = lambda r: (r['image'], r['label'])  # noqa: E731
    shape = tuple(builder.info.features['image'].shape)
  if labels is None:
    raise errors.DatasetError(f'data.label_fraction={d.label_fraction} needs class labels, and '
                              f'{d.name} has none; use class subfolders.')
  keep = host_part(stratified_indices(labels, d.label_fraction, config.seed), d.label_fraction,
                   process_index, process_count)
  return _in_memory({'image': images[keep], 'label': labels[keep]}, seed, load, shape)


def _in_memory(records, seed, load, shape):
  """A Source over `records` (dict of equal-length arrays) held in memory."""
  num_examples = len(records['image'])
  ds = tf.data.Dataset.from_tensor_slices(records)

  def epoch(e):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), e]))
    return tf.data.Dataset.from_tensor_slices({k: tf.gather(v, order) for k, v in records.items()})

  return Source(ds, epoch, load, shape, num_examples)


def _source(config, split, process_index, process_count, seed=0, reads=0, labelled=False):
  """One host's part of `split`; with `labelled` (training) and data.label_fraction > 0, of its
  class-stratified labelled subset."""
  if labelled and config.data.label_fraction:
    make = _labelled_source
  else:
    make = _folder_source if sources.is_folder(config.data.name) else _tfds_source
  return make(config, split, process_index, process_count, seed, reads)


def _augmenter(config, name, source):
  fn = augment.AUGMENTATIONS[name]

  def process(index, record, seed):
    data, label = source.load(record)
    features = fn(augment.Encoded(data, source.shape),
                  tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)]), config.data)
    if label is not None:
      features['label'] = tf.cast(label, tf.int32)
    return features
  return process


def _skip_undecodable(ds, config):
  """Image folders: drops (with a logged warning) files that pass the listing's header check but
  fail to decode, e.g. truncated JPEGs, instead of crashing the run."""
  return ds.ignore_errors(log_warning=True) if sources.is_folder(config.data.name) else ds


def _finish(ds, config):
  """Applies the thread-pool setting (config.data.threads; 0 = tf.data's default of all cores)."""
  options = tf.data.Options()
  if config.data.threads:
    options.threading.private_threadpool_size = config.data.threads
  return ds.with_options(options).prefetch(2)


def local_batch_size(global_batch, process_count=None):
  process_count = process_count or jax.process_count()
  if global_batch % process_count:
    raise errors.ConfigError(f'batch_size {global_batch} does not divide over {process_count} '
                             f'processes; choose a multiple of {process_count}.')
  return global_batch // process_count


def _stream(source, host_position, repeats=1):
  """(position, record) pairs of the endless stream from `host_position`, each record `repeats`
  times in a row (DeiT's RASampler: an image's copies sit in consecutive positions, here of the
  host's part of the batch; as in DeiT the examples per step are unchanged, so a pass over the data
  takes `repeats` epochs). Earlier epochs are skipped arithmetically, so at most the current
  epoch's records are read to get there."""
  record, copy = divmod(host_position, repeats)
  first_epoch, offset = divmod(record, source.num_examples)
  ds = tf.data.Dataset.range(first_epoch, _ENDLESS).flat_map(source.epoch).skip(offset)
  if repeats > 1:
    ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats)).skip(copy)
  return ds.enumerate(start=host_position)


def train_batches(config, position=0, process_index=None, process_count=None):
  """Endless iterator of this host's training batches (dicts of numpy arrays).

  `position` is the number of examples the whole run has consumed (all hosts; the sum of the
  global batch sizes so far), so a resume stays exact when the batch size changes. Each host
  continues its own stream at position / process_count.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = process_count or jax.process_count()
  batch = local_batch_size(config.batch_size, process_count)
  if position % process_count:
    raise errors.ConfigError(f'data position {position} does not divide over {process_count} '
                             'processes; resume with the process count that wrote it.')
  host_position = position // process_count
  seed = config.seed * 1000 + process_index
  records_left = (config.total_steps * config.batch_size - position) // (
      process_count * config.data.repeated_aug)
  source = _source(config, config.data.train_split, process_index, process_count, seed,
                   records_left, labelled=True)
  process = _augmenter(config, config.data.augment, source)
  stream = _stream(source, host_position, config.data.repeated_aug)
  ds = _skip_undecodable(stream.map(lambda i, ex: process(i, ex, seed),
                                    num_parallel_calls=tf.data.AUTOTUNE), config)
  return _finish(ds.batch(batch, drop_remainder=True), config).as_numpy_iterator()


def eval_batches(config, split, batch_size, process_index=None, process_count=None):
  """One pass over this host's part of `split`, centre-cropped, in fixed-size batches.

  The last batch is padded to `batch_size`; `valid` (bool [batch]) marks the real examples, so
  every batch has the same shape and evaluation compiles once. Every host yields the same number
  of batches (hosts with fewer examples add all-invalid ones), so collectives never wait on a host
  that has finished.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = process_count or jax.process_count()
  source = _source(config, split, process_index, process_count)
  process = _augmenter(config, 'center', source)
  ds = source.ordered.enumerate().map(lambda i, ex: process(i, ex, 0),
                                      num_parallel_calls=tf.data.AUTOTUNE)
  ds = _skip_undecodable(ds, config)
  ds = _finish(ds.batch(batch_size), config)
  num_batches = -(-max(host_sizes(config, split, process_count)) // batch_size)
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


def host_sizes(config, split, process_count):
  """Number of examples of each process's part of `split`, in process order."""
  return [_source(config, split, i, process_count).num_examples for i in range(process_count)]


def num_examples(config, split):
  return _source(config, split, 0, 1).num_examples


def num_training_examples(config):
  """The examples training reads: data.train_split, or its labelled subset (data.label_fraction)."""
  return _source(config, config.data.train_split, 0, 1, labelled=True).num_examples


def num_classes(config):
  """The number of classes of the data's labels; DatasetError when the data has none."""
  if sources.is_folder(config.data.name):
    count = len(sources.config_split(config, config.data.train_split).class_names)
  else:
    features = _builder_with_split(config, config.data.train_split).info.features
    count = features['label'].num_classes if 'label' in features.keys() else 0
  if not count:
    raise errors.DatasetError(
        f'{config.data.name} has no class labels (a flat image folder or an unlabelled dataset); '
        'kNN evaluation needs them: use class subfolders (or, for the in-training kNN monitor, '
        'set config.eval.every_steps=0).')
  return count
