"""Average attention distance (Dosovitskiy et al.'s "attention distance"; LUT eq. 4; cl-vs-mim).

For a self-attention map S, the cls row and column are dropped and each query's row is
renormalised over the patch keys, as the cl-vs-mim reference does (so a head that attends to cls
does not look more local than it is). With patch centres p_i, the distance of query i is
sum_j S(i, j) * ||p_i - p_j||_2; the AAD is its mean over query patches, then over images. It is
reported in pixels (as the references report it) and as a fraction of the image side.
"""
import jax.numpy as jnp
import numpy as np

from mimjax.eval import features as features_lib
from mimjax.eval import plots


def patch_centres(grid_size):
  """float32 [grid_size**2, 2]: (row, column) centre of each patch (row-major) in [0, 1]."""
  c = (np.arange(grid_size, dtype=np.float32) + 0.5) / grid_size
  rows, cols = np.meshgrid(c, c, indexing='ij')
  return np.stack([rows.ravel(), cols.ravel()], axis=-1)


def attention_distance(attention, grid_size, num_prefix=0):
  """AAD in image-side fractions of attention maps [..., T, T] (T = num_prefix + grid_size**2)
  -> [...], each query's attention renormalised over the patches."""
  p = patch_centres(grid_size)
  dist = jnp.asarray(np.linalg.norm(p[:, None] - p[None], axis=-1))
  s = attention[..., num_prefix:, num_prefix:].astype(jnp.float32)
  s = s / jnp.maximum(s.sum(axis=-1, keepdims=True), 1e-12)
  return jnp.einsum('...ij,ij->...i', s, dist).mean(axis=-1)


def protocol(run, num_images=None):
  """AAD per layer and head over the first `num_images` eval images (default
  config.eval.analysis_examples); writes the per-layer plot eval_attention_distance.png."""
  config = run.config
  num_images = num_images or config.eval.analysis_examples
  encoder = run.encoder

  def per_image(params, images):
    out = encoder.apply({'params': params}, images, capture_attention=True)
    return jnp.stack([attention_distance(a, encoder.grid_size, encoder.num_prefix)
                      for a in out['attention']], axis=1)  # [B, layers, heads]

  total, count = 0.0, 0
  for aad, valid, _ in features_lib.map_batches(run, config.data.eval_split, per_image,
                                                num_images, params=run.encoder_params):
    total = total + np.asarray(aad, np.float64)[valid].sum(axis=0)
    count += int(valid.sum())
  aad = features_lib.host_sum(total) / features_lib.host_sum(count)
  pixels = aad * encoder.image_size
  png = plots.per_layer_heads(pixels, run.output_path('attention_distance.png'),
                              'attention distance (pixels)', f'AAD, step {run.step}')
  return dict(aad_pixels=pixels.tolist(), aad_pixels_per_layer=pixels.mean(axis=1).tolist(),
              aad=aad.tolist(), aad_per_layer=aad.mean(axis=1).tolist(),
              units=dict(aad_pixels=f'pixels of the {encoder.image_size}-pixel input',
                         aad='fraction of the image side'),
              images=int(features_lib.host_sum(count)), plot=png)
