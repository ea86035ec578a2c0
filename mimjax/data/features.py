"""The augmentations of `mimjax.data.augment`, the image features each yields, and the check of the
`config.data` fields, importable without TensorFlow: config checks and the benchmark read it on
machines that have no TensorFlow."""
import math
import os

from mimjax import errors

# Every name `augment.register`s (tests/test_data.py keeps the two equal).
NAMES = ('rrc_flip', 'deit', 'center', 'lut_two_view', 'beit', 'simmim')
TWO_VIEW = ('lut_two_view',)  # augmentations that return a second view, `image2`


def outputs(augment_name):
  """('image',) or ('image', 'image2') for the augmentation `augment_name`."""
  return ('image', 'image2') if augment_name in TWO_VIEW else ('image',)


def check_config(config):
  """The `config.data` fields the input pipeline reads, before any data is opened."""
  d = config.data
  errors.require_choice('data.augment', d.augment, NAMES)
  errors.require(d.channels in (1, 3), 'data.channels', d.channels,
                 'use 3 (grayscale images are replicated) or 1')
  for key in ('mean', 'std'):
    values = tuple(d[key])
    errors.require(len(values) == d.channels and all(map(math.isfinite, values)), f'data.{key}',
                   values, f'give {d.channels} finite numbers, one per channel (data.channels)')
  errors.require(min(d.std) > 0, 'data.std', tuple(d.std), 'every value must be positive')
  lo, hi = (tuple(d.crop_scale) + (math.nan, math.nan))[:2]
  errors.require(len(d.crop_scale) == 2 and 0 < lo <= hi <= 1, 'data.crop_scale',
                 tuple(d.crop_scale), 'give (min, max) area fractions with 0 < min <= max <= 1')
  errors.require(d.randaug_layers >= 0, 'data.randaug_layers', d.randaug_layers,
                 'use >= 0 (0 = off)')
  errors.require(0 <= d.randaug_magnitude <= 10, 'data.randaug_magnitude', d.randaug_magnitude,
                 "use timm's scale, 0 to 10")
  errors.require(d.randaug_magnitude_std >= 0, 'data.randaug_magnitude_std',
                 d.randaug_magnitude_std, 'use >= 0 (0 = a fixed magnitude)')
  errors.require(0 <= d.random_erase <= 1, 'data.random_erase', d.random_erase,
                 'use a probability in [0, 1]')
  errors.require(d.repeated_aug >= 1, 'data.repeated_aug', d.repeated_aug, 'use >= 1 (1 = off)')
  errors.require(0 < d.eval_crop_fraction <= 1, 'data.eval_crop_fraction', d.eval_crop_fraction,
                 'use a fraction in (0, 1] (1 = resize only)')
  errors.require(d.shuffle_buffer >= 1, 'data.shuffle_buffer', d.shuffle_buffer,
                 'use a positive number of examples (1 = no shuffling)')
  errors.require(0 <= d.folder_holdout < 1, 'data.folder_holdout', d.folder_holdout,
                 'use a fraction in [0, 1)')
  errors.require(d.folder_holdout_min >= 0, 'data.folder_holdout_min', d.folder_holdout_min,
                 'use a number of images per class >= 0 (0 = the fraction alone)')
  errors.require(0 <= d.label_fraction <= 1, 'data.label_fraction', d.label_fraction,
                 'use a fraction in [0, 1] (0 = every image of data.train_split)')
  errors.require(d.threads >= 0, 'data.threads', d.threads, 'use >= 0 (0 = all cores)')
  for key in ('name', 'train_split', 'eval_split'):
    errors.require(bool(d[key]), f'data.{key}', d[key], 'must not be empty')
  if d.data_dir and '://' not in d.data_dir:
    errors.require(os.path.isdir(d.data_dir), 'data.data_dir', d.data_dir,
                   'no such directory; give the directory that holds the prepared TFDS datasets '
                   '(it is never created), or leave it unset for ~/tensorflow_datasets')
