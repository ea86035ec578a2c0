"""Image augmentations as stateless tf.data ops.

Every random op takes an explicit `seed` (int32/int64 [2]) derived from the run seed and the
example's position in the stream, so a resumed run sees exactly the augmentations the uninterrupted
run would have seen. An augmentation maps an image to a dict of features; the image is either a
decoded uint8 tensor [h, w, c] or still `Encoded`, so that random-resized-crop decodes only the crop
window of a JPEG (`tf.image.decode_and_crop_jpeg`) instead of the whole picture.
"""
import math
from typing import NamedTuple

import tensorflow as tf

from mimjax.data import features
from mimjax.data import ops
from mimjax.data import randaugment

AUGMENTATIONS = {}
OUTPUTS = {}  # name -> the image features it returns, e.g. ('image', 'image2') for two views


def register(name):
  def wrap(fn):
    AUGMENTATIONS[name] = fn
    OUTPUTS[name] = features.outputs(name)
    return fn
  return wrap


class Encoded(NamedTuple):
  """Encoded image bytes (JPEG, PNG, BMP or GIF: a scalar tf.string) and the decoded shape
  (h, w, channels), h and w None where images differ in size."""
  data: tf.Tensor
  shape: tuple

  @property
  def channels(self):
    return self.shape[-1]


def decode(image):
  """uint8 [h, w, channels] pixels of an `Encoded` image (grayscale, CMYK and alpha converted by
  the decoder); a decoded tensor is returned as it is."""
  if not isinstance(image, Encoded):
    return image
  pixels = tf.io.decode_image(image.data, channels=image.channels, expand_animations=False)
  pixels.set_shape(image.shape)
  return pixels


def to_channels(image, channels):
  """Replicates a grayscale image to `channels` (3) or checks the channel count matches."""
  if channels == 3 and image.shape[-1] == 1:
    return tf.image.grayscale_to_rgb(image)
  return image


def normalize(image, data_config):
  """uint8/float pixels in [0, 255] -> float32 standardised with the config's mean and std.

  Computed as x * (1 / (255 std)) - mean / std on rows of w * c values (the per-channel constants
  tiled along the row): broadcasting a 3-vector over the last axis is several times slower on
  CPU and was the largest per-image cost after decoding and resizing.
  """
  shape = tf.shape(image)
  std = tf.constant(data_config.std, tf.float32)
  scale = tf.tile(1.0 / (255.0 * std), shape[-2:-1])
  offset = tf.tile(-tf.constant(data_config.mean, tf.float32) / std, shape[-2:-1])
  rows = tf.reshape(tf.cast(image, tf.float32), tf.concat([shape[:-2], [-1]], 0))
  return tf.reshape(rows * scale + offset, shape)


def _cubic(x, a=-0.5):
  """Keys' cubic convolution kernel with a = -0.5: PIL's (and tf.image's) bicubic filter."""
  x = tf.abs(x)
  return tf.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  tf.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def _triangle(x):
  """The bilinear (tent) filter."""
  return tf.maximum(1.0 - tf.abs(x), 0.0)


_FILTERS = {'bicubic': (_cubic, 2.0), 'bilinear': (_triangle, 1.0)}  # filter, support (pixels)
_BLOCK = 16  # output pixels per band of the resampling matrix (the fastest of 8, 16, 32 measured)


