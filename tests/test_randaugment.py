"""RandAugment ops against PIL (what timm runs), random erasing, and the 'deit' augmentation."""
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from configs import supervised as supervised_config
from mimjax.data import augment
from mimjax.data import randaugment

FILL = (124.0, 116.0, 104.0)


def _image(seed=0, size=(12, 10)):
  rng = np.random.default_rng(seed)
  return rng.integers(30, 220, size + (3,)).astype(np.uint8)


def _ours(fn, image, *args):
  return fn(tf.constant(image, tf.float32), *args).numpy()


def _quantised(fn, image, *args):
  return np.clip(np.round(_ours(fn, image, *args)), 0, 255)


@pytest.mark.parametrize('name,ours,pil', [
    ('autocontrast', randaugment.auto_contrast, ImageOps.autocontrast),
    ('equalize', randaugment.equalize, ImageOps.equalize),
    ('invert', randaugment.invert, ImageOps.invert),
])
def test_parameterless_ops_match_pil(name, ours, pil):
  del name
  # A random image, and one with a constant channel (kept by both), a two-level channel (nearly
  # all pixels in the top level: equalize keeps it, autocontrast stretches it) and a random one.
  degenerate = _image()
  degenerate[..., 0] = 77
  degenerate[..., 1] = 200
  degenerate[0, 0, 1] = 20
  for image in (_image(), degenerate):
    np.testing.assert_allclose(_quantised(ours, image), np.asarray(pil(Image.fromarray(image))),
                               atol=1)


def test_posterize_and_solarize_match_pil():
  image = _image(1)
  pil = Image.fromarray(image)
  for bits in (1, 2, 4):
    np.testing.assert_array_equal(_ours(randaugment.posterize, image, bits),
                                  np.asarray(ImageOps.posterize(pil, bits)))
  for threshold in (26.0, 128.0, 200.0):
    np.testing.assert_array_equal(_ours(randaugment.solarize, image, threshold),
                                  np.asarray(ImageOps.solarize(pil, int(threshold))))
  expected = np.where(image < 128, np.minimum(image.astype(int) + 99, 255), image)
  np.testing.assert_array_equal(_ours(randaugment.solarize_add, image, 99.0), expected)


@pytest.mark.parametrize('name', ['Color', 'Contrast', 'Brightness', 'Sharpness'])
@pytest.mark.parametrize('factor', [0.19, 1.81])
def test_enhance_ops_match_pil(name, factor):
  image = _image(2)
  ours = {'Color': randaugment.color, 'Contrast': randaugment.contrast,
          'Brightness': randaugment.brightness, 'Sharpness': randaugment.sharpness}[name]
  expected = np.asarray(getattr(ImageEnhance, name)(Image.fromarray(image)).enhance(factor))
  # PIL rounds its grey / blurred intermediates and results to uint8; allow one level.
  np.testing.assert_allclose(_quantised(ours, image, factor), expected, atol=1)


def test_translate_by_whole_pixels_shifts_and_fills():
  image = _image(3)
  out = _ours(randaugment.translate_x, image, 0.2, tf.constant(FILL))  # 2 of 10 columns
  np.testing.assert_allclose(out[:, :-2], image[:, 2:], atol=1e-3)
  np.testing.assert_allclose(out[:, -2:], np.broadcast_to(FILL, (12, 2, 3)), atol=1e-3)
  out = _ours(randaugment.translate_y, image, -0.25, tf.constant(FILL))  # -3 of 12 rows
  np.testing.assert_allclose(out[3:], image[:-3], atol=1e-3)
  np.testing.assert_allclose(out[:3], np.broadcast_to(FILL, (3, 10, 3)), atol=1e-3)


@pytest.mark.parametrize('ours,matrix', [
    (lambda x, f: randaugment.rotate(x, 20.0, f), None),
    (lambda x, f: randaugment.shear_x(x, 0.27, f), (1, 0.27, 0, 0, 1, 0)),
    (lambda x, f: randaugment.shear_y(x, -0.2, f), (1, 0, 0, -0.2, 1, 0)),
])
def test_geometric_ops_match_pil_away_from_the_border(ours, matrix):
  image = _image(4, (16, 16))
  pil = Image.fromarray(image)
  kwargs = dict(resample=Image.BILINEAR, fillcolor=(124, 116, 104))
  expected = np.asarray(pil.rotate(20, **kwargs) if matrix is None else
                        pil.transform(pil.size, Image.AFFINE, matrix, **kwargs))
  out = np.round(ours(tf.constant(image, tf.float32), tf.constant(FILL)).numpy())
  inner = (slice(5, 11), slice(5, 11))  # PIL treats the outermost pixels differently
  np.testing.assert_allclose(out[inner], expected[inner], atol=1)


