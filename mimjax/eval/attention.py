"""Average attention distance (AAD, eq. 4 of LUT; Dosovitskiy et al.'s "attention distance").

For a self-attention map S over patches with centres p_i in normalised [0, 1]^2 coordinates, the
distance of query i is sum_j S(i, j) * ||p_i - p_j||_2 over patch keys j; AAD is its mean over the
query patches (eq. 4's double sum divided by the number of queries). Attention to the cls token is
left out and the rows are not renormalised, as in eq. 4 where both sums run over patches only.
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
  """AAD of attention maps [..., T, T] (T = num_prefix + grid_size**2) -> [...]."""
  p = patch_centres(grid_size)
  dist = jnp.asarray(np.linalg.norm(p[:, None] - p[None], axis=-1))
  s = attention[..., num_prefix:, num_prefix:].astype(jnp.float32)
  return jnp.einsum('...ij,ij->...i', s, dist).mean(axis=-1)


def protocol(run, num_images=None):
  """AAD per layer and head over the first `num_images` eval images (default
  config.eval.analysis_examples); writes the per-layer plot eval_attention_distance.png."""
  config = run.config
  num_images = num_images or config.eval.analysis_examples
  encoder = run.framework.build_encoder()

  def per_image(params, images):
    out = encoder.apply({'params': params['encoder']}, images, capture_attention=True)
    return jnp.stack([attention_distance(a, encoder.grid_size, encoder.num_prefix)
                      for a in out['attention']], axis=1)  # [B, layers, heads]

  total, count = 0.0, 0
  for aad, valid, _ in features_lib.map_batches(run, config.data.eval_split, per_image,
                                                num_images):
    total = total + np.asarray(aad, np.float64)[valid].sum(axis=0)
    count += int(valid.sum())
  aad = total / count
  png = plots.per_layer_heads(aad, run.output_path('attention_distance.png'),
                              'attention distance (image side = 1)',
                              f'AAD, step {run.step}')
  return dict(aad=aad.tolist(), aad_per_layer=aad.mean(axis=1).tolist(), images=count, plot=png)
