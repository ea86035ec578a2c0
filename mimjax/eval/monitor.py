"""Online kNN monitor: held-out kNN top-1 of the encoder while a self-supervised run trains.

The progress signal of self-supervised codebases (DINO's and iBOT's kNN during pre-training) for
frameworks without a classifier (MAE, SimMIM, distillation): the first
`eval.knn_monitor.bank_examples` images of `data.train_split` (centre crops) are the memory, the
first `eval.knn_monitor.query_examples` of `data.eval_split` the queries, and each query is
classified by the weighted vote of its `eval.knn_monitor.k` nearest bank images (cosine similarity
of `eval.feature`, votes exp(sim / eval.knn_temperature), as the `knn` protocol of
`mimjax.evaluate`). Features, labels and votes stay on the devices as batch-sharded global arrays,
so the monitor runs unchanged on a mesh of many devices and hosts; its batches have one shape and
the subsets a fixed number of batches, so each jitted function compiles once per run.
"""
import functools

import jax
import jax.numpy as jnp

from mimjax import sharding
from mimjax.data import pipeline
from mimjax.eval import features as features_lib
from mimjax.eval import knn
from mimjax.models import vit


def knn_hits(bank, queries, k, num_classes, temperature):
  """(correct, counted) over the valid queries, from (features, labels, valid) tuples of batches
  of the bank and of the queries."""
  bank_x, bank_y, bank_valid = (jnp.concatenate(parts) for parts in bank)
  query_x, query_y, query_valid = (jnp.concatenate(parts) for parts in queries)
  votes = knn.class_votes(knn.l2_normalize(query_x), knn.l2_normalize(bank_x), bank_y, k,
                          num_classes, temperature, bank_valid)
  correct = (votes.argmax(axis=1) == query_y) & query_valid
  return correct.sum(), query_valid.sum()


class KnnMonitor:
  """`monitor(state)` -> {'knn_top1': accuracy in [0, 1]} of the state's encoder."""
  best_metric = 'knn_top1'

  def __init__(self, config, mesh):
    self.config = config
    settings = config.eval.knn_monitor
    self.local_batch = pipeline.local_batch_size(config.eval.batch_size)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self._embed = jax.jit(features_lib.embed_fn(vit.from_config(config), config.eval.feature),
                          out_shardings=self.batch_sharding)
    self._hits = jax.jit(functools.partial(
        knn_hits, k=settings.k, num_classes=pipeline.num_classes(config),
        temperature=config.eval.knn_temperature), out_shardings=sharding.replicated(mesh))

  def _features(self, encoder_params, split, num_examples):
    """(features, labels, valid): tuples of global arrays, one per batch of the subset."""
    columns = ([], [], [])
    for batch in features_lib.subset_batches(self.config, split, self.local_batch, num_examples):
      put = functools.partial(jax.make_array_from_process_local_data, self.batch_sharding)
      for column, value in zip(columns, (self._embed(encoder_params, put(batch['image'])),
                                         put(batch['label']), put(batch['valid']))):
        column.append(value)
    return tuple(tuple(c) for c in columns)

  def __call__(self, state):
    data, settings = self.config.data, self.config.eval.knn_monitor
    encoder_params = state.params['encoder']
    bank = self._features(encoder_params, data.train_split, settings.bank_examples)
    queries = self._features(encoder_params, data.eval_split, settings.query_examples)
    correct, counted = jax.device_get(self._hits(bank, queries))
    return {'knn_top1': float(correct) / max(float(counted), 1.0)}
