"""Weighted k-nearest-neighbour classification on frozen features (the DINO / MAE protocol).

Cosine similarity between L2-normalised features, computed in float32 (`Precision.HIGHEST`, not
the bf16 / TF32 default of TPUs and recent GPUs); each of the k nearest training samples votes for
its class with weight exp(similarity / T).
"""
import jax
import jax.numpy as jnp
import numpy as np

from mimjax.eval import features as features_lib


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


_predict_chunk = jax.jit(class_votes, static_argnames=('k', 'num_classes'))


def knn_scores(train_feats, train_labels, test_feats, k, temperature=0.07, num_classes=None,
               chunk=1024):
  """Class scores [n_test, num_classes] from the k nearest training samples."""
  train = l2_normalize(jnp.asarray(train_feats, jnp.float32))
  test = np.asarray(l2_normalize(jnp.asarray(test_feats, jnp.float32)))
  labels = jnp.asarray(train_labels, jnp.int32)
  num_classes = num_classes or int(np.max(train_labels)) + 1
  k = min(k, train.shape[0])
  scores = []
  for start in range(0, len(test), chunk):
    part = test[start:start + chunk]
    pad = chunk - len(part)  # keep one static shape so this compiles once
    part = np.concatenate([part, np.zeros((pad, part.shape[1]), np.float32)]) if pad else part
    scores.append(np.asarray(_predict_chunk(jnp.asarray(part), train, labels, k, num_classes,
                                            temperature))[:chunk - pad])
  return np.concatenate(scores)


def knn_top1(train_feats, train_labels, test_feats, test_labels, k, temperature=0.07):
  """Top-1 accuracy (in [0, 1]) of weighted kNN."""
  num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
  scores = knn_scores(train_feats, train_labels, test_feats, k, temperature, num_classes)
  return float(np.mean(scores.argmax(axis=1) == np.asarray(test_labels)))


def protocol(run, feature=None, k=None):
  """kNN top-1 on the eval split with the train split as memory, for every k (default
  config.eval.knn_k = (20, 200)); `top1` is the first k's."""
  config = run.config
  feature = feature or config.eval.feature
  ks = [int(v) for v in (k or config.eval.knn_k)]
  train_x, train_y = features_lib.extract(run, config.data.train_split, feature)
  test_x, test_y = features_lib.extract(run, config.data.eval_split, feature)
  top1 = {str(k): knn_top1(train_x, train_y, test_x, test_y, k, config.eval.knn_temperature)
          for k in ks}
  return dict(top1=top1[str(ks[0])], top1_by_k=top1, k=ks, feature=feature,
              temperature=config.eval.knn_temperature, train_examples=len(train_y),
              test_examples=len(test_y))
