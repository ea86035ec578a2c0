"""Image augmentations as stateless tf.data ops.

Every random op takes an explicit `seed` (int32/int64 [2]) derived from the run seed and the
example's position in the stream, so a resumed run sees exactly the augmentations the uninterrupted
run would have seen. An augmentation maps a decoded uint8 image [h, w, c] to a dict of features.
"""
import tensorflow as tf

AUGMENTATIONS = {}


def register(name):
  def wrap(fn):
    AUGMENTATIONS[name] = fn
    return fn
  return wrap


def to_channels(image, channels):
  """Replicates a grayscale image to `channels` (3) or checks the channel count matches."""
  if channels == 3 and image.shape[-1] == 1:
    return tf.image.grayscale_to_rgb(image)
  return image


def normalize(image, data_config):
  """uint8/float pixels in [0, 255] -> float32 standardised with the config's mean and std."""
  image = tf.cast(image, tf.float32) / 255.0
  mean = tf.constant(data_config.mean, tf.float32)
  std = tf.constant(data_config.std, tf.float32)
  return (image - mean) / std


def resize(image, size):
  """Bicubic resize to [size, size] with values clipped back to the pixel range."""
  image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method='bicubic')
  return tf.clip_by_value(image, 0.0, 255.0)


def random_resized_crop(image, seed, size, scale, ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop: a random box of `scale` area and `ratio` aspect, resized."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      area_range=scale, aspect_ratio_range=ratio, max_attempts=10,
      use_image_if_no_bounding_boxes=True, min_object_covered=0.0)
  crop = tf.slice(image, begin, crop_size)
  return resize(crop, size)


def center_crop(image, size, crop_fraction):
  """Resize the short side to size / crop_fraction, then take the central size x size crop."""
  if crop_fraction == 1.0 and tuple(image.shape[:2]) == (size, size):
    return tf.cast(image, tf.float32)  # already the evaluation size: no resampling
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  short = tf.cast(tf.math.ceil(size / crop_fraction), tf.float32)
  scale = short / tf.minimum(h, w)
  new_h = tf.cast(tf.round(h * scale), tf.int32)
  new_w = tf.cast(tf.round(w * scale), tf.int32)
  image = tf.clip_by_value(tf.image.resize(tf.cast(image, tf.float32), (new_h, new_w),
                                           method='bicubic'), 0.0, 255.0)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return image[top:top + size, left:left + size]


@register('rrc_flip')
def rrc_flip(image, seed, data_config):
  """MAE's pre-training augmentation: random-resized-crop (bicubic) and horizontal flip."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = to_channels(image, data_config.channels)
  image = random_resized_crop(image, crop_seed, data_config.image_size,
                              tuple(data_config.crop_scale))
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return {'image': normalize(image, data_config)}


@register('center')
def center(image, seed, data_config):
  """Deterministic evaluation view: resize and central crop (no randomness)."""
  del seed
  image = to_channels(image, data_config.channels)
  image = center_crop(image, data_config.image_size, data_config.eval_crop_fraction)
  return {'image': normalize(image, data_config)}
