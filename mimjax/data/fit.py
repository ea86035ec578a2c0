"""Fits a recipe's data-dependent settings to the data a run reads, so any shipped recipe runs on
a small image folder the first time.

Recipes size the kNN monitor and the linear probe, and set the normalisation, for their own dataset
(runlocal: Fashion-MNIST). `fit` lowers monitor sizes that exceed the splits, gives an image folder
linear-probe splits and a probe batch that it holds, a classifier one output per class, and
measures the folder's mean and std; the trainer and `mimjax.evaluate` print what it changed as
one note.
"""
import math

import numpy as np
from PIL import Image

from mimjax import errors
from mimjax.data import pipeline
from mimjax.data import sources

STATS_IMAGES = 1000  # images whose pixels give an image folder's mean and std
_STATS_SIDE = 32  # each is shrunk to this side first, so every image weighs the same


def folder_stats(config):
  """(mean, std) per channel in [0, 1], rounded to 3 decimals, of the first STATS_IMAGES images of
  the folder's training split (a class mix: folder files are in a shuffled order)."""
  mode = 'RGB' if config.data.channels == 3 else 'L'
  sums, squares, count = 0.0, 0.0, 0
  for path in sources.config_split(config, config.data.train_split).paths[:STATS_IMAGES]:
    try:
      with Image.open(path) as image:
        image.draft(mode, (_STATS_SIDE, _STATS_SIDE))  # JPEG: decode at a reduced scale
        pixels = np.asarray(image.convert(mode).resize((_STATS_SIDE, _STATS_SIDE)), np.float64)
    except OSError:  # undecodable files are skipped by the pipeline too
      continue
    pixels = pixels.reshape(-1, config.data.channels) / 255.0
    sums, squares, count = sums + pixels.sum(0), squares + (pixels ** 2).sum(0), count + len(pixels)
  if not count:
    raise errors.DatasetError(f'None of the images of {config.data.name} decode; check the files.')
  mean = sums / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 1e-6))
  return tuple(round(float(m), 3) for m in mean), tuple(round(float(s), 3) for s in std)


def _size(config, split):
  """Images in `split` of config.data (0 when the split is empty)."""
  try:
    return pipeline.num_examples(config, split)
  except errors.DatasetError:
    if sources.is_folder(config.data.name):
      return 0
    raise


def fit(config, training=True, knn_monitor=False):
  """Changes `config` in place to fit its data; returns the changes as 'key old -> new' strings.

  `training` also fits what only training reads: the kNN monitor's sizes (when the monitor runs:
  `knn_monitor`, it is one of the run's in-loop evaluators, and config.eval.every_steps > 0),
  an image folder's mean and std (data.folder_stats) and a classifier head's size (one output per
  class folder). Evaluation keeps the model and statistics the run was trained with.
  """
  changes = []

  def change(parent, key, value, prefix):
    if parent[key] != value:
      changes.append(f'{prefix}.{key} {parent[key]!r} -> {value!r}')
      parent[key] = value

  data, monitor, lin = config.data, config.eval.knn_monitor, config.eval.linear
  folder = sources.is_folder(data.name)
  if training and folder and data.folder_stats:
    mean, std = folder_stats(config)
    change(data, 'mean', mean, 'data')
    change(data, 'std', std, 'data')
  if training and knn_monitor and config.eval.every_steps:
    change(monitor, 'bank_examples', min(monitor.bank_examples, _size(config, data.train_split)),
           'eval.knn_monitor')
    change(monitor, 'query_examples', min(monitor.query_examples, _size(config, data.eval_split)),
           'eval.knn_monitor')
    change(monitor, 'k', min(monitor.k, monitor.bank_examples), 'eval.knn_monitor')
  classes = len(sources.config_split(config, data.train_split).class_names) if folder else 0
  if training and classes and config.model.num_classes:  # a classifier's head: one per class
    change(config.model, 'num_classes', classes, 'model')
  if classes:  # the linear probe needs labels
    base = data.train_split.split('[')[0]
    total = _size(config, base)
    if not _size(config, lin.train_split) or not _size(config, lin.holdout_split):
      held = min(max(1, math.ceil(data.folder_holdout * total)), total - 1)
      change(lin, 'train_split', f'{base}[:{total - held}]', 'eval.linear')
      change(lin, 'holdout_split', f'{base}[{total - held}:]', 'eval.linear')
    probe = _size(config, lin.train_split)
    if lin.batch_size > probe:  # a power of two, so that it still divides over the devices
      change(lin, 'batch_size', 2 ** int(math.log2(max(probe, 1))), 'eval.linear')
  return changes


def note(changes, data_name):
  """The one console line that reports `fit`'s changes ('' when there are none)."""
  if not changes:
    return ''
  return f'note: fitted to the data of {data_name}: {", ".join(changes)}'
