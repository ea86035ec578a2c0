"""BEiT / DTM pre-training augmentation: colour jitter (0.4, 0.4, 0.4), flip, resized crop."""
import ml_collections
import numpy as np
import tensorflow as tf

from mimjax.data import augment

# mean 0, std 1/255: the normalised output is in pixel units.
CONFIG = ml_collections.ConfigDict(dict(image_size=16, channels=3, mean=(0.0,) * 3,
                                        std=(1 / 255,) * 3, crop_scale=(0.08, 1.0)))


def test_gray_image_only_changes_brightness():
  """On a uniform gray image contrast and saturation are no-ops (torchvision blends with the mean
  luma / the luma itself) and crops are uniform, so the output is 100 * U[0.6, 1.4] everywhere."""
  image = np.full((40, 30, 3), 100, np.uint8)
  values = []
  for seed in range(40):
    out = augment.beit(tf.constant(image), tf.constant([seed, 7], tf.int64), CONFIG)['image']
    out = out.numpy()
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, out.flat[0], atol=1e-3)
    values.append(out.flat[0])
  assert 60 - 1e-3 <= min(values) < 75 and 125 < max(values) <= 140 + 1e-3


def test_zero_strength_jitter_is_identity():
  """torchvision skips adjustments of strength 0 (no hue op here)."""
  image = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 8, 3)), tf.float32)
  out = augment.color_jitter(image, tf.constant([1, 2], tf.int64), 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_array_equal(out.numpy(), image.numpy())
