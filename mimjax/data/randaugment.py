"""RandAugment as stateless tf.data ops, following timm's `rand-m9-mstd0.5-inc1` (DeiT's setting).

No maintained tf.data RandAugment is installed (TF Model Garden is not; Keras' layer draws from its
own generator state, which breaks resumable, position-seeded pipelines), so this is a small
re-implementation of timm's 'increasing' op set on float images with integer values in [0, 255]
(the result of every op is rounded and clipped, as PIL works in uint8):

  AutoContrast, Equalize, Invert, Rotate (<= 30 deg), PosterizeIncreasing (4 - int(4 m) bits),
  SolarizeIncreasing (threshold 256 - int(256 m)), SolarizeAdd (+int(110 m) below 128),
  Color / Contrast / Brightness / Sharpness with factor max(0.1, 1 +- 0.9 m),
  ShearX / ShearY (+-0.3 m), TranslateXRel / TranslateYRel (+-0.45 m of the image size),

with m = magnitude / 10. As in timm: `num_layers` ops drawn uniformly with replacement, each applied
with probability 0.5, the magnitude drawn per op from N(magnitude, magnitude_std) clipped to
[0, 10], the sign of signed ops random, geometric ops filling with `fill` (the dataset mean). Unlike
timm, geometric ops always interpolate bilinearly (timm picks bilinear or bicubic at random).
"""
import math

import tensorflow as tf

from mimjax.data import ops


def _grayscale(image):
  """[H, W, 1] luminance (PIL 'L'), rounded; a 1-channel image is returned as is."""
  if image.shape[-1] != 3:
    return image
  return tf.round(ops.luma(image))


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to [0, 255]."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _rows(image):
  """[h, w * c] view of an [h, w, c] image, for per-channel constants tiled along the rows (a
  broadcast of a c-vector over the last axis is several times slower on CPU)."""
  shape = tf.shape(image)
  return tf.reshape(image, [shape[0], shape[1] * shape[2]])


def _affine(image, matrix, fill):
  """Warps `image` with the output->input map (a0, a1, a2, b0, b1, b2) (PIL's AFFINE convention,
  pixel centres at +0.5), bilinear, filling outside pixels with the per-channel `fill`.

  Bilinear weights w_i sum to 1, and outside neighbours read the fill: the output is
  sum_inside w_i x_i + (1 - sum_inside w_i) fill = warp(x - fill, fill 0) + fill, so the image is
  shifted by the fill instead of warping a fourth, coverage channel (a third of the work).
  """
  shape = tf.shape(image)
  fill_row = tf.tile(fill, shape[1:2])
  shifted = tf.reshape(_rows(image) - fill_row, shape)[None]
  a0, a1, a2, b0, b1, b2 = [tf.cast(v, tf.float32) for v in matrix]
  # TF indexes pixel centres at integers: shift by half a pixel on both sides of the map.
  a2 = a2 + 0.5 * (a0 + a1) - 0.5
  b2 = b2 + 0.5 * (b0 + b1) - 0.5
  transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=shifted, transforms=transform, output_shape=shape[:2], fill_value=0.0,
      interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  return tf.reshape(_rows(warped) + fill_row, shape)


def _channel_min_max(rows, channels):
  """Per-channel (min, max) [c] of an image's [h, w * c] rows (column reductions, then w)."""
  lo = tf.reduce_min(tf.reshape(tf.reduce_min(rows, 0), [-1, channels]), 0)
  hi = tf.reduce_max(tf.reshape(tf.reduce_max(rows, 0), [-1, channels]), 0)
  return lo, hi


def auto_contrast(image):
  """PIL ImageOps.autocontrast (no cutoff): each channel stretched from [min, max] to [0, 255];
  a constant channel is left as it is."""
  shape = tf.shape(image)
  rows = _rows(image)
  lo, hi = _channel_min_max(rows, image.shape[-1])
  lo, hi = tf.tile(lo, shape[1:2]), tf.tile(hi, shape[1:2])
  # A constant channel has x == lo, so (x - lo) * ... = 0 and adding lo back keeps it.
  keep = tf.where(hi > lo, 0.0, lo)
  return tf.reshape((rows - lo) * 255.0 / tf.maximum(hi - lo, 1.0) + keep, shape)


