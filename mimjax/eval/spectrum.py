"""Singular values of the feature covariance per layer (the spectral analysis of LUT, Fig. 4b).

Each image gives one feature per layer (its mean patch token, or the cls token); the covariance
of these features over images is symmetric positive semi-definite, so its singular values are its
eigenvalues, and they equal the non-zero singular values of the images-by-images covariance the
paper describes, scaled alike. A flatter, higher spectrum means the features use more directions.

LUT uses the 50k validation images, so the default is the whole eval split, streamed: only the
feature sums and D x D second moments are kept (float64, summed over processes). With n images
the tail of the sample spectrum sits far below the population's unless n >> D
(Marchenko-Pastur), so fewer than 10 D images get a warning in the log and the JSON.
"""
from absl import logging
import jax.numpy as jnp
import numpy as np

from mimjax import errors
from mimjax.eval import features as features_lib
from mimjax.eval import loading
from mimjax.eval import plots

FEATURES = ('gap', 'cls')
MIN_IMAGES_PER_DIM = 10


def spectrum_from_moments(total, second, n):
  """Singular values, descending, of the covariance (1/n) given sum x [D], sum x x^T [D, D]."""
  mean = total / n
  cov = second / n - np.outer(mean, mean)
  return np.linalg.svd((cov + cov.T) / 2, compute_uv=False, hermitian=True)


def covariance_spectrum(x):
  """Singular values, descending, of the covariance of features x [n, D] (1/n normalisation)."""
  x = np.asarray(x, np.float64)
  return spectrum_from_moments(x.sum(axis=0), x.T @ x, len(x))


def layer_spectra(run, feature='gap', num_images=None):
  """([spectrum of layer l] for l = 0 (embedding) .. L, number of images) of `run` over the first
  `num_images` images of the eval split (all by default)."""
  encoder = run.encoder
  if feature not in FEATURES:
    raise errors.ConfigError(f'spectrum feature must be one of {FEATURES}, not {feature!r}.')
  if feature == 'cls' and not encoder.num_prefix:
    raise errors.ConfigError('spectrum feature "cls" needs a model with a cls token; use "gap".')

  def per_layer(params, images):
    out = encoder.apply({'params': params}, images, capture_layers=True)
    pick = (lambda t: t[:, 0]) if feature == 'cls' else (
        lambda t: t[:, encoder.num_prefix:].mean(axis=1))
    return jnp.stack([pick(t).astype(jnp.float32) for t in out['layers']], axis=1)

  total = second = 0.0
  count = 0
  for f, valid, _ in features_lib.map_batches(run, run.config.data.eval_split, per_layer,
                                              num_images, params=run.encoder_params):
    f = np.asarray(f, np.float64)[valid]  # [b, layers + 1, D]
    total = total + f.sum(axis=0)
    second = second + np.einsum('bli,blj->lij', f, f)
    count += len(f)
  total, second = features_lib.host_sum(total), features_lib.host_sum(second)
  count = int(features_lib.host_sum(count))
  return [spectrum_from_moments(t, s, count) for t, s in zip(total, second)], count


def protocol(run, feature=None, num_images=None, other_workdir=None):
  """Covariance spectrum of every layer (0 = the embedding, block outputs after) over the eval
  split (or its first `num_images`); writes eval_spectrum.png (log scale, one line per layer).
  With `other_workdir`, also that run's spectra and the per-layer gap log10(this / other), drawn
  in eval_spectrum_gap.png (LUT's comparison of two runs)."""
  feature = feature or 'gap'
  spectra, count = layer_spectra(run, feature, num_images)
  dim = len(spectra[0])
  result = dict(singular_values=[s.tolist() for s in spectra], feature=feature, images=count)
  if count < MIN_IMAGES_PER_DIM * dim:
    result['warning'] = (f'{count} images for D = {dim}: the tail of the spectrum is biased low '
                         f'(use >= {MIN_IMAGES_PER_DIM * dim} images, e.g. the whole eval split).')
    logging.warning('spectrum: %s', result['warning'])
  result['plot'] = plots.curves(
      [np.maximum(s, 1e-12) for s in spectra], [f'layer {l}' for l in range(len(spectra))],
      run.output_path('spectrum.png'), 'rank index', 'singular value',
      f'feature covariance spectrum ({feature}), step {run.step}', log_y=True)
  if other_workdir:
    other, _ = layer_spectra(loading.load_run(other_workdir), feature, num_images)
    gap = [np.log10(np.maximum(a, 1e-12) / np.maximum(b, 1e-12)) for a, b in zip(spectra, other)]
    result.update(other_workdir=other_workdir,
                  other_singular_values=[s.tolist() for s in other],
                  gap_log10=[g.tolist() for g in gap],
                  gap_plot=plots.curves(gap, [f'layer {l}' for l in range(len(gap))],
                                        run.output_path('spectrum_gap.png'), 'rank index',
                                        'log10(this run / other run)',
                                        f'spectrum gap to {other_workdir} ({feature})'))
  return result
