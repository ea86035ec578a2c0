"""The image pipeline's resampling and crop sampling against PIL and torchvision on real images:
antialiased resizing when shrinking (bicubic, SimMIM's bilinear) and RandomResizedCrop's box
distribution (log-uniform aspect ratio) and centre-crop fallback."""
import math
import os

import numpy as np
import pytest
import scipy.stats

torch = pytest.importorskip('torch')  # torch before tensorflow (see the project README)
transforms = pytest.importorskip('torchvision.transforms')
matplotlib = pytest.importorskip('matplotlib')
PIL_Image = pytest.importorskip('PIL.Image')
import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top

from mimjax.data import augment  # noqa: E402  pylint: disable=g-import-not-at-top

PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data', 'sample_data',
                     'grace_hopper.jpg')


def photo():
  """A real photograph, uint8 [600, 512, 3]."""
  return np.asarray(PIL_Image.open(PHOTO).convert('RGB'))


def zone_plate(size=512):
  """A high-frequency test image: a radial chirp whose frequency grows to Nyquist at the border,
  where resizing without a low-pass filter aliases."""
  y, x = np.mgrid[:size, :size] - size / 2
  return np.repeat((127.5 + 127.5 * np.cos(np.pi * (x * x + y * y) / size))[..., None], 3,
                   -1).round().astype(np.uint8)


def mean_abs_error(image, size, method):
  resample = {'bicubic': PIL_Image.BICUBIC, 'bilinear': PIL_Image.BILINEAR}[method]
  pil = np.asarray(PIL_Image.fromarray(image).resize((size, size), resample), np.float32)
  ours = augment.resize(tf.constant(image), size, method).numpy()
  return np.abs(ours - pil).mean() / 255


@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('image', [zone_plate(), photo()], ids=['zone_plate', 'photo'])
def test_shrinking_resize_equals_pil(image, method):
  assert mean_abs_error(image, 224, method) < 1 / 255


def test_resize_without_antialias_would_fail_the_bound():
  image = zone_plate()
  pil = np.asarray(PIL_Image.fromarray(image).resize((224, 224), PIL_Image.BICUBIC), np.float32)
  aliased = tf.image.resize(image.astype(np.float32), (224, 224), 'bicubic').numpy()
  assert np.abs(aliased - pil).mean() / 255 > 10 / 255


def test_evaluation_resize_equals_pil():
  # timm's eval transform: Resize(short side 256, bicubic), CenterCrop(224), on a 600 x 512 photo.
  image = photo()
  ref = transforms.Compose([transforms.Resize(256, transforms.InterpolationMode.BICUBIC),
                            transforms.CenterCrop(224)])(PIL_Image.fromarray(image))
  ours = augment.center_crop(tf.constant(image), 224, 224 / 256).numpy()
  assert np.abs(ours - np.asarray(ref, np.float32)).mean() < 1


def boxes(shape, scale, ratio, n):
  """(heights, widths, tops, lefts) of `n` crop boxes drawn with consecutive seeds."""
  seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.fill([n], tf.constant(7, tf.int64))], 1)
  begin, size = tf.vectorized_map(
      lambda s: augment._crop_box(tf.constant(shape), s, scale, ratio), seeds)
  return size[:, 0].numpy(), size[:, 1].numpy(), begin[:, 0].numpy(), begin[:, 1].numpy()


def torchvision_boxes(shape, scale, ratio, n):
  torch.manual_seed(0)
  image = PIL_Image.new('RGB', (shape[1], shape[0]))
  params = [transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
            for _ in range(n)]
  top, left, h, w = map(np.array, zip(*params))
  return h, w, top, left


@pytest.mark.parametrize('shape,scale', [((375, 500, 3), (0.08, 1.0)),
                                         ((600, 512, 3), (0.67, 1.0))])
