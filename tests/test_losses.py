"""MAE loss against a hand computation in numpy (reference MAE semantics)."""
import numpy as np

from mimjax import losses


def _numpy_patchify(images, p):
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c), images.dtype)
  for i in range(h // p):
    for j in range(w // p):
      out[:, i * (w // p) + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
  return out


def test_patchify_matches_loop_and_inverts():
  images = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
  patches = np.asarray(losses.patchify(images, 4))
  np.testing.assert_array_equal(patches, _numpy_patchify(images, 4))
  np.testing.assert_array_equal(np.asarray(losses.unpatchify(patches, 4, 3)), images)


def test_mae_loss_by_hand():
  rng = np.random.RandomState(1)
  images = rng.randn(2, 4, 4, 1).astype(np.float32)  # 4 patches of 2x2
  pred = rng.randn(2, 4, 4).astype(np.float32)
  mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], bool)
  target = _numpy_patchify(images, 2)
  err = ((pred - target) ** 2).mean(-1)
  expected = (err * mask).sum() / mask.sum()
  got = float(losses.mae_loss(pred, images, mask, 2, norm_pix_loss=False))
  np.testing.assert_allclose(got, expected, rtol=1e-6)

  # norm_pix_loss: per-patch mean and *unbiased* variance (torch's Tensor.var), eps 1e-6.
  mean = target.mean(-1, keepdims=True)
  var = target.var(-1, keepdims=True, ddof=1)
  normed = (target - mean) / np.sqrt(var + 1e-6)
  err = ((pred - normed) ** 2).mean(-1)
  expected = (err * mask).sum() / mask.sum()
  got = float(losses.mae_loss(pred, images, mask, 2, norm_pix_loss=True))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_loss_ignores_visible_patches():
  rng = np.random.RandomState(2)
  images = rng.randn(1, 4, 4, 1).astype(np.float32)
  pred = rng.randn(1, 4, 4).astype(np.float32)
  mask = np.array([[1, 1, 0, 0]], bool)
  changed = pred.copy()
  changed[0, 2:] += 100.0  # errors on visible patches must not matter
  a = losses.mae_loss(pred, images, mask, 2, True)
  b = losses.mae_loss(changed, images, mask, 2, True)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