def equalize(image):
  """PIL ImageOps.equalize, per channel: the histogram's cumulative sum as a lookup table (a
  channel whose histogram has one level, or all but one pixel in its last level, is kept).

  All channels at once: channel k's values are offset by 256 k into one histogram and one table.
  """
  shape, channels = tf.shape(image), image.shape[-1]
  offsets = tf.tile(tf.range(0, 256 * channels, 256), shape[1:2])
  values = tf.cast(_rows(image), tf.int32) + offsets
  hist = tf.reshape(tf.math.bincount(tf.reshape(values, [-1]), minlength=256 * channels,
                                     maxlength=256 * channels), [channels, 256])
  levels = tf.range(256)
  last = tf.reduce_max(tf.where(hist > 0, levels, -1), 1, keepdims=True)  # highest level present
  step = (tf.reduce_sum(hist, 1, keepdims=True)
          - tf.gather(hist, last, axis=1, batch_dims=1)) // 255
  safe_step = tf.maximum(step, 1)
  lut = tf.minimum((safe_step // 2 + tf.cumsum(hist, 1, exclusive=True)) // safe_step, 255)
  lut = tf.where(step > 0, lut, levels)  # identity table: the channel is kept
  return tf.reshape(tf.gather(tf.cast(tf.reshape(lut, [-1]), tf.float32), values), shape)


def invert(image):
  return 255.0 - image


def rotate(image, degrees, fill):
  """Counter-clockwise rotation about the image centre (PIL `Image.rotate`)."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = shape[0] / 2.0, shape[1] / 2.0
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _affine(image, [cos, sin, cx - cos * cx - sin * cy,
                         -sin, cos, cy + sin * cx - cos * cy], fill)


def posterize(image, bits):
  shift = tf.cast(2 ** (8 - bits), tf.float32)
  return tf.floor(image / shift) * shift


def solarize(image, threshold):
  return ops.select(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  return ops.select(image < threshold, tf.minimum(image + addition, 255.0), image)


def color(image, factor):
  return _blend(_grayscale(image), image, factor)


def contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13); borders stay unfiltered."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0])
  middle = tf.concat([image[1:-1, :1], smooth, image[1:-1, -1:]], 1)  # the border columns kept
  degenerate = tf.concat([image[:1], middle, image[-1:]], 0)  # and the border rows
  return _blend(degenerate, image, factor)


def shear_x(image, factor, fill):
  return _affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)


def shear_y(image, factor, fill):
  return _affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0], fill)


def translate_x(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return _affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)


def translate_y(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)


def _enhance_factor(level, sign):
  return tf.maximum(0.1, 1.0 + sign * level * 0.9)


# name -> fn(image, level in [0, 1], sign in {-1, 1}, fill), timm's _RAND_INCREASING_TRANSFORMS.
OPS = {
    'AutoContrast': lambda x, m, s, f: auto_contrast(x),
    'Equalize': lambda x, m, s, f: equalize(x),
    'Invert': lambda x, m, s, f: invert(x),
    'Rotate': lambda x, m, s, f: rotate(x, s * m * 30.0, f),
    'PosterizeIncreasing': lambda x, m, s, f: posterize(x, 4 - tf.cast(m * 4.0, tf.int32)),
    'SolarizeIncreasing': lambda x, m, s, f: solarize(x, 256.0 - tf.floor(m * 256.0)),
    'SolarizeAdd': lambda x, m, s, f: solarize_add(x, tf.minimum(tf.floor(m * 110.0), 128.0)),
    'ColorIncreasing': lambda x, m, s, f: color(x, _enhance_factor(m, s)),
    'ContrastIncreasing': lambda x, m, s, f: contrast(x, _enhance_factor(m, s)),
    'BrightnessIncreasing': lambda x, m, s, f: brightness(x, _enhance_factor(m, s)),
    'SharpnessIncreasing': lambda x, m, s, f: sharpness(x, _enhance_factor(m, s)),
    'ShearX': lambda x, m, s, f: shear_x(x, s * m * 0.3, f),
    'ShearY': lambda x, m, s, f: shear_y(x, s * m * 0.3, f),
    'TranslateXRel': lambda x, m, s, f: translate_x(x, s * m * 0.45, f),
    'TranslateYRel': lambda x, m, s, f: translate_y(x, s * m * 0.45, f),
}


def apply_op(image, index, level, sign, fill):
  """Applies OPS[index] (a scalar int tensor) and quantises back to integer pixel values."""
  branches = [lambda fn=fn: tf.ensure_shape(fn(image, level, sign, fill), image.shape)
              for fn in OPS.values()]
  out = ops.case(index, branches)
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def rand_augment(image, seed, num_layers=2, magnitude=9.0, magnitude_std=0.5, prob=0.5,
                 fill=(124.0, 116.0, 104.0)):
  """timm RandAugment on a float [H, W, C] image with values in [0, 255]; same shape and range."""
  fill = tf.constant(fill, tf.float32)[:image.shape[-1]]
  if not image.shape.is_fully_defined():
    raise ValueError(f'rand_augment needs a static image shape, got {image.shape}.')
  image = tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    op_seed, apply_seed, mag_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 4))
    index = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
    noisy = magnitude + magnitude_std * tf.random.stateless_normal([], mag_seed)
    level = tf.clip_by_value(noisy, 0.0, 10.0) / 10.0
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    apply = tf.random.stateless_uniform([], apply_seed) < prob
    image = ops.case(tf.cast(apply, tf.int32),
                     [lambda: image, lambda: apply_op(image, index, level, sign, fill)])
  return image