def test_crop_box_distribution_matches_torchvision(shape, scale):
  ratio, n = (3 / 4, 4 / 3), 4000
  h, w, top, left = boxes(shape, scale, ratio, n)
  ref_h, ref_w, ref_top, ref_left = torchvision_boxes(shape, scale, ratio, n)
  assert (h <= shape[0]).all() and (w <= shape[1]).all()
  assert (top + h <= shape[0]).all() and (left + w <= shape[1]).all() and (top >= 0).all()
  for ours, ref in ((w / h, ref_w / ref_h), (h * w, ref_h * ref_w),
                    (top / (shape[0] - h + 1), ref_top / (shape[0] - ref_h + 1))):
    assert scipy.stats.ks_2samp(ours, ref).pvalue > 1e-3
  # A uniform (not log-uniform) aspect ratio, as tf.image.sample_distorted_bounding_box draws it,
  # is told apart at this sample size.
  uniform = np.random.RandomState(0).uniform(*ratio, n)
  assert scipy.stats.ks_2samp(uniform, np.exp(np.random.RandomState(1).uniform(
      math.log(ratio[0]), math.log(ratio[1]), n))).pvalue < 1e-3


@pytest.mark.parametrize('shape', [(10, 1000, 3), (1000, 10, 3)])
def test_fallback_is_torchvisions_central_crop(shape):
  # A 1:100 image never holds a box of scale ~1 and aspect in (3/4, 4/3): torchvision clamps the
  # image's aspect into the range and takes the central box, deterministically.
  scale, ratio = (0.999, 1.0), (3 / 4, 4 / 3)
  ref_h, ref_w, ref_top, ref_left = torchvision_boxes(shape, scale, ratio, 1)
  h, w, top, left = boxes(shape, scale, ratio, 50)
  assert (h == ref_h[0]).all() and (w == ref_w[0]).all()
  assert (top == ref_top[0]).all() and (left == ref_left[0]).all()


@pytest.mark.parametrize('shape', [(600, 512), (375, 500), (10, 1000), (1000, 10), (1, 7)])
@pytest.mark.parametrize('out', [(224, 224), (256, 341), (17, 300)])
@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
def test_banded_resize_equals_tf_image_resize(shape, out, method):
  # The banded matrix products compute tf.image.resize(antialias=True)'s resampling (TensorFlow's
  # ScaleAndTranslate kernel), shrinking and enlarging, up to float32 rounding; `flip` mirrors it.
  image = np.random.RandomState(0).randint(0, 256, shape + (3,)).astype(np.uint8)
  ref = np.clip(tf.image.resize(image.astype(np.float32), out, method, antialias=True), 0, 255)
  for flip in (False, True):
    ours = augment.resize(tf.constant(image), out, method, flip=tf.constant(flip)).numpy()
    assert ours.shape == out + (3,)
    np.testing.assert_allclose(ours, ref[:, ::-1] if flip else ref, atol=0.01)


def test_rrc_flip_equals_crop_resize_flip_normalize_in_tf_image_ops():
  # rrc_flip folds the flip into the resize and normalises on rows of tiled constants; the same
  # crop through tf.image.resize, tf.image's seeded random flip and (x / 255 - mean) / std.
  config = type('Data', (), dict(image_size=224, crop_scale=(0.2, 1.0), channels=3,
                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
  data = tf.io.encode_jpeg(photo(), quality=90)
  flips = []
  for i in range(8):
    seed = tf.constant([3, i], tf.int64)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    ours = augment.rrc_flip(augment.Encoded(data, (None, None, 3)), seed, config)['image']
    crop = augment._crop(augment.Encoded(data, (None, None, 3)), crop_seed, (0.2, 1.0),
                         (3 / 4, 4 / 3))
    ref = tf.clip_by_value(tf.image.resize(tf.cast(crop, tf.float32), (224, 224), 'bicubic',
                                           antialias=True), 0, 255)
    ref = tf.image.stateless_random_flip_left_right(ref, flip_seed)
    ref = (ref / 255 - np.array(config.mean, np.float32)) / np.array(config.std, np.float32)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-3)
    flips.append(bool(augment.random_flip(flip_seed)))
  assert 0 < sum(flips) < 8  # both branches were compared
