"""Dataset sources: any TFDS dataset by name, with Fashion-MNIST preparable offline.

Debian's `dataset-fashion-mnist` package ships the original Fashion-MNIST files. When they are
present and TFDS has not prepared `fashion_mnist` yet, we prepare it from those files with TFDS's own
builder (same name, version and features), so the rest of mimjax reads it exactly as it would read a
copy TFDS downloaded itself.
"""
import difflib
import gzip
import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from mimjax import distributed
from mimjax import errors

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = {
    'train_data': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_data': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}



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
    raise errors.DatasetError(f'{path} holds {array.size} values, expected {expected}: the file is '
                              'truncated or not the Fashion-MNIST file; reinstall dataset-fashion-mnist.')
  return array.reshape((num_items,) + tuple(item_shape))


def default_data_dir():
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def _local_fashion_mnist_available(source_dir=DEBIAN_FASHION_MNIST_DIR):
  return all(os.path.exists(os.path.join(source_dir, f)) for f in _FASHION_MNIST_FILES.values())


def get_builder(name, data_dir=None, download=True):
  """A prepared TFDS builder for `name`, preparing it (offline where possible) if needed."""
  data_dir = data_dir or default_data_dir()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
    hint = f' Did you mean {" or ".join(repr(c) for c in close)}?' if close else ''
    raise errors.DatasetError(f'Unknown dataset {name!r} (config.data.name).{hint} Use any TFDS dataset '
                              'name, e.g. fashion_mnist, cifar10, imagenette, imagenet2012.') from e
  # Process 0 prepares a shared data_dir once; the other hosts then open it (or prepare their own
  # copy when data_dir is not shared).
  return distributed.process_0_first(lambda: _prepared(name, data_dir, download))


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