def _bands(in_sizes, out_sizes, method, flip):
  """Banded resampling matrices of both axes of a resize, as PIL computes its filter taps.

  Output pixel i of an axis of n input pixels resized to m samples the input around its centre
  c = (i + 0.5) n / m with the filter stretched by s = max(n / m, 1) (the antialiasing when
  shrinking): weights filter((x + 0.5 - c) / s) over the pixels x within support * s of c,
  normalised to sum 1. `flip` (a bool scalar) reverses the second axis's output (a horizontal
  flip at no cost). Output pixels come in bands of _BLOCK consecutive ones, each band reading one
  window of input pixels, so a band is a small dense matrix product instead of a full-size one.

  Returns (first, weights): first [2, bands] the first input pixel of each band's window and
  weights [2, bands, _BLOCK, window] float32, for as many bands as the longer output needs
  (outputs past an axis's size are computed but not used).
  """
  kernel, support = _FILTERS[method]
  in_f = tf.cast(in_sizes, tf.float32)[:, None]
  out_f = tf.cast(out_sizes, tf.float32)[:, None]
  scale = in_f / out_f
  stretch = tf.maximum(scale, 1.0)
  reach = support * stretch
  bands = (tf.reduce_max(out_sizes) + _BLOCK - 1) // _BLOCK
  i = tf.range(bands * _BLOCK, dtype=tf.float32)[None]
  i = tf.where(tf.stack([False, flip])[:, None], out_f - 1.0 - i, i)
  center = tf.clip_by_value((i + 0.5) * scale, 0.0, in_f)  # [2, outputs]
  # PIL's taps: x in [int(c - reach + 0.5), int(c + reach + 0.5)), within the image.
  low = tf.maximum(tf.cast(center - reach + 0.5, tf.int32), 0)
  high = tf.minimum(tf.cast(center + reach + 0.5, tf.int32), tf.cast(in_sizes, tf.int32)[:, None])
  low = tf.reshape(low, [2, bands, _BLOCK, 1])
  high = tf.reshape(high, [2, bands, _BLOCK, 1])
  first = tf.reduce_min(low, [2, 3])
  window = tf.reduce_max(tf.reduce_max(high, [2, 3]) - first)  # the widest band's
  x = first[:, :, None, None] + tf.range(window)  # [2, bands, 1, window]
  taps = kernel((tf.cast(x, tf.float32) + 0.5 - tf.reshape(center, [2, bands, _BLOCK, 1]))
                / stretch[:, :, None, None])
  taps = tf.where((x >= low) & (x < high), taps, 0.0)
  return first, tf.math.divide_no_nan(taps, tf.reduce_sum(taps, -1, keepdims=True))


def _resample_rows(image, first, weights, size):
  """Resamples axis 0 of float `image` [n, m, c] to `size` rows with the bands of `_bands`."""
  shape = tf.shape(image)
  bands = (size + _BLOCK - 1) // _BLOCK
  window = tf.shape(weights)[-1]
  # A narrower band's window runs past its taps (weight 0), perhaps past the image: clamped.
  rows = tf.gather(image, tf.minimum(first[:bands, None] + tf.range(window), shape[0] - 1))
  rows = tf.reshape(rows, [bands, window, shape[1] * shape[2]])
  out = tf.matmul(weights[:bands], rows)  # [bands, _BLOCK, m * c]
  return tf.reshape(out, [bands * _BLOCK, shape[1], shape[2]])[:size]


def resize(image, size, method='bicubic', flip=False):
  """Resize to `size` (an int for size x size, or (height, width), maybe tensors), bicubic or
  bilinear, antialiased when shrinking as PIL's resize (and so torchvision's on PIL images) is;
  float32 values clipped back to the pixel range. `flip` (bool scalar) also mirrors it
  horizontally, free of cost.

  The same resampling as tf.image.resize(antialias=True) (the same filters, within float32
  rounding), computed as banded matrix products: 1.4-3x faster on CPU (BENCHMARKS.md, Input).
  """
  height, width = (size, size) if isinstance(size, int) else size
  shape = tf.shape(image)
  first, weights = _bands(tf.stack([shape[0], shape[1]]), tf.stack([height, width]), method,
                          tf.convert_to_tensor(flip))
  image = _resample_rows(tf.cast(image, tf.float32), first[0], weights[0], height)
  image = _resample_rows(tf.transpose(image, [1, 0, 2]), first[1], weights[1], width)
  image = tf.transpose(image, [1, 0, 2])
  if isinstance(height, int) and isinstance(width, int):
    image.set_shape([height, width, None])
  return tf.clip_by_value(image, 0.0, 255.0)


def _crop_box(shape, seed, scale, ratio, attempts=10):
  """(begin, size) of torchvision's RandomResizedCrop box in an image of `shape` [h, w, c].

  Up to `attempts` draws of an area fraction uniform in `scale` and an aspect ratio log-uniform in
  `ratio`; the first box that fits is placed uniformly. When none fits, the central crop of the
  whole image with its aspect clamped into `ratio` (torchvision's fallback).
  """
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  area = tf.random.stateless_uniform([attempts], area_seed, *scale) * h * w
  aspect = tf.exp(tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]),
                                              math.log(ratio[1])))
  box_w = tf.round(tf.sqrt(area * aspect))
  box_h = tf.round(tf.sqrt(area / aspect))
  fits = (box_w > 0) & (box_w <= w) & (box_h > 0) & (box_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  in_ratio = w / h
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  found = tf.reduce_any(fits)
  crop_h = tf.cast(tf.where(found, box_h[first], fallback_h), tf.int32)
  crop_w = tf.cast(tf.where(found, box_w[first], fallback_w), tf.int32)
  h, w = tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)
  top = tf.where(found, tf.random.stateless_uniform([], top_seed, 0, h - crop_h + 1, tf.int32),
                 (h - crop_h) // 2)
  left = tf.where(found, tf.random.stateless_uniform([], left_seed, 0, w - crop_w + 1, tf.int32),
                  (w - crop_w) // 2)
  return tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1])


