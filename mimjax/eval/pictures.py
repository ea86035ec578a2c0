"""Pictures from a checkpoint: reconstructions, DTM morphing groups, MoTo layouts (PNG files)."""
import colorsys

import jax
import numpy as np
from PIL import Image

from mimjax import errors
from mimjax import visualize
from mimjax import workdir_io
from mimjax.data import pipeline
from mimjax.plugins import dtm


def _images(run, num_images):
  """The first `num_images` images (and labels) of the eval split, normalised."""
  return next(pipeline.eval_batches(run.config, run.config.data.eval_split, num_images,
                                    process_index=0, process_count=1))


def _save(run, name, grid):
  path = run.output_path(f'{name}.png')
  with workdir_io.path(path).open('wb') as f:
    Image.fromarray(np.asarray(grid)).save(f, format='PNG')
  return path


def reconstruction(run, num_images=8):
  """The framework's own visualisation (MAE: original | masked | prediction | pasted, titled) of
  eval images, masks drawn from the run's seed; an eval split shorter than `num_images` gives
  fewer rows, not blank ones."""
  batch = _images(run, num_images)
  batch = {k: v[batch['valid']] for k, v in batch.items() if k != 'valid'}  # no padding rows
  _, _, outputs = jax.jit(lambda p, s, b: run.framework.forward(
      p, s, b, jax.random.PRNGKey(run.config.seed), False))(run.params, run.model_state, batch)
  grids = run.framework.visualize(outputs, batch)
  if not grids:
    raise errors.ConfigError(f'framework {run.config.framework!r} draws no reconstructions '
                             '(e.g. a feature-target or supervised run).')
  return dict(pictures={name: _save(run, name, g) for name, g in grids.items()})


def merge_schedule(num_tokens, num_groups):
  """Per-round merge counts that take `num_tokens` to `num_groups` groups by bipartite matching,
  merging as many as a round allows ((t - 1) // 2 of t tokens, position 0 kept) each round."""
  rounds, t = [], num_tokens
  while t > num_groups:
    r = min(t - num_groups, (t - 1) // 2)
    rounds.append(r)
    t -= r
  return rounds or [0]


def group_colours(groups):
  """uint8 [B, N, 3]: a colour per group id of groups [B, N]; groups get well separated hues
  (golden-ratio steps) in the order of their first token."""
  out = np.zeros(groups.shape + (3,), np.uint8)
  for b, g in enumerate(groups):
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))[inverse.ravel()]
    out[b] = [np.round(np.array(colorsys.hsv_to_rgb(r * 0.618034 % 1.0, 0.7, 0.95)) * 255)
              for r in rank]
  return out


def morphing(run, num_images=8, num_groups=None):
  """DTM's token groups over eval images: for each target number of groups, the encoder's final
  patch tokens are merged by DTM's bipartite matching and every patch is coloured by its group."""
  encoder = run.encoder
  n, grid, patch = encoder.num_patches, encoder.grid_size, encoder.patch_size
  num_groups = [int(g) for g in (num_groups or (n // 2, n // 8, max(n // 32, 2)))]
  batch = _images(run, num_images)
  tokens = jax.jit(lambda p, x: encoder.apply({'params': p}, x)['patch_tokens'])(
      run.encoder_params, batch['image'])
  pixels = visualize.to_uint8(batch['image'], run.config.data)
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  columns, found = [pixels], []
  for g in num_groups:
    groups = np.asarray(dtm.morph_groups(tokens, merge_schedule(n, g), protect_first=False))
    found.append(float(np.mean([len(np.unique(x)) for x in groups])))
    colours = group_colours(groups).reshape(-1, grid, grid, 3)
    colours = colours.repeat(patch, axis=1).repeat(patch, axis=2)
    columns.append((0.4 * pixels + 0.6 * colours).round().astype(np.uint8))
  path = _save(run, 'morphing', visualize.uint8_grid(columns))
  return dict(picture=path, num_groups=num_groups, mean_groups_found=found)


def moto_layout(run, num_images=8):
  """MoTo's learned soft layout (Qian et al., Fig. 5): image | entity colours | overlay."""
  grid = visualize.moto_layout_grid(run.config, run.encoder_params,
                                    _images(run, num_images)['image'])
  return dict(picture=_save(run, 'moto_layout', grid))
