"""Reconstruction grids (`mimjax.visualize`): the logged PNG is MAE's grid of held-out images, and
the norm_pix grid shows the prediction in standardised space (worked out by hand)."""
import os

import jax
import numpy as np
from PIL import Image

from mimjax import visualize
from mimjax.data import pipeline
from mimjax.eval import loading


def test_reconstruction_grid_shows_held_out_images(watched):
  """The PNG at step 6 is MAE's grid of the first 8 test images (never trained on)."""
  run = loading.load_run(watched, 6)
  batch = next(pipeline.eval_batches(run.config, run.config.data.eval_split, 8))
  batch = {k: v for k, v in batch.items() if k != 'valid'}
  forward = lambda p, s, b: run.framework.forward(p, s, b, jax.random.PRNGKey(0), False)[2]
  outputs = jax.jit(forward)(run.params, run.model_state, batch)
  expected = run.framework.visualize(jax.device_get(outputs), batch)['reconstruction_norm_pix']
  with Image.open(os.path.join(watched, 'images', 'reconstruction_norm_pix_0000006.png')) as png:
    np.testing.assert_array_equal(np.asarray(png), expected)


def test_norm_pix_grid_shows_the_prediction_in_standardised_space():
  """One 4x4 grayscale image, 2x2 patches; patch 0 visible, patches 1-3 masked."""
  data = type('Data', (), {'mean': (0.0,), 'std': (1.0,)})()
  image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 16
  mask = np.array([[False, True, True, True]])
  # Patch 0 holds pixels (0, 1, 4, 5) / 16: mean 2.5 / 16, unbiased variance 17 / 3 / 256 (MAE's
  # torch .var()), so its standardised values are (x - 2.5) / sqrt(17 / 3) (+ MAE's eps 1e-6).
  std = np.sqrt(17 / 3 / 256 + 1e-6) * 16
  patch0 = (np.array([0, 1, 4, 5]) - 2.5) / std
  shown0 = np.round(np.clip(patch0 / 4 + 0.5, 0, 1) * 255)  # 0 -> mid-grey, +-2 std -> white/black
  # Every patch of this ramp is the same ramp shifted, so every standardised patch equals patch 0.
  pred = np.zeros((1, 4, 4), np.float32)  # predicts each masked patch's own mean
  grid = visualize.norm_pix_reconstruction_grid(image, pred, mask, 2, data)
  target, predicted = _tile(grid, 2), _tile(grid, 3)
  np.testing.assert_array_equal(target[:2, :2].ravel(), shown0)
  np.testing.assert_array_equal(target[2:, 2:].ravel(), shown0)
  np.testing.assert_array_equal(predicted[:2, :2], target[:2, :2])  # visible: pasted target
  assert (predicted[:2, 2:] == 128).all() and (predicted[2:] == 128).all()  # zeros: mid-grey
  # A perfect prediction in standardised space shows as the target, whatever the patch's own
  # brightness and contrast (which the model never predicts).
  perfect = np.tile(patch0.astype(np.float32), (1, 4, 1))
  grid = visualize.norm_pix_reconstruction_grid(image, perfect, mask, 2, data)
  np.testing.assert_array_equal(_tile(grid, 3), _tile(grid, 2))


def _tile(grid, column, size=4, scale=24, pad=2):
  """The [size, size] grey values of one image of a one-row titled grid (tiles enlarged `scale`
  times to at least 96 px, `pad` px apart)."""
  x, y = pad + column * (size * scale + pad), visualize.TITLE_HEIGHT + pad
  return grid[y:y + size * scale:scale, x:x + size * scale:scale, 0]
