"""Dataset sources: any TFDS dataset by name (Fashion-MNIST preparable offline), or an image folder.

Debian's `dataset-fashion-mnist` package ships the original Fashion-MNIST files. When they are
present and TFDS has not prepared `fashion_mnist` yet, we prepare it from those files with TFDS's
own builder (same name, version and features), so the rest of mimjax reads it exactly as it would
read a copy TFDS downloaded itself.
"""
import concurrent.futures
import difflib
import functools
import gzip
import os
import re
import warnings
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from mimjax import distributed
from mimjax import errors
from mimjax import workdir_io

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = {
    'train_data': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_data': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}

# Image folders: what counts as an image, by extension and then by the file's first bytes.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM', b'GIF8')
EVAL_FOLDERS = ('val', 'validation', 'test')  # tried in this order for any eval split name
LABELS_FILE = 'labels.txt'


class LocalFashionMNIST(tfds_mnist.FashionMNIST, skip_registration=True):
  """TFDS's `fashion_mnist` builder reading the files from a local directory instead of the web."""
  name = 'fashion_mnist'

  def __init__(self, *, source_dir=DEBIAN_FASHION_MNIST_DIR, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    files = {k: os.path.join(self._source_dir, v) for k, v in _FASHION_MNIST_FILES.items()}
    return [
        tfds.core.SplitGenerator(
            name=tfds.Split.TRAIN,
            gen_kwargs=dict(num_examples=60_000, data_path=files['train_data'],
                            label_path=files['train_labels'])),
        tfds.core.SplitGenerator(
            name=tfds.Split.TEST,
            gen_kwargs=dict(num_examples=10_000, data_path=files['test_data'],
                            label_path=files['test_labels'])),
    ]

  def _generate_examples(self, num_examples, data_path, label_path):
    """Reads the gzipped IDX files directly (TFDS's parent expects them already unzipped)."""
    images = read_idx(data_path, num_examples, (28, 28, 1))
    labels = read_idx(label_path, num_examples, ()).astype(np.int64)
    for index in range(num_examples):
      yield index, {'image': images[index], 'label': labels[index]}


def read_idx(path, num_items, item_shape):
  """uint8 array [num_items, *item_shape] from a gzipped IDX file (MNIST's format)."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  header = 16 if item_shape else 8
  array = np.frombuffer(data, dtype=np.uint8, offset=header)
  expected = num_items * int(np.prod(item_shape, dtype=np.int64))
  if array.size != expected:
    raise errors.DatasetError(f'{path} holds {array.size} values, expected {expected}: the file '
                              'is truncated or not the Fashion-MNIST file; reinstall '
                              'dataset-fashion-mnist.')
  return array.reshape((num_items,) + tuple(item_shape))


def default_data_dir():
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def _local_fashion_mnist_available(source_dir=DEBIAN_FASHION_MNIST_DIR):
  return all(os.path.exists(os.path.join(source_dir, f)) for f in _FASHION_MNIST_FILES.values())


# (name, data_dir) already prepared (or found prepared) on every host of this run.
_READY = set()


def get_builder(name, data_dir=None, download=True):
  """A prepared TFDS builder for `name`, preparing it (offline where possible) if needed.

  The first call for a dataset is a step every host takes together (process 0 prepares, the others
  wait at a barrier); later calls only open it, so one host alone may make them (the start-up
  summary on process 0).
  """
  data_dir = data_dir or default_data_dir()
  if (name, data_dir) in _READY:
    return tfds.builder(name, data_dir=data_dir)
  _known_builder(name, data_dir)  # only to name an unknown dataset before any barrier
  # Process 0 prepares a shared data_dir once; the other hosts then open it (or prepare their own
  # copy when data_dir is not shared).
  builder = distributed.process_0_first(lambda: _prepared(name, data_dir, download))
  _READY.add((name, data_dir))
  return builder


def _known_builder(name, data_dir):
  """The (maybe unprepared) TFDS builder of `name`; DatasetError naming near misses when TFDS
  has no such dataset. Creates nothing."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
    hint = f' Did you mean {" or ".join(repr(c) for c in close)}?' if close else ''
    raise errors.DatasetError(f'Unknown dataset {name!r} (config.data.name).{hint} Use any TFDS '
                              'dataset name, e.g. fashion_mnist, cifar10, imagenette, '
                              f'imagenet2012, or for an image folder its path, e.g. ./{name}.'
                              ) from e


def check_prepared(config):
  """DatasetError unless config.data is an image folder or a prepared TFDS dataset, creating
  nothing: `--dry_run` calls it so that it never downloads, prepares or makes directories."""
  name = config.data.name
  if is_folder(name):
    return
  data_dir = config.data.data_dir or default_data_dir()
  if (name, data_dir) in _READY or _known_builder(name, data_dir).is_prepared():
    return
  base_name = name.split(':')[0].split('/')[0]
  raise errors.DatasetError(
      f'Dataset {name!r} is not prepared under {data_dir}, and --dry_run prepares nothing (it '
      'writes nothing). Run the command once without --dry_run to prepare it (downloading it '
      f'when config.data.download), or prepare it with `tfds build {base_name} '
      f'--data_dir={data_dir}`.')


def _prepared(name, data_dir, download):
  """The builder for `name`, prepared first if it is not."""
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  base_name = name.split(':')[0].split('/')[0]
  if base_name == 'fashion_mnist' and _local_fashion_mnist_available():
    local = LocalFashionMNIST(data_dir=data_dir)
    local.download_and_prepare()
    return tfds.builder(name, data_dir=data_dir)
  if not download:
    raise errors.DatasetError(
        f'Dataset {name!r} is not prepared under {data_dir} and config.data.download is False. '
        f'Prepare it with `tfds build {base_name} --data_dir={data_dir}` (datasets with manual '
        'downloads such as imagenet2012 need their files placed in the manual_dir first), or set '
        '--config.data.data_dir to where it is prepared.')
  try:
    builder.download_and_prepare()
  except Exception as e:  # network or manual-download failures, surfaced with the fix
    raise errors.DatasetError(
        f'Could not download and prepare dataset {name!r} into {data_dir}: {e}\n'
        'On a machine without internet, prepare it elsewhere and point --config.data.data_dir at '
        'the prepared copy; for fashion_mnist, install the Debian package dataset-fashion-mnist.'
    ) from e
  return builder


def is_folder(name):
  """True when config.data.name is a path (to an image folder) rather than a TFDS name: absolute,
  ./ ../ or ~ relative, or an existing directory that no TFDS dataset is named after (TFDS names
  such as 'imagenet2012_subset/1pct' have slashes too)."""
  return name.startswith(('/', './', '../', '~')) or (
      os.path.isdir(name) and not _is_tfds_name(name))


@functools.lru_cache(maxsize=None)
def _is_tfds_name(name):
  return name.split(':')[0].split('/')[0] in tfds.list_builders(with_community_datasets=False)


def check_folder(name):
  """Fails, naming the fix, when config.data.name is a path but no folder is there."""
  if is_folder(name) and not os.path.isdir(os.path.expanduser(name)):
    raise errors.DatasetError(f'Image folder {name!r} (config.data.name) does not exist; give the '
                              'path of a folder of images or of class subfolders.')


class FolderSplit:
  """One split of an image folder: sorted file paths, int labels (None for a flat folder) and
  the class names (label i is class_names[i]; empty for a flat folder)."""

  def __init__(self, paths, labels, class_names):
    self.paths, self.labels, self.class_names = paths, labels, class_names


def _readable(path):
  """True if `path` starts like a JPEG, PNG, BMP or GIF file (a cheap check: no decoding)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(8)
  except OSError:
    return False
  return any(head.startswith(m) for m in _MAGIC)


def _list_images(directory):
  """(sorted image paths under `directory`, skipped paths): files with an image extension whose
  first bytes are an image's; other files are skipped. Hidden files are ignored."""
  candidates = []
  for parent, dirs, files in os.walk(directory, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    candidates += [os.path.join(parent, f) for f in files if not f.startswith('.')]
  candidates.sort()
  with concurrent.futures.ThreadPoolExecutor(32) as pool:  # I/O bound: many small reads
    ok = list(pool.map(_readable, candidates))
  good = [p for p, k in zip(candidates, ok) if k and p.lower().endswith(IMAGE_EXTENSIONS)]
  skipped = sorted(set(candidates) - set(good))
  return good, skipped


def _warn_skipped(directory, skipped):
  if skipped:
    examples = ', '.join(os.path.relpath(p, directory) for p in skipped[:3])
    warnings.warn(f'{len(skipped)} file(s) in {directory} are not readable JPEG/PNG/BMP/GIF images '
                  f'and are skipped (e.g. {examples}).', stacklevel=3)


@functools.lru_cache(maxsize=16)  # each folder is listed (and warned about) once per process
def _scan(directory, class_names=None):
  """FolderSplit of `directory`: labelled by its class subfolders if it has any, else flat."""
  subdirs = sorted(e.name for e in os.scandir(directory)
                   if e.is_dir() and not e.name.startswith('.'))
  if not subdirs:
    paths, skipped = _list_images(directory)
    _warn_skipped(directory, skipped)
    return FolderSplit(paths, None, ())
  class_names = class_names or tuple(subdirs)
  unknown = sorted(set(subdirs) - set(class_names))
  if unknown:
    raise errors.DatasetError(f'{directory} has class folders {unknown[:5]} that the training '
                              'split lacks; give every split the same class folders.')
  paths, labels, skipped = [], [], []
  for label, name in enumerate(class_names):
    if name in subdirs:
      good, bad = _list_images(os.path.join(directory, name))
      paths += good
      labels += [label] * len(good)
      skipped += bad
  loose = [e.path for e in os.scandir(directory) if e.is_file() and not e.name.startswith('.')]
  _warn_skipped(directory, skipped + sorted(loose))
  return FolderSplit(paths, np.asarray(labels, np.int64), class_names)


def _split_slice(split):
  """('train', (start, stop)) from 'train', 'train[:1000]', 'train[10:20]' or 'train[:90%]'
  (TFDS's syntax; `_bound` turns each into an index)."""
  match = re.fullmatch(r'(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?', split)
  if not match:
    raise errors.DatasetError(f'Split {split!r} of an image folder must be a name, optionally with '
                              'a slice such as train[:1000] or train[:90%].')
  name, start, stop = match.groups()
  return name, (start, stop)


def _bound(text, size):
  """A slice bound of `_split_slice` as an index into `size` images (a percentage rounded)."""
  if not text:
    return None
  return round(int(text[:-1]) * size / 100) if text.endswith('%') else int(text)


def _hash(root, path):
  """A fixed pseudo-random number of a file's path below `root`: the same on every machine."""
  return zlib.crc32(os.path.relpath(path, root).encode())


def _holdout_mask(root, split, fraction, min_per_class):
  """True for the images of a single-split folder held out for evaluation: in each class (the whole
  folder when flat), the max(fraction of its images, min_per_class) with the lowest path hashes,
  always leaving one to train on, so every class is both trained on and evaluated."""
  labels = np.zeros(len(split.paths), np.int64) if split.labels is None else split.labels
  hashes = np.asarray([_hash(root, p) for p in split.paths], np.int64)
  held = np.zeros(len(split.paths), bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = min(max(int(np.ceil(fraction * len(members))), min_per_class), len(members) - 1)
    held[members[np.argsort(hashes[members], kind='stable')[:max(count, 0)]]] = True
  return held


def _shuffled(root, split):
  """`split` with its files in a fixed mixed order: each class's files in path-hash order, the
  classes interleaved in proportion to their sizes, so that any slice (train[:1000]) and every
  host's strided part hold every class in its share."""
  labels = np.zeros(len(split.paths), np.int64) if split.labels is None else split.labels
  hashes = np.asarray([_hash(root, p) for p in split.paths], np.int64)
  place = np.zeros(len(split.paths))
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    ranked = members[np.argsort(hashes[members], kind='stable')]
    place[ranked] = (np.arange(len(ranked)) + 0.5) / len(ranked)
  order = np.lexsort((hashes, place))
  return FolderSplit([split.paths[i] for i in order],
                     None if split.labels is None else split.labels[order], split.class_names)


def folder_split(root, split, holdout, holdout_min=0):
  """The FolderSplit that `split` names in the image folder `root`, files in a fixed shuffled
  order.

  A folder with a `train/` subfolder is split by folder: 'train' reads train/, any other name
  reads the first of val/, validation/, test/ present. Any other folder is one pool of images; in
  each class max(`holdout` of its images, `holdout_min`) form every non-'train' split.
  """
  check_folder(root)
  root = os.path.expanduser(root)
  name, part = _split_slice(split)
  if os.path.isdir(os.path.join(root, 'train')):
    train = _scan(os.path.join(root, 'train'))
    if name == 'train':
      result = train
    else:
      found = [f for f in EVAL_FOLDERS if os.path.isdir(os.path.join(root, f))]
      if not found:
        raise errors.DatasetError(f'{root} has train/ but none of {"/, ".join(EVAL_FOLDERS)}/ for '
                                  f'split {split!r}; add one, or set config.data.eval_split=train.')
      result = _scan(os.path.join(root, found[0]), train.class_names or None)
  else:
    pool = _scan(root)
    held = _holdout_mask(root, pool, holdout, holdout_min)
    keep = ~held if name == 'train' else held
    if not keep.any():
      raise errors.DatasetError(
          f'Split {split!r} of {root} is empty (config.data.folder_holdout={holdout}, '
          f'folder_holdout_min={holdout_min}, {len(pool.paths)} images); raise them, add images, '
          'or add train/ and val/ folders.')
    labels = None if pool.labels is None else pool.labels[keep]
    result = FolderSplit([p for p, k in zip(pool.paths, keep) if k], labels, pool.class_names)
  if not result.paths:
    raise errors.DatasetError(f'No readable images for split {split!r} in {root}.')
  result = _shuffled(root, result)
  part = slice(*(_bound(b, len(result.paths)) for b in part))
  labels = None if result.labels is None else result.labels[part]
  return FolderSplit(result.paths[part], labels, result.class_names)


def config_split(config, split):
  """The FolderSplit that `split` names in the image folder config.data.name, held out as
  config.data.folder_holdout / folder_holdout_min say."""
  return folder_split(config.data.name, split, config.data.folder_holdout,
                      config.data.folder_holdout_min)


def write_labels(config, workdir):
  """Writes WORKDIR/labels.txt (class name of label i on line i) for a labelled image folder."""
  if not is_folder(config.data.name):
    return
  names = config_split(config, config.data.train_split).class_names
  if names:
    workdir_io.write_atomic(workdir_io.path(workdir, LABELS_FILE), ''.join(n + '\n' for n in names))