def _crop(image, seed, scale, ratio):
  """The random box of a decoded image, or of an `Encoded` one decoding only the box if a JPEG.

  The box depends only on the image's shape and the seed, so both paths crop the same pixels.
  """
  if not isinstance(image, Encoded):
    begin, crop_size = _crop_box(tf.shape(image), seed, scale, ratio)
    crop = tf.slice(image, begin, crop_size)
    # tf.slice with a tensor size forgets the channels.
    crop.set_shape([None, None, image.shape[-1]])
    return crop

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image.data)
    shape = tf.concat([shape[:2], [image.channels]], 0)
    begin, crop_size = _crop_box(shape, seed, scale, ratio)
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    return tf.image.decode_and_crop_jpeg(image.data, window, channels=image.channels)

  crop = tf.cond(tf.io.is_jpeg(image.data), jpeg, lambda: _crop(decode(image), seed, scale, ratio))
  crop.set_shape([None, None, image.channels])
  return crop


def random_resized_crop(image, seed, size, scale, ratio=(3 / 4, 4 / 3), method='bicubic',
                        flip=False):
  """torchvision's RandomResizedCrop: a random box of `scale` area and `ratio` aspect, resized;
  mirrored horizontally if `flip` (a bool scalar), within the resize."""
  return resize(_crop(image, seed, scale, ratio), size, method, flip)


def random_flip(seed):
  """Whether to flip horizontally (probability 1/2): the draw tf.image.stateless_random_flip_
  left_right makes with `seed`, for a flip done inside the resize."""
  return tf.random.stateless_uniform([], seed, 0.0, 1.0) < 0.5


