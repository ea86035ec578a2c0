"""Frozen-encoder features over a dataset split, computed in fixed-size sharded batches.

Works in a multi-process job: each process reads its part of the split (`tfds.even_splits`),
batches are global arrays, and `gather` puts every process's rows together in split order, so
the features equal a single process's.
"""
import math

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from mimjax import errors
from mimjax import sharding
from mimjax.data import pipeline

# pooled: the encoder's own pool (config.model.pool); cls: the cls token after the final norm;
# gap: the mean patch token after the pre-trained final norm; mae_gap: MAE's global pool, a fresh
# LayerNorm (no affine, eps 1e-6) of the mean of the patch tokens before the final norm.
FEATURES = ('pooled', 'cls', 'gap', 'mae_gap')
LN_EPS = 1e-6


def layer_norm(x, eps=LN_EPS):
  """LayerNorm over the last axis without affine parameters (a fresh norm at its init)."""
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps)


def select_feature(encoded, feature, num_prefix):
  """The image-level float32 feature named `feature` from a ViT output dict (`mae_gap` needs
  the output of `capture_layers=True`)."""
  if feature == 'pooled':
    out = encoded['pooled']
  elif feature == 'cls':
    out = encoded['tokens'][:, 0]
  elif feature == 'gap':
    out = encoded['patch_tokens'].mean(axis=1)
  elif feature == 'mae_gap':
    out = layer_norm(encoded['layers'][-1][:, num_prefix:].astype(jnp.float32).mean(axis=1))
  else:
    raise errors.ConfigError(f'Unknown feature {feature!r}; choose one of {FEATURES}.')
  return out.astype(jnp.float32)


def embed_fn(encoder, feature):
  """fn(encoder params, images) -> features [B, D] of the ViT module `encoder`."""
  if feature == 'cls' and not encoder.cls_token:
    raise errors.ConfigError('feature "cls" needs a model with a cls token; use "gap".')

  def embed(params, images):
    encoded = encoder.apply({'params': params}, images, capture_layers=feature == 'mae_gap')
    return select_feature(encoded, feature, encoder.num_prefix)
  return embed


def gather(x):
  """Host arrays [n, ...] of every process concatenated in process order (x itself for one)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def host_sum(x):
  """The sum over processes of a host array (x itself for one process)."""
  return gather(np.asarray(x)[None]).sum(axis=0)


def replicate(tree, mesh):
  """Host arrays as global arrays replicated over `mesh` (every process passes the same)."""
  replicated = sharding.replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(np.shape(x), replicated,
                                             lambda idx: np.asarray(x)[idx]), tree)


def map_batches(run, split, fn, max_examples=None, mesh=None, params=None):
  """Yields (this host's outputs of jitted `fn(params, images)`, valid mask, batch) over `split`.

  `params` default to `run.params` (the whole model). `fn` maps a fixed-shape padded global
  batch (config.eval.batch_size over all processes) to arrays with the batch as leading axis.
  With `max_examples`, only the first `max_examples` examples of the split are valid (a subset
  for analyses); every process runs the same number of batches.
  """
  config = run.config
  mesh = mesh or sharding.make_mesh(config.mesh)
  sharding.check_batch_divides(config.eval.batch_size, mesh, 'eval.batch_size')
  local_batch = pipeline.local_batch_size(config.eval.batch_size)
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(fn, out_shardings=batch_sharding)
  params = replicate(run.params if params is None else params, mesh)
  for batch in subset_batches(config, split, local_batch, max_examples):
    images = jax.make_array_from_process_local_data(batch_sharding, batch['image'])
    out = multihost_utils.global_array_to_host_local_array(
        jitted(params, images), mesh, batch_sharding.spec)
    yield jax.tree_util.tree_map(np.asarray, out), batch['valid'], batch


def subset_batches(config, split, local_batch, max_examples=None):
  """This host's padded eval batches (`pipeline.eval_batches`) of the first `max_examples`
  examples of `split` (all by default) in split order: `valid` is False beyond them, and every
  process yields the same number of batches, so a fixed subset always has the same shapes."""
  sizes = pipeline.host_sizes(config, split, jax.process_count())
  offset = sum(sizes[:jax.process_index()])  # index in `split` of this host's first example
  num_batches = None
  if max_examples is not None:
    needed = [min(max(max_examples - sum(sizes[:p]), 0), n) for p, n in enumerate(sizes)]
    num_batches = math.ceil(max(needed) / local_batch)
  for i, batch in enumerate(pipeline.eval_batches(config, split, local_batch)):
    if num_batches is not None and i >= num_batches:
      return
    if max_examples is not None:
      batch['valid'] = batch['valid'] & (
          offset + i * local_batch + np.arange(local_batch) < max_examples)
    yield batch


def extract(run, split, feature='pooled'):
  """(features float32 [n, D], labels int32 [n]) of all of `split` in split order, computed once
  per Run (kept in `run.features`; treat the arrays as read-only)."""
  key = (split, feature)
  if key not in run.features:
    run.features[key] = _extract(run, split, feature)
  return run.features[key]


def _extract(run, split, feature):
  feats, labels, valids = [], [], []
  for out, valid, batch in map_batches(run, split, embed_fn(run.encoder, feature),
                                       params=run.encoder_params):
    if 'label' not in batch:
      raise errors.DatasetError(f'{run.config.data.name} has no labels (a flat image folder); kNN '
                                'and linear evaluation need class subfolders.')
    feats.append(out)
    labels.append(batch['label'])
    valids.append(valid)
  valid = gather(np.concatenate(valids))
  return (gather(np.concatenate(feats))[valid],
          gather(np.concatenate(labels))[valid].astype(np.int32))
