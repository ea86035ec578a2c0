"""LUT's two-view augmentation: simple-resized-crop geometry of both views, colour operations
against numpy/scipy versions of torchvision's formulas, and 3-augment applying exactly one op.

(torchvision itself cannot be imported after TensorFlow in one process: their LLVMs clash.)
"""
import colorsys

import ml_collections
import numpy as np
import pytest
from scipy import ndimage
import tensorflow as tf

from mimjax.data import augment

SIZE = 32
# mean 0, std 1/255: the normalised output is in pixel units, comparable with the input.
CONFIG = ml_collections.ConfigDict(dict(image_size=SIZE, channels=3, mean=(0.0,) * 3,
                                        std=(1 / 255,) * 3))


def block_image(seed=0):
  """Gray 4x4-pixel blocks in [10, 70]: solarisation never triggers (jitter stays below 128) and
  grayscale/saturation/hue leave it unchanged, so view 2 is an affine map or a blur of its
  crop."""
  blocks = np.random.default_rng(seed).uniform(10, 70, size=(SIZE // 4, SIZE // 4))
  return np.repeat(np.repeat(blocks, 4, 0), 4, 1)[..., None].repeat(3, -1).astype(np.uint8)


def candidates(image):
  """Every (dy, dx, flip) window of the 4-pixel reflect-padded image (numpy 'reflect' = torch's)."""
  padded = np.pad(image.astype(np.float32), ((4, 4), (4, 4), (0, 0)), mode='reflect')
  out = {}
  for dy in range(9):
    for dx in range(9):
      window = padded[dy:dy + SIZE, dx:dx + SIZE]
      out[(dy, dx, 0)], out[(dy, dx, 1)] = window, window[:, ::-1]
  return out


def corr(a, b):
  a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
  return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def two_views(image, seed):
  out = augment.lut_two_view(tf.constant(image), tf.constant([seed, 3], tf.int64), CONFIG)
  return out['image'].numpy(), out['image2'].numpy()


def test_views_are_shifted_flipped_full_images_with_independent_geometry():
  image = block_image()
  cands = candidates(image)
  geometry1, geometry2 = [], []
  for seed in range(8):
    view1, view2 = two_views(image, seed)
    # View 1: exactly a reflect-padded <= 4-pixel shift (and maybe flip), no colour change.
    exact = [k for k, c in cands.items() if np.abs(c - view1).max() < 1e-3]
    assert len(exact) == 1, exact
    geometry1.append(exact[0])
    # View 2: colour-changed, but aligned with one such window and with no other geometry.
    scores = {k: corr(c, view2) for k, c in cands.items()}
    best = max(scores, key=scores.get)
    assert scores[best] > 0.9
    assert corr(image[::-1].astype(np.float32), view2) < 0.3  # a vertical flip is not allowed
    geometry2.append(best)
  # Independent draws (as in the reference): the two views' crops differ on some images.
  assert any(g1 != g2 for g1, g2 in zip(geometry1, geometry2))
  assert len(set(geometry1)) > 4  # and the crop itself varies


def test_non_square_image_keeps_its_scale():
  """Short side resized to the training size; the crop slides along the long side."""
  wide = np.concatenate([block_image(1), block_image(2)], axis=1)  # 32 x 64
  view1, _ = two_views(wide, 0)
  padded = np.pad(wide.astype(np.float32), ((4, 4), (4, 4), (0, 0)), mode='reflect')
  windows = [padded[dy:dy + SIZE, dx:dx + SIZE] for dy in range(9) for dx in range(64 + 9 - SIZE)]
  windows += [w[:, ::-1] for w in windows]
  assert min(np.abs(w - view1).max() for w in windows) < 1e-3


def test_each_view_is_simple_resized_crop_of_its_seed():
  """The views share one resize of the image (it draws nothing): each is still exactly
  simple_resized_crop(image, its own seed), view 2 then jittered (p = 0.8) and 3-augmented."""
  image = np.random.default_rng(3).integers(0, 256, (45, 61, 3)).astype(np.uint8)
  for seed in range(6):
    seed = tf.constant([seed, 3], tf.int64)
    view1_seed, view2_seed, apply_seed, jitter_seed, three_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5))
    out = augment.lut_two_view(tf.constant(image), seed, CONFIG)
    view1 = augment.simple_resized_crop(tf.constant(image), view1_seed, SIZE)
    view2 = augment.simple_resized_crop(tf.constant(image), view2_seed, SIZE)
    if tf.random.stateless_uniform([], apply_seed) < 0.8:
      view2 = augment.color_jitter(view2, jitter_seed, 0.4, 0.4, 0.2, 0.1)
    view2 = augment.three_augment(view2, three_seed)
    np.testing.assert_allclose(out['image'].numpy(), view1.numpy(), atol=1e-3)
    np.testing.assert_allclose(out['image2'].numpy(), view2.numpy(), atol=1e-3)