def resize_short_side(image, short):
  """Bicubic resize keeping the aspect ratio so that the shorter side is `short` pixels
  (antialiased when shrinking, as PIL)."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = tf.cast(short, tf.float32) / tf.minimum(h, w)
  new_h = tf.cast(tf.round(h * scale), tf.int32)
  new_w = tf.cast(tf.round(w * scale), tf.int32)
  return resize(image, (new_h, new_w))


def center_crop(image, size, crop_fraction):
  """Resize the short side to size / crop_fraction, then take the central size x size crop."""
  if crop_fraction == 1.0 and tuple(image.shape[:2]) == (size, size):
    return tf.cast(image, tf.float32)  # already the evaluation size: no resampling
  image = resize_short_side(image, tf.math.ceil(size / crop_fraction))
  shape = tf.shape(image)
  top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def _pad_reflect(image, padding):
  """`image` reflect-padded by `padding` pixels on each side (the edge pixel not repeated)."""
  return tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode='REFLECT')


def _random_crop_flip(padded, seed, size):
  """A random size x size crop of `padded` and a random horizontal flip (tf.image's draws)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = tf.image.stateless_random_crop(padded, [size, size, padded.shape[-1]], crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def simple_resized_crop(image, seed, size, padding=4):
  """DeiT III's "simple resized crop": short side to `size`, a random size x size crop of the image
  reflect-padded by `padding` pixels, random horizontal flip. Unlike random-resized-crop, every
  view keeps the scale and (nearly) all the content of the image."""
  return _random_crop_flip(_pad_reflect(resize_short_side(image, size), padding), seed, size)


def _luma(image):
  """[h, w, 1] ITU-R 601 luma of an RGB image (as torchvision/PIL grayscale); 1 channel as is."""
  return ops.luma(image) if image.shape[-1] == 3 else image


def _blend(image, other, factor):
  """factor * image + (1 - factor) * other, clipped to the pixel range (torchvision's _blend)."""
  return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def adjust_brightness(image, factor):
  """torchvision's adjust_brightness: scales the pixels by `factor` (its blend with black)."""
  return tf.clip_by_value(factor * image, 0.0, 255.0)


def adjust_contrast(image, factor):
  """torchvision's adjust_contrast: blends with the image's mean luma."""
  return _blend(image, tf.reduce_mean(_luma(image)), factor)


def adjust_saturation(image, factor):
  """torchvision's adjust_saturation: blends with the per-pixel luma (RGB only)."""
  return _blend(image, _luma(image), factor) if image.shape[-1] == 3 else image


def adjust_hue(image, delta):
  """Rotates the hue of RGB pixels in [0, 255] by `delta` turns."""
  if image.shape[-1] != 3:
    return image
  return tf.clip_by_value(tf.image.adjust_hue(image / 255.0, delta) * 255.0, 0.0, 255.0)


def color_jitter(image, seed, brightness, contrast, saturation, hue):
  """torchvision's ColorJitter on float pixels in [0, 255]: the four adjustments in random order,
  factors uniform in [1 - x, 1 + x] (hue: shift uniform in [-hue, hue] turns). As torchvision, an
  adjustment of strength 0 is skipped (hue 0 leaves the pixels untouched)."""
  order_seed, b_seed, c_seed, s_seed, h_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  uniform = lambda s, x: tf.random.stateless_uniform([], s, 1.0 - x, 1.0 + x)  # noqa: E731
  adjustments = [
      (adjust_brightness, uniform(b_seed, brightness)),
      (adjust_contrast, uniform(c_seed, contrast)),
      (adjust_saturation, uniform(s_seed, saturation)),
      (adjust_hue, tf.random.stateless_uniform([], h_seed, -hue, hue)),
  ]
  adjustments = [a for a, strength in zip(adjustments, (brightness, contrast, saturation, hue))
                 if strength]
  order = tf.argsort(tf.random.stateless_uniform([len(adjustments)], order_seed))
  for i in range(len(adjustments)):
    image = tf.switch_case(order[i], [lambda op=op, v=v: op(image, v) for op, v in adjustments])
  return image


def grayscale(image):
  """torchvision's Grayscale with as many output channels as input channels."""
  return tf.broadcast_to(_luma(image), tf.shape(image))


def solarize(image, threshold=128.0):
  """PIL's ImageOps.solarize: pixels at or above `threshold` are inverted."""
  return ops.select(image >= threshold, 255.0 - image, image)


def gaussian_blur(image, sigma, radius):
  """Separable Gaussian blur with standard deviation `sigma` (a scalar tensor), a kernel of
  2 * radius + 1 taps and reflect padding."""
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * (x / sigma) ** 2)
  kernel /= tf.reduce_sum(kernel)
  channels = image.shape[-1]
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], 'REFLECT')
  rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], 'VALID')
  return tf.nn.depthwise_conv2d(out, cols, [1, 1, 1, 1], 'VALID')[0]


def three_augment(image, seed, blur_sigma=(0.1, 2.0)):
  """DeiT III's 3-augment: exactly one of grayscale, solarisation, Gaussian blur (equally likely),
  blur sigma uniform in `blur_sigma`."""
  choice_seed, sigma_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  choice = tf.random.stateless_uniform([], choice_seed, 0, 3, dtype=tf.int32)
  sigma = tf.random.stateless_uniform([], sigma_seed, *blur_sigma)
  radius = int(3 * blur_sigma[1] + 0.5)
  return tf.switch_case(choice, [lambda: grayscale(image), lambda: solarize(image),
                                 lambda: gaussian_blur(image, sigma, radius)])


def _crop_flip(image, seed, data_config, method):
  """Random-resized-crop with `method` interpolation, then a horizontal flip."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = random_resized_crop(image, crop_seed, data_config.image_size,
                              tuple(data_config.crop_scale), method=method,
                              flip=random_flip(flip_seed))
  return {'image': normalize(to_channels(image, data_config.channels), data_config)}


@register('rrc_flip')
def rrc_flip(image, seed, data_config):
  """MAE's pre-training augmentation: random-resized-crop (bicubic) and horizontal flip."""
  return _crop_flip(image, seed, data_config, 'bicubic')


@register('simmim')
def simmim(image, seed, data_config):
  """SimMIM's pre-training augmentation (`data/data_simmim.py`): torchvision's RandomResizedCrop
  at its default, bilinear, interpolation, and horizontal flip."""
  return _crop_flip(image, seed, data_config, 'bilinear')


@register('beit')
def beit(image, seed, data_config):
  """BEiT / BEiT v2 / DTM pre-training (reference `DataAugmentationForBEiT`): colour jitter
  (0.4, 0.4, 0.4) on the whole image, horizontal flip, then random-resized-crop (bicubic) with
  `data.crop_scale` (the reference's min scale is 0.08)."""
  jitter_seed, flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  image = tf.cast(to_channels(image, data_config.channels), tf.float32)
  image = color_jitter(image, jitter_seed, 0.4, 0.4, 0.4, 0.0)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = random_resized_crop(image, crop_seed, data_config.image_size,
                              tuple(data_config.crop_scale))
  return {'image': normalize(image, data_config)}


