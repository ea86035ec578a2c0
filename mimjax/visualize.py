"""Image grids for humans: reconstructions, morphing groups, tokenizer layouts."""
import numpy as np

from mimjax import errors
from mimjax import losses

# Distinct colours for the entities of a MoTo layout (Fig. 5 of Qian et al.); cycled beyond 12.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (170, 110, 40)], np.uint8)


def to_uint8(images, data_config):
  """Undo the input normalisation: float [..., H, W, C] -> uint8 pixels; NaN becomes grey."""
  images = np.asarray(images, np.float32)
  pixels = images * np.asarray(data_config.std) + np.asarray(data_config.mean)
  pixels = np.where(np.isnan(pixels), 0.5, pixels)
  return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


def image_grid(columns, data_config, max_rows=8, pad=2):
  """Rows = samples, columns = the given [B, H, W, C] arrays; uint8 [rows*(H+pad), ..., 3]."""
  return uint8_grid([to_uint8(c[:max_rows], data_config) for c in columns], pad)


def uint8_grid(columns, pad=2, min_tile=96):
  """Lays out uint8 [B, H, W, C] columns (C = 1 or 3) on a white uint8 [.., .., 3] canvas.

  Small tiles (e.g. 28 px Fashion-MNIST) are enlarged by an integer factor (nearest neighbour, so
  patch boundaries stay sharp) until they are at least `min_tile` pixels tall.
  """
  scale = max(1, -(-min_tile // columns[0].shape[1]))
  columns = [np.repeat(np.repeat(np.asarray(c), scale, axis=1), scale, axis=2) for c in columns]
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

def layout_colours(layout):
  """Soft layout [..., H, W, n] -> uint8 [..., H, W, 3]: pixels coloured by their argmax entity."""
  return PALETTE[np.argmax(np.asarray(layout), axis=-1) % len(PALETTE)]


def moto_layout_grid(config, encoder_params, images):
  """uint8 grid of MoTo's soft layout over normalised `images` [B, H, W, C] (paper Fig. 5).

  Rows: images; columns: image | argmax entity colour map | overlay.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from mimjax.models import vit
  # pylint: enable=g-import-not-at-top
  if config.model.tokenizer_norm != 'moto':
    raise errors.ConfigError(f'The run has model.tokenizer_norm='
                             f'{config.model.tokenizer_norm!r}; the layout needs "moto".')
  model = vit.from_config(config)
  _, state = model.apply({'params': encoder_params}, images, mutable=['intermediates'])
  layout = np.asarray(jax.device_get(state['intermediates']['tokenizer']['moto']['layout'][0]))
  pixels = to_uint8(images, config.data)
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  colours = layout_colours(layout)
  up = pixels.shape[1] // colours.shape[1]  # a strided MoTo stem: the layout is 1/s of the image
  colours = colours.repeat(up, axis=1).repeat(up, axis=2)
  overlay = (0.5 * pixels + 0.5 * colours).round().astype(np.uint8)
  return uint8_grid([pixels, colours, overlay])
