"""Singular values of the feature covariance per layer (the spectral analysis of LUT, Fig. 4b).

Each image gives one feature per layer (its mean patch token, or the cls token); the covariance
of these features over images is symmetric positive semi-definite, so its singular values are its
eigenvalues, and they equal the non-zero singular values of the images-by-images covariance the
paper describes, scaled alike. A flatter, higher spectrum means the features use more directions.
"""
import jax.numpy as jnp
import numpy as np

from mimjax.eval import features as features_lib
from mimjax.eval import plots

FEATURES = ('gap', 'cls')


def covariance_spectrum(x):
  """Singular values, descending, of the covariance of features x [n, D] (1/n normalisation)."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  return np.linalg.svd(x.T @ x / len(x), compute_uv=False, hermitian=True)


def protocol(run, feature=None, num_images=None):
  """Covariance spectrum of every layer (0 = the embedding, block outputs after) over the first
  `num_images` eval images; writes eval_spectrum.png (log scale, one line per layer)."""
  config = run.config
  feature = feature or 'gap'
  if feature not in FEATURES:
    raise ValueError(f'spectrum feature must be one of {FEATURES}, not {feature!r}.')
  num_images = num_images or config.eval.analysis_examples
  encoder = run.framework.build_encoder()
  if feature == 'cls' and not encoder.num_prefix:
    raise ValueError('spectrum feature "cls" needs a model with a cls token; use "gap".')

  def per_layer(params, images):
    out = encoder.apply({'params': params['encoder']}, images, capture_layers=True)
    pick = (lambda t: t[:, 0]) if feature == 'cls' else (
        lambda t: t[:, encoder.num_prefix:].mean(axis=1))
    return jnp.stack([pick(t).astype(jnp.float32) for t in out['layers']], axis=1)

  feats = [np.asarray(f)[valid] for f, valid, _ in features_lib.map_batches(
      run, config.data.eval_split, per_layer, num_images)]
  feats = np.concatenate(feats)  # [n, layers + 1, D]
  spectra = [covariance_spectrum(feats[:, l]) for l in range(feats.shape[1])]
  png = plots.curves([np.maximum(s, 1e-12) for s in spectra],
                     [f'layer {l}' for l in range(len(spectra))],
                     run.output_path('spectrum.png'), 'rank index', 'singular value',
                     f'feature covariance spectrum ({feature}), step {run.step}', log_y=True)
  return dict(singular_values=[s.tolist() for s in spectra],
              feature=feature, images=len(feats), plot=png)