def random_erase(image, seed, prob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts=10):
  """timm's RandomErasing (mode 'pixel', one box) on a normalised float image [H, W, C].

  With probability `prob`, the first of `attempts` random boxes (area fraction in `scale`, log-
  uniform aspect in `ratio`) that fits inside the image is filled with N(0, 1) noise per pixel.
  """
  h, w = image.shape[0], image.shape[1]
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
  area = tf.random.stateless_uniform([attempts], seeds[0], *scale) * (h * w)
  aspect = tf.exp(tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]),
                                              math.log(ratio[1])))
  box_h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (box_h < h) & (box_w < w)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  box_h, box_w = box_h[first], box_w[first]
  top = tf.cast(tf.random.stateless_uniform([], seeds[2]) * tf.cast(h - box_h + 1, tf.float32),
                tf.int32)
  left = tf.cast(tf.random.stateless_uniform([], seeds[3]) * tf.cast(w - box_w + 1, tf.float32),
                 tf.int32)
  erase = tf.reduce_any(fits) & (tf.random.stateless_uniform([], seeds[4]) < prob)

  def erased():
    # Noise drawn for the box only, and only when erasing: a full-image draw per image cost as
    # much as the rest of the erasing. Padded into place, with a mask padded alike (no broadcast).
    box = [box_h, box_w, image.shape[-1]]
    place = [[top, h - top - box_h], [left, w - left - box_w], [0, 0]]
    inside = tf.pad(tf.ones(box, tf.uint8), place) > 0
    return ops.select(inside, tf.pad(tf.random.stateless_normal(box, seeds[5]), place), image)

  return tf.cond(erase, erased, lambda: image)


@register('deit')
def deit(image, seed, data_config):
  """DeiT's training augmentation: random-resized-crop, flip, RandAugment, random erasing."""
  crop_seed, flip_seed, ra_seed, erase_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  image = random_resized_crop(image, crop_seed, data_config.image_size,
                              tuple(data_config.crop_scale), flip=random_flip(flip_seed))
  image = to_channels(image, data_config.channels)
  if data_config.randaug_layers:
    image = randaugment.rand_augment(
        image, ra_seed, data_config.randaug_layers, float(data_config.randaug_magnitude),
        data_config.randaug_magnitude_std, fill=[255.0 * m for m in data_config.mean])
  image = normalize(image, data_config)
  if data_config.random_erase > 0:
    image = random_erase(image, erase_seed, data_config.random_erase)
  return {'image': image}


@register('center')
def center(image, seed, data_config):
  """Deterministic evaluation view: resize and central crop (no randomness)."""
  del seed
  image = to_channels(decode(image), data_config.channels)
  image = center_crop(image, data_config.image_size, data_config.eval_crop_fraction)
  return {'image': normalize(image, data_config)}


@register('lut_two_view')
def lut_two_view(image, seed, data_config):
  """LUT's two views (reference `TwoGlobalViewAugmentation`): a simple resized crop each, drawn
  independently; `image2` also gets colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8 and 3-augment.

  Geometry: both views keep the scale and almost all the content of the image, so their pooled
  tokens describe the same scene; they are *not* pixel-aligned (independent <= 4-pixel shifts and
  flips, and positions along the long side), as in the reference, since LUT compares pooled tokens.
  """
  view1_seed, view2_seed, apply_seed, jitter_seed, three_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  image = to_channels(decode(image), data_config.channels)
  size = data_config.image_size
  # Each view is simple_resized_crop(image, its seed): the resize and the padding draw nothing,
  # so they are done once for both views (the resize of the whole image is the largest cost).
  padded = _pad_reflect(resize_short_side(image, size), 4)
  view1 = _random_crop_flip(padded, view1_seed, size)
  view2 = _random_crop_flip(padded, view2_seed, size)
  jitter = tf.random.stateless_uniform([], apply_seed) < 0.8
  view2 = tf.cond(jitter, lambda: color_jitter(view2, jitter_seed, 0.4, 0.4, 0.2, 0.1),
                  lambda: view2)
  view2 = three_augment(view2, three_seed)
  return {'image': normalize(view1, data_config), 'image2': normalize(view2, data_config)}