LUMA = np.array([0.299, 0.587, 0.114])


def np_hue(image, delta):
  flat = image.reshape(-1, 3) / 255
  out = [colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
         for h, s, v in (colorsys.rgb_to_hsv(*px) for px in flat)]
  return np.asarray(out).reshape(image.shape) * 255


# torchvision.transforms.functional formulas, on pixels in [0, 255].
NUMPY_COLOR_OPS = {
    'brightness': lambda x, f: np.clip(f * x, 0, 255),
    'contrast': lambda x, f: np.clip(f * x + (1 - f) * (x @ LUMA).mean(), 0, 255),
    'saturation': lambda x, f: np.clip(f * x + (1 - f) * (x @ LUMA)[..., None], 0, 255),
    'hue': np_hue,
}


@pytest.mark.parametrize('name,factor', [('brightness', 1.3), ('contrast', 0.7),
                                         ('saturation', 1.2), ('hue', 0.08), ('hue', -0.1)])
def test_color_ops_match_torchvision_formulas(name, factor):
  image = np.random.default_rng(0).uniform(0, 255, size=(8, 8, 3)).astype(np.float32)
  ours = getattr(augment, f'adjust_{name}')(tf.constant(image), factor).numpy()
  np.testing.assert_allclose(ours, NUMPY_COLOR_OPS[name](image.astype(np.float64), factor),
                             atol=0.05)


def test_grayscale_solarize_and_blur_match_references():
  image = np.random.default_rng(1).uniform(0, 255, size=(20, 20, 3)).astype(np.float32)
  np.testing.assert_allclose(augment.grayscale(tf.constant(image)).numpy(),
                             np.repeat((image @ LUMA)[..., None], 3, -1), atol=0.01)
  np.testing.assert_array_equal(augment.solarize(tf.constant([[[127.0, 128.0, 200.0]]])).numpy(),
                                [[[127.0, 127.0, 55.0]]])
  ours = augment.gaussian_blur(tf.constant(image), tf.constant(1.3), 6).numpy()
  # scipy's 'mirror' is numpy's / torch's 'reflect' (the edge pixel is not repeated).
  theirs = ndimage.gaussian_filter(image.astype(np.float64), (1.3, 1.3, 0), mode='mirror',
                                   radius=(6, 6, 0))
  np.testing.assert_allclose(ours, theirs, atol=0.01)


def test_three_augment_applies_exactly_one_op():
  image = np.random.default_rng(2).uniform(0, 255, size=(16, 16, 3)).astype(np.float32)
  x = tf.constant(image)
  gray, solar = augment.grayscale(x).numpy(), augment.solarize(x).numpy()
  counts = {'gray': 0, 'solarize': 0, 'blur': 0}
  for seed in range(30):
    out = augment.three_augment(x, tf.constant([seed, 0], tf.int64)).numpy()
    if np.allclose(out, gray, atol=1e-3):
      counts['gray'] += 1
    elif np.allclose(out, solar, atol=1e-3):
      counts['solarize'] += 1
    else:  # a blur: a weighted mean of the same channel, not gray, never inverted
      assert np.abs(out[..., 0] - out[..., 1]).max() > 1.0
      np.testing.assert_allclose(out.mean((0, 1)), image.mean((0, 1)), rtol=0.05)
      assert out.std() < image.std()
      counts['blur'] += 1
  assert min(counts.values()) >= 4, counts
