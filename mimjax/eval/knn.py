"""Weighted k-nearest-neighbour classification on frozen features (the DINO / MAE protocol): one
evaluator (`Knn`) for the in-training kNN monitor and the offline `knn` protocol.

Cosine similarity between L2-normalised features, computed in float32 (`Precision.HIGHEST`, not
the bf16 / TF32 default of TPUs and recent GPUs); each of the k nearest bank (training) images
votes for its class with weight exp(similarity / T). Features, labels and votes stay on the devices
as batch-sharded global arrays, so the evaluator runs unchanged on a mesh of many devices and
hosts; its batches have one shape and its subsets a fixed number of batches, so each jitted
function compiles once per evaluator.

The monitor (DINO's and iBOT's kNN during pre-training, the progress signal for frameworks without
a classifier: MAE, SimMIM, distillation) uses the first `eval.knn_monitor.bank_examples` images of
`data.train_split` (centre crops) as the bank and the first `eval.knn_monitor.query_examples` of
`data.eval_split` as the queries, with `eval.knn_monitor.k` neighbours. The offline protocol uses
all of both splits and every k of `eval.knn_k`.
"""
import functools

import jax
import jax.numpy as jnp

from mimjax import sharding
from mimjax.data import pipeline
from mimjax.eval import features as features_lib
from mimjax.models import vit


def l2_normalize(x):
  """Rows of `x` [n, D] scaled to unit L2 norm (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_votes(test, train, train_labels, k, num_classes, temperature, train_valid=None):
  """Summed votes [n_test, num_classes] of the k most similar rows of `train` (both unit-norm).

  Rows of `train` where `train_valid` is False (padding) are never among the k nearest; `k` must
  not exceed the number of valid rows.
  """
  sims = jnp.matmul(test, train.T, precision=jax.lax.Precision.HIGHEST)
  if train_valid is not None:
    sims = jnp.where(train_valid[None], sims, -jnp.inf)
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = jax.nn.one_hot(train_labels[top_idx], num_classes) * weights[..., None]
  return votes.sum(axis=1)


def _bank(features, labels, valid):
  """The bank as one array each, features L2-normalised (tuples of batches in)."""
  return (l2_normalize(jnp.concatenate(features)), jnp.concatenate(labels),
          jnp.concatenate(valid))


def _hits(bank, queries, ks, num_classes, temperature):
  """[correct for each k..., counted] over the valid rows of one batch of queries."""
  bank_x, bank_y, bank_valid = bank
  query_x, query_y, query_valid = queries
  query_x = l2_normalize(query_x)
  correct = [((class_votes(query_x, bank_x, bank_y, k, num_classes, temperature, bank_valid)
               .argmax(axis=1) == query_y) & query_valid).sum() for k in ks]
  return jnp.stack([*correct, query_valid.sum()])


class Knn:
  """`run(params, model_state)` -> {'knn_top1': accuracy in [0, 1] with the first k} of the
  encoder (`params['encoder']`), plus `knn_top1_k<k>` for every k when there are several.

  `bank_examples` / `query_examples`: the first images of data.train_split / data.eval_split
  (None: all of it). Each k is lowered to the bank's size. Data without class labels is refused
  here (`pipeline.num_classes`: a DatasetError).
  """
  best_metric = 'knn_top1'

  def __init__(self, config, mesh, ks, feature, bank_examples=None, query_examples=None):
    self.config, self.feature = config, feature
    self.bank_examples, self.query_examples = bank_examples, query_examples
    bank_size = pipeline.num_examples(config, config.data.train_split)
    self.ks = tuple(min(int(k), bank_examples or bank_size, bank_size) for k in ks)
    self.local_batch = pipeline.local_batch_size(config.eval.batch_size)
    self.batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    self._embed = jax.jit(features_lib.embed_fn(vit.from_config(config), feature),
                          out_shardings=self.batch_sharding)
    self._bank = jax.jit(_bank, out_shardings=self.batch_sharding)
    self._hits = jax.jit(functools.partial(
        _hits, ks=self.ks, num_classes=pipeline.num_classes(config),
        temperature=config.eval.knn_temperature), out_shardings=replicated)
    self._add = jax.jit(jnp.add, out_shardings=replicated)

  @classmethod
  def monitor(cls, config, mesh):
    """The in-training kNN monitor of config.eval.knn_monitor."""
    settings = config.eval.knn_monitor
    return cls(config, mesh, (settings.k,), config.eval.feature, settings.bank_examples,
               settings.query_examples)

  def _batches(self, encoder_params, split, num_examples):
    """(features, labels, valid) global arrays of each batch of the first `num_examples`."""
    put = functools.partial(jax.make_array_from_process_local_data, self.batch_sharding)
    for batch in features_lib.subset_batches(self.config, split, self.local_batch, num_examples):
      yield (self._embed(encoder_params, put(batch['image'])), put(batch['label']),
             put(batch['valid']))

  def counts(self, encoder_params):
    """Host ints: (correct for each k, valid queries, valid bank images)."""
    data = self.config.data
    bank = self._bank(*zip(*self._batches(encoder_params, data.train_split, self.bank_examples)))
    totals = None
    for queries in self._batches(encoder_params, data.eval_split, self.query_examples):
      hits = self._hits(bank, queries)
      totals = hits if totals is None else self._add(totals, hits)
    *correct, counted = (int(v) for v in jax.device_get(totals))
    return correct, counted, int(jax.device_get(bank[2].sum()))

  def run(self, params, model_state):
    del model_state  # the encoder's features depend on its params only
    correct, counted, _ = self.counts(params['encoder'])
    top1 = [c / max(counted, 1) for c in correct]
    results = {'knn_top1': top1[0]}
    if len(self.ks) > 1:
      results.update({f'knn_top1_k{k}': v for k, v in zip(self.ks, top1)})
    return results


def protocol(run, feature=None, k=None):
  """kNN top-1 on the eval split with the train split as memory, for every k (default
  config.eval.knn_k = (20, 200)); `top1` is the first k's."""
  config = run.config
  feature = feature or config.eval.feature
  ks = [int(v) for v in (k or config.eval.knn_k)]
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divides(config.eval.batch_size, mesh, 'eval.batch_size')
  evaluator = Knn(config, mesh, ks, feature)
  correct, counted, banked = evaluator.counts(
      features_lib.replicate(run.encoder_params, mesh))
  top1 = {str(k): c / max(counted, 1) for k, c in zip(ks, correct)}
  return dict(top1=top1[str(ks[0])], top1_by_k=top1, k=ks, feature=feature,
              temperature=config.eval.knn_temperature, train_examples=banked,
              test_examples=counted)