@pytest.mark.parametrize('op', [lambda x, f: randaugment.rotate(x, 25.0, f),
                                lambda x, f: randaugment.shear_x(x, -0.27, f)])
def test_geometric_ops_blend_image_and_fill_by_coverage(op):
  # A constant image warped: each output pixel is t * value + (1 - t) * fill with t in [0, 1] its
  # coverage by the input, the same t in every channel; both ends occur (inside and outside).
  value = np.array([10.0, 200.0, 90.0])
  out = _ours(lambda x: op(x, tf.constant(FILL)), np.broadcast_to(value, (16, 16, 3)))
  t = (out - np.array(FILL)) / (value - np.array(FILL))
  np.testing.assert_allclose(t, np.broadcast_to(t[..., :1], t.shape), atol=1e-4)
  assert t.min() > -1e-4 and t.max() < 1 + 1e-4
  assert np.isclose(t, 0.0, atol=1e-4).any() and np.isclose(t, 1.0, atol=1e-4).any()
  assert ((t > 0.01) & (t < 0.99)).any()  # partly covered border pixels blend the two


def test_every_op_keeps_shape_and_pixel_range():
  image = tf.constant(_image(5), tf.float32)
  for index in range(len(randaugment.OPS)):
    for sign in (-1.0, 1.0):
      out = randaugment.apply_op(image, tf.constant(index), tf.constant(1.0), tf.constant(sign),
                                 tf.constant(FILL)).numpy()
      assert out.shape == (12, 10, 3)
      assert out.min() >= 0 and out.max() <= 255
      np.testing.assert_array_equal(out, np.round(out))


def test_rand_augment_is_seeded_and_in_range():
  image = tf.constant(_image(6), tf.float32)
  outs = [randaugment.rand_augment(image, tf.constant([s, 7], tf.int64)).numpy()
          for s in (0, 0, 1, 2, 3)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert any(not np.array_equal(outs[0], o) for o in outs[2:])
  for o in outs:
    assert o.shape == (12, 10, 3) and o.min() >= 0 and o.max() <= 255


def test_random_erase_fills_one_box_with_noise():
  image = tf.zeros((20, 24, 3))
  never = augment.random_erase(image, tf.constant([0, 1], tf.int64), prob=0.0).numpy()
  np.testing.assert_array_equal(never, 0.0)
  for seed in range(5):
    out = augment.random_erase(image, tf.constant([seed, 1], tf.int64), prob=1.0).numpy()
    erased = np.any(out != 0, axis=-1)
    rows, cols = np.nonzero(erased)
    box = np.zeros_like(erased)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    np.testing.assert_array_equal(erased, box)  # a single axis-aligned box
    assert 0.02 * 480 * 0.5 <= erased.sum() <= 480 / 3 * 1.5  # area scale (0.02, 1/3), rounded
    assert rows.max() - rows.min() + 1 < 20 and cols.max() - cols.min() + 1 < 24  # fits inside


def test_deit_augmentation_shapes():
  config = supervised_config.get_config('runlocal')
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (28, 28, 1)), tf.uint8)
  out = augment.AUGMENTATIONS['deit'](image, tf.constant([0, 3], tf.int64), config.data)
  assert out['image'].shape == (28, 28, 3)
  assert out['image'].dtype == tf.float32


def test_random_erase_noise_is_standard_normal_per_pixel():
  # timm's RandomErasing(mode='pixel') fills the box with independent N(0, 1) values.
  image = tf.fill((40, 48, 3), 100.0)
  values = []
  for seed in range(20):
    out = augment.random_erase(image, tf.constant([seed, 2], tf.int64), prob=1.0).numpy()
    values.append(out[out != 100.0])
  values = np.concatenate(values)
  assert len(values) > 1000
  assert scipy.stats.kstest(values, 'norm').pvalue > 1e-3
  erased = out != 100.0
  assert (erased.all(-1) == erased.any(-1)).all()  # every channel of an erased pixel
