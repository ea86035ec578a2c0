"""Image grids for humans: reconstructions, morphing groups, tokenizer layouts."""
import numpy as np

from mimjax import errors
from mimjax import losses

# Distinct colours for the entities of a MoTo layout (Fig. 5 of Qian et al.); cycled beyond 12.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (170, 110, 40)], np.uint8)
TITLE_HEIGHT = 14  # pixels of the column-title band above a titled grid
RECONSTRUCTION_TITLES = ('original', 'masked input', 'reconstruction', 'visible pasted')


def to_uint8(images, data_config):
  """Undo the input normalisation: float [..., H, W, C] -> uint8 pixels; NaN becomes grey."""
  images = np.asarray(images, np.float32)
  pixels = images * np.asarray(data_config.std) + np.asarray(data_config.mean)
  pixels = np.where(np.isnan(pixels), 0.5, pixels)
  return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


def image_grid(columns, data_config, max_rows=8, pad=2, titles=None):
  """Rows = samples, columns = the given [B, H, W, C] arrays; uint8 [rows*(H+pad), ..., 3]."""
  return uint8_grid([to_uint8(c[:max_rows], data_config) for c in columns], pad, titles=titles)


def uint8_grid(columns, pad=2, min_tile=96, titles=None):
  """Lays out uint8 [B, H, W, C] columns (C = 1 or 3) on a white uint8 [.., .., 3] canvas, with
  `titles` (one per column) written in a TITLE_HEIGHT band above them when given.

  Small tiles (e.g. 28 px Fashion-MNIST) are enlarged by an integer factor (nearest neighbour, so
  patch boundaries stay sharp) until they are at least `min_tile` pixels tall.
  """
  scale = max(1, -(-min_tile // columns[0].shape[1]))
  columns = [np.repeat(np.repeat(np.asarray(c), scale, axis=1), scale, axis=2) for c in columns]
  rows, h, w, _ = columns[0].shape
  top = TITLE_HEIGHT if titles else 0
  grid = np.full((top + rows * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 255, np.uint8)
  for j, col in enumerate(columns):
    for i in range(rows):
      tile = col[i]
      if tile.shape[-1] == 1:
        tile = np.repeat(tile, 3, axis=-1)
      y, x = top + pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = tile
  if titles:
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
      draw.text((pad + j * (w + pad) + 2, 2), title, fill=(0, 0, 0))  # PIL's built-in font
    grid = np.asarray(canvas)
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
  return image_grid(columns, data_config, titles=RECONSTRUCTION_TITLES)


def standardized_to_uint8(x):
  """Per-patch standardised values (mean 0, std 1) -> uint8: 0 is mid-grey, -2 / +2 standard
  deviations black / white (clipped beyond)."""
  return (np.clip(np.asarray(x, np.float32) / 4 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def norm_pix_reconstruction_grid(images, pred, mask, patch_size, data_config):
  """For MAE with norm_pix_loss, whose prediction is each patch standardised by its own mean and
  variance: original | masked input | target (every patch standardised) | prediction on the
  masked patches, the visible ones pasted from the target; the last two in standardised space
  (`standardized_to_uint8`), so the grid shows exactly what the model predicts.
  """
  images = np.asarray(images, np.float32)
  mask = np.asarray(mask)[..., None]
  patches = losses.patchify(images, patch_size)
  target = np.asarray(losses.normalize_patches(patches))
  to_image = lambda p: losses.unpatchify(p, patch_size, images.shape[-1])  # noqa: E731
  rows = slice(0, 8)
  pixels = [to_uint8(c[rows], data_config)
            for c in (images, to_image(np.where(mask, np.nan, patches)))]
  standardized = [standardized_to_uint8(c[rows]) for c in (
      to_image(target), to_image(np.where(mask, np.asarray(pred, np.float32), target)))]
  return uint8_grid(pixels + standardized,
                    titles=('original', 'masked input', 'target (std. patches)', 'prediction'))


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
