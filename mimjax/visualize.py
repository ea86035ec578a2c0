"""Image grids for humans: reconstructions, morphing groups, tokenizer layouts."""
import numpy as np

from mimjax import losses


def to_uint8(images, data_config):
  """Undo the input normalisation: float [..., H, W, C] -> uint8 pixels; NaN becomes grey."""
  images = np.asarray(images, np.float32)
  pixels = images * np.asarray(data_config.std) + np.asarray(data_config.mean)
  pixels = np.where(np.isnan(pixels), 0.5, pixels)
  return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


def image_grid(columns, data_config, max_rows=8, pad=2):
  """Rows = samples, columns = the given [B, H, W, C] arrays; uint8 [rows*(H+pad), ..., 3]."""
  columns = [to_uint8(c[:max_rows], data_config) for c in columns]
  rows, h, w, _ = columns[0].shape
  grid = np.full((rows * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 255, np.uint8)
  for j, col in enumerate(columns):
    for i in range(rows):
      tile = col[i]
      if tile.shape[-1] == 1:
        tile = np.repeat(tile, 3, axis=-1)
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = tile
  return grid


def reconstruction_grid(images, pred, mask, patch_size, data_config):
  """Original | masked input | reconstruction | reconstruction with the visible patches pasted.

  images: [B, H, W, C]; pred: [B, N, p*p*C] in the images' (normalised) pixel space, `patchify`
  order; mask: bool [B, N], True for masked patches (shown grey in the input column).
  """
  images = np.asarray(images, np.float32)
  pred = np.asarray(pred, np.float32)
  mask = np.asarray(mask)[..., None]
  target = losses.patchify(images, patch_size)
  to_image = lambda p: losses.unpatchify(p, patch_size, images.shape[-1])  # noqa: E731
  columns = [images, to_image(np.where(mask, np.nan, target)), to_image(pred),
             to_image(np.where(mask, pred, target))]
  return image_grid(columns, data_config)
