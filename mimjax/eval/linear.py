"""Linear probe on frozen features (MAE's protocol): BatchNorm without affine, then a linear layer.

Features are extracted once; the classifier then trains on them on device, all learning rates of a
sweep at once (`jax.vmap` over the lr), with LARS (MAE's choice) or SGD with momentum, linear
warmup then cosine decay. The BatchNorm normalises with the exact training-set mean and variance,
the values MAE's running averages estimate (with frozen features there is nothing else to learn).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mimjax.eval import features as features_lib

OPTIMIZERS = ('lars', 'sgd')
BN_EPS = 1e-6


def standardize(train_x, test_x):
  """Both sets normalised per feature with the training set's mean and variance (BN, no affine)."""
  mean = train_x.mean(axis=0)
  scale = 1.0 / np.sqrt(train_x.var(axis=0) + BN_EPS)
  return (train_x - mean) * scale, (test_x - mean) * scale


def _optimizer(name, lr_fn, momentum, weight_decay):
  """LARS or SGD; biases get neither weight decay nor (LARS) trust-ratio scaling, as in MAE."""
  mask = {'kernel': True, 'bias': False}
  if name == 'lars':
    return optax.lars(lr_fn, weight_decay=weight_decay, weight_decay_mask=mask,
                      trust_ratio_mask=mask, momentum=momentum)
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                       optax.sgd(lr_fn, momentum=momentum))
  raise ValueError(f'Unknown linear-probe optimizer {name!r}; use one of {OPTIMIZERS}.')


def train_probe(train_x, train_y, test_x, test_y, lrs, epochs, batch_size, optimizer='lars',
                momentum=0.9, weight_decay=0.0, warmup_epochs=0, num_classes=None, seed=0):
  """Top-1 on the test set after every epoch, float [len(lrs), epochs], one row per peak lr.

  Every lr sees the same initial weights and the same data order; features are standardised
  first (see `standardize`). The last incomplete batch of an epoch is dropped.
  """
  train_x, test_x = standardize(np.asarray(train_x, np.float32), np.asarray(test_x, np.float32))
  num_classes = num_classes or int(max(np.max(train_y), np.max(test_y))) + 1
  n, dim = train_x.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  total_steps = max(epochs * steps_per_epoch, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, min(warmup_epochs * steps_per_epoch, total_steps - 1), total_steps)
  rng = jax.random.PRNGKey(seed)
  init = {'kernel': 0.01 * jax.random.truncated_normal(rng, -2.0, 2.0, (dim, num_classes)),
          'bias': jnp.zeros((num_classes,))}

  def loss_fn(params, x, y):
    logits = x @ params['kernel'] + params['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_one(lr, x, y, tx_, ty_):
    tx = _optimizer(optimizer, lambda step: lr * schedule(step), momentum, weight_decay)

    def step_fn(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    def epoch_fn(carry, epoch):
      order = jax.random.permutation(jax.random.fold_in(rng, epoch), n)
      batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
      carry, _ = jax.lax.scan(step_fn, carry, batches)
      params = carry[0]
      pred = jnp.argmax(tx_ @ params['kernel'] + params['bias'], axis=-1)
      return carry, jnp.mean(pred == ty_)

    _, top1 = jax.lax.scan(epoch_fn, (init, tx.init(init)), jnp.arange(epochs))
    return top1

  run = jax.jit(jax.vmap(train_one, in_axes=(0, None, None, None, None)))
  return np.asarray(run(jnp.asarray(lrs, jnp.float32), jnp.asarray(train_x),
                        jnp.asarray(train_y, jnp.int32), jnp.asarray(test_x),
                        jnp.asarray(test_y, jnp.int32)))


def protocol(run, feature=None, base_lrs=None, epochs=None, optimizer=None):
  """Linear probe of the frozen encoder, train split -> eval split, settings in config.eval.linear.

  Peak lr = base_lr * batch_size / 256 for each base lr of the sweep. Reports `top1` (the final
  top-1 of the best lr), `best_top1` (the best epoch of any lr) and both per lr.
  """
  config = run.config
  lin = config.eval.linear
  feature = feature or config.eval.feature
  base_lrs = [float(v) for v in (base_lrs or lin.base_lrs)]
  epochs = int(epochs or lin.epochs)
  optimizer = optimizer or lin.optimizer
  train_x, train_y = features_lib.extract(run, config.data.train_split, feature)
  test_x, test_y = features_lib.extract(run, config.data.eval_split, feature)
  batch_size = min(lin.batch_size, len(train_y))
  lrs = [b * batch_size / 256 for b in base_lrs]
  top1 = train_probe(train_x, train_y, test_x, test_y, lrs, epochs, batch_size, optimizer,
                     lin.momentum, lin.weight_decay, lin.warmup_epochs, seed=config.seed)
  final = {str(b): float(t[-1]) for b, t in zip(base_lrs, top1)}
  best = {str(b): float(t.max()) for b, t in zip(base_lrs, top1)}
  return dict(top1=max(final.values()), best_top1=max(best.values()),
              best_base_lr=float(max(final, key=final.get)), final_top1_by_base_lr=final,
              best_top1_by_base_lr=best, feature=feature, optimizer=optimizer, epochs=epochs,
              batch_size=batch_size, train_examples=len(train_y), test_examples=len(test_y))
