"""Frozen-encoder features over a dataset split, computed in fixed-size sharded batches."""
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import errors
from mimjax import sharding
from mimjax.data import pipeline

FEATURES = ('pooled', 'cls', 'gap')


def select_feature(encoded, feature):
  """The image-level feature named `feature` from a ViT output dict."""
  if feature == 'pooled':
    return encoded['pooled']
  if feature == 'cls':
    return encoded['tokens'][:, 0]
  if feature == 'gap':
    return encoded['patch_tokens'].mean(axis=1)
  raise ValueError(f'Unknown feature {feature!r}; choose one of {FEATURES}.')


def map_batches(run, split, fn, max_examples=None, mesh=None):
  """Yields (host outputs of jitted `fn(params, images)`, valid mask) over this host's `split`.

  `fn` maps a fixed-shape padded batch to arrays with the batch as leading axis; at most
  `max_examples` valid examples are visited (a subset for analyses).
  """
  config = run.config
  mesh = mesh or sharding.make_mesh(config.mesh)
  batch_size = config.eval.batch_size
  sharding.check_batch_divides(batch_size, mesh, 'eval.batch_size')
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(fn)
  seen = 0
  for batch in pipeline.eval_batches(config, split, batch_size):
    if max_examples is not None and seen >= max_examples:
      return
    valid = batch['valid']
    if max_examples is not None:
      valid = valid & (np.arange(batch_size) < max_examples - seen)
    seen += int(valid.sum())
    images = jax.make_array_from_process_local_data(batch_sharding, batch['image'])
    yield jax.device_get(jitted(run.params, images)), valid, batch


def extract(run, split, feature='pooled', mesh=None):
  """(features float32 [n, D], labels int32 [n]) of this host's part of `split`, computed once
  per Run (kept in `run.features`; treat the arrays as read-only)."""
  if feature == 'cls' and not run.config.model.cls_token:
    raise ValueError('feature "cls" needs a model with a cls token; use "gap".')
  key = (split, feature, mesh)
  if key not in run.features:
    run.features[key] = _extract(run, split, feature, mesh)
  return run.features[key]


def _extract(run, split, feature, mesh):
  encoder = run.framework.build_encoder()

  def embed(params, images):
    encoded = encoder.apply({'params': params['encoder']}, images)
    return select_feature(encoded, feature).astype(jnp.float32)

  feats, labels = [], []
  for out, valid, batch in map_batches(run, split, embed, mesh=mesh):
    if 'label' not in batch:
      raise errors.DatasetError(f'{run.config.data.name} has no labels (a flat image folder); kNN '
                                'and linear evaluation need class subfolders.')
    feats.append(np.asarray(out)[valid])
    labels.append(batch['label'][valid])
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)
