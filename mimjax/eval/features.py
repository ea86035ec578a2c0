"""Frozen-encoder features over a dataset split, computed in fixed-size sharded batches."""
import jax
import jax.numpy as jnp
import numpy as np

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


def extract(run, split, feature='pooled', mesh=None):
  """(features float32 [n, D], labels int32 [n]) of this host's part of `split`."""
  config = run.config
  if feature == 'cls' and not config.model.cls_token:
    raise ValueError('feature "cls" needs a model with a cls token; use "gap".')
  mesh = mesh or sharding.make_mesh(config.mesh)
  batch_size = config.eval.batch_size
  sharding.check_batch_divides(batch_size, mesh, 'eval.batch_size')
  encoder = run.framework.build_encoder()

  @jax.jit
  def embed(params, images):
    return select_feature(encoder.apply({'params': params}, images), feature).astype(jnp.float32)

  feats, labels = [], []
  batch_sharding = sharding.batch_sharding(mesh)
  for batch in pipeline.eval_batches(config, split, batch_size):
    images = jax.make_array_from_process_local_data(batch_sharding, batch['image'])
    out = np.asarray(jax.device_get(embed(run.params['encoder'], images)))
    feats.append(out[batch['valid']])
    labels.append(batch['label'][batch['valid']])
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)
