"""Linear probes of the frozen encoder: MAE's protocol (`linear`) and a fast cached one.

`linear` follows MAE's `main_linprobe.py`: every epoch draws new RandomResizedCrop + flip views of
the probe's training images and passes them through the frozen encoder; the head is BatchNorm
without affine (batch statistics in training, running averages with momentum 0.1 at test) then a
linear layer (weights trunc-normal std 0.01, bias 0), trained with MAE's LARS (trust coefficient
0.001, momentum 0.9, biases excluded from weight decay and trust ratio), lr = base lr x batch / 256
with per-iteration linear warmup then half-cosine decay to 0. Every lr of a sweep trains at once
on the same views (`jax.vmap` over the lr). The lr is chosen on held-out training images
(`config.eval.linear.holdout_split`), never on the eval split, whose top-1 is then reported.

`linear_cached` extracts centre-crop features once and trains on them, normalised with the exact
training-set mean and variance: much faster, but without augmentation its numbers are not
comparable with MAE-protocol numbers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mimjax import errors
from mimjax import sharding
from mimjax.data import pipeline
from mimjax.eval import features as features_lib

OPTIMIZERS = ('lars', 'sgd')
BN_EPS = 1e-6
BN_MOMENTUM = 0.1  # torch BatchNorm1d's running-average momentum
HIGHEST = jax.lax.Precision.HIGHEST


def mae_lars(learning_rate, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
  """MAE's LARS (util/lars.py): for params with ndim > 1, weight decay then the trust ratio
  q = coefficient x ||p|| / ||update|| (1 when either norm is 0); momentum accumulates the scaled
  update and the step is -lr x momentum buffer. optax.lars applies the lr before the momentum,
  which differs from MAE whenever the lr changes (warmup, cosine)."""
  mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate))


def _optimizer(name, lr_fn, momentum, weight_decay, trust_coefficient=0.001):
  """MAE's LARS or SGD with momentum; biases get no weight decay (nor, with LARS, trust ratio)."""
  if name == 'lars':
    return mae_lars(lr_fn, weight_decay, momentum, trust_coefficient)
  if name == 'sgd':
    mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                       optax.sgd(lr_fn, momentum=momentum))
  raise errors.ConfigError(f'Unknown linear-probe optimizer {name!r}; use one of {OPTIMIZERS}.')


def mae_schedule(steps_per_epoch, epochs, warmup_epochs):
  """MAE's per-iteration lr factor: linear warmup over `warmup_epochs`, then half-cosine to 0."""
  def factor(step):
    epoch = step / steps_per_epoch
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * (epoch - warmup_epochs) /
                                 max(epochs - warmup_epochs, 1e-9)))
    return jnp.where(epoch < warmup_epochs, epoch / max(warmup_epochs, 1e-9), cosine)
  return factor


def init_head(dim, num_classes, seed):
  """MAE's probe head: weights trunc-normal with std 0.01 (cut at +-2 absolute), bias 0."""
  kernel = 0.01 * jax.random.truncated_normal(jax.random.PRNGKey(seed), -200.0, 200.0,
                                              (dim, num_classes))
  return {'kernel': kernel, 'bias': jnp.zeros((num_classes,))}


def _logits(head, x):
  return jnp.matmul(x, head['kernel'], precision=HIGHEST) + head['bias']


def _loss(head, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(_logits(head, x), y).mean()


def standardize(train_x, test_x):
  """Both sets normalised per feature with the training set's mean and variance (BN, no affine)."""
  mean = train_x.mean(axis=0)
  scale = 1.0 / np.sqrt(train_x.var(axis=0) + BN_EPS)
  return (train_x - mean) * scale, (test_x - mean) * scale


def top1(heads, x, y):
  """Top-1 of each stacked head [lrs, ...] on normalised features x [n, D], labels y [n]."""
  logits = jax.vmap(_logits, in_axes=(0, None))(heads, jnp.asarray(x, jnp.float32))
  return np.asarray(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)[None], axis=1))


def train_probe(train_x, train_y, lrs, epochs, batch_size, optimizer='lars', momentum=0.9,
                weight_decay=0.0, warmup_epochs=0, num_classes=None, seed=0):
  """Heads (stacked over `lrs`) trained on cached, already normalised features [n, D].

  Every lr sees the same initial weights and the same data order; the last incomplete batch of
  an epoch is dropped.
  """
  train_x = jnp.asarray(train_x, jnp.float32)
  train_y = jnp.asarray(train_y, jnp.int32)
  num_classes = num_classes or int(np.max(train_y)) + 1
  n, dim = train_x.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  schedule = mae_schedule(steps_per_epoch, epochs, warmup_epochs)
  init = init_head(dim, num_classes, seed)
  rng = jax.random.PRNGKey(seed)

  def train_one(lr):
    tx = _optimizer(optimizer, lambda step: lr * schedule(step), momentum, weight_decay)

    def step_fn(carry, idx):
      params, opt_state = carry
      grads = jax.grad(_loss)(params, train_x[idx], train_y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    def epoch_fn(carry, epoch):
      order = jax.random.permutation(jax.random.fold_in(rng, epoch), n)
      batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
      return jax.lax.scan(step_fn, carry, batches)[0], None

    return jax.lax.scan(epoch_fn, (init, tx.init(init)), jnp.arange(epochs))[0][0]

  return jax.jit(jax.vmap(train_one))(jnp.asarray(lrs, jnp.float32))


def _settings(run, base_lrs, epochs, optimizer):
  lin = run.config.eval.linear
  return ([float(v) for v in (base_lrs or lin.base_lrs)], int(epochs or lin.epochs),
          optimizer or lin.optimizer)


def _report(base_lrs, holdout_top1, test_top1, **extra):
  """The eval top-1 of the lr with the best held-out top-1, and both per base lr."""
  best = int(np.argmax(holdout_top1))
  return dict(top1=float(test_top1[best]), best_base_lr=base_lrs[best],
              holdout_top1_by_base_lr={str(b): float(t) for b, t in zip(base_lrs, holdout_top1)},
              top1_by_base_lr={str(b): float(t) for b, t in zip(base_lrs, test_top1)}, **extra)


def cached_protocol(run, feature=None, base_lrs=None, epochs=None, optimizer=None):
  """Linear probe on centre-crop features extracted once (config.eval.linear splits)."""
  config, lin = run.config, run.config.eval.linear
  feature = feature or config.eval.feature
  base_lrs, epochs, optimizer = _settings(run, base_lrs, epochs, optimizer)
  train_x, train_y = features_lib.extract(run, lin.train_split, feature)
  hold_x, hold_y = features_lib.extract(run, lin.holdout_split, feature)
  test_x, test_y = features_lib.extract(run, config.data.eval_split, feature)
  batch_size = min(lin.batch_size, len(train_y))
  num_classes = int(max(train_y.max(), hold_y.max(), test_y.max())) + 1
  train_n, hold_n = standardize(train_x, hold_x)
  test_n = standardize(train_x, test_x)[1]
  heads = train_probe(train_n, train_y, [b * batch_size / 256 for b in base_lrs], epochs,
                      batch_size, optimizer, lin.momentum, lin.weight_decay, lin.warmup_epochs,
                      num_classes, config.seed)
  return _report(base_lrs, top1(heads, hold_n, hold_y), top1(heads, test_n, test_y),
                 feature=feature, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
                 train_examples=len(train_y), holdout_examples=len(hold_y),
                 test_examples=len(test_y))


def probe_data_config(config):
  """`config` with the training stream of MAE's probe: RandomResizedCrop (eval.linear.crop_scale)
  + flip views of eval.linear.train_split, batches of eval.linear.batch_size."""
  lin = config.eval.linear
  probe = config.copy_and_resolve_references()
  with probe.unlocked():
    probe.data.train_split = lin.train_split
    probe.data.augment = 'rrc_flip'
    probe.data.crop_scale = tuple(lin.crop_scale)
    probe.data.cache = False
    probe.batch_size = lin.batch_size
  return probe


def _train_step_fn(run, feature, optimizer, lrs, schedule):
  """One jitted MAE-probe step on a global batch: frozen features, BatchNorm with batch
  statistics (running averages updated), then every lr's head one optimizer step."""
  lin = run.config.eval.linear
  embed = features_lib.embed_fn(run.encoder, feature)

  def tx_of(lr):
    return _optimizer(optimizer, lambda step: lr * schedule(step), lin.momentum,
                      lin.weight_decay, lin.trust_coefficient)

  def step(encoder_params, state, images, labels):
    feats = jax.lax.stop_gradient(embed(encoder_params, images))
    mean, var = feats.mean(axis=0), feats.var(axis=0)
    x = (feats - mean) / jnp.sqrt(var + BN_EPS)
    n = feats.shape[0]
    running_mean = (1 - BN_MOMENTUM) * state['mean'] + BN_MOMENTUM * mean
    running_var = (1 - BN_MOMENTUM) * state['var'] + BN_MOMENTUM * var * n / (n - 1)

    def update(lr, head, opt_state):
      updates, opt_state = tx_of(lr).update(jax.grad(_loss)(head, x, labels), opt_state, head)
      return optax.apply_updates(head, updates), opt_state

    heads, opt_states = jax.vmap(update)(lrs, state['heads'], state['opt'])
    return dict(heads=heads, opt=opt_states, mean=running_mean, var=running_var)

  def init(dim, num_classes):
    head = init_head(dim, num_classes, run.config.seed)
    heads = jax.tree_util.tree_map(lambda p: jnp.stack([p] * len(lrs)), head)
    return dict(heads=heads, opt=jax.vmap(lambda lr, h: tx_of(lr).init(h))(lrs, heads),
                mean=jnp.zeros((dim,)), var=jnp.ones((dim,)))
  return step, init


def protocol(run, feature=None, base_lrs=None, epochs=None, optimizer=None):
  """MAE's linear probe (see the module docstring), settings in config.eval.linear."""
  config, lin = run.config, run.config.eval.linear
  feature = feature or config.eval.feature
  base_lrs, epochs, optimizer = _settings(run, base_lrs, epochs, optimizer)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divides(lin.batch_size, mesh, 'eval.linear.batch_size')
  num_train = pipeline.num_examples(config, lin.train_split)
  steps_per_epoch = num_train // lin.batch_size
  if not steps_per_epoch:
    raise errors.ConfigError(
        f'eval.linear.batch_size={lin.batch_size} exceeds the {num_train} images of '
        f'eval.linear.train_split={lin.train_split!r}; choose a smaller batch or a larger split.')
  lrs = jnp.asarray([b * lin.batch_size / 256 for b in base_lrs], jnp.float32)
  schedule = mae_schedule(steps_per_epoch, epochs, lin.warmup_epochs)
  step, init = _train_step_fn(run, feature, optimizer, lrs, schedule)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  encoder_params = features_lib.replicate(run.encoder_params, mesh)
  jitted = jax.jit(step, out_shardings=replicated)
  hold_x, hold_y = features_lib.extract(run, lin.holdout_split, feature)
  test_x, test_y = features_lib.extract(run, config.data.eval_split, feature)
  state = jax.jit(init, static_argnums=(0, 1), out_shardings=replicated)(
      hold_x.shape[1], config.model.num_classes or int(max(hold_y.max(), test_y.max())) + 1)
  stream = pipeline.train_batches(probe_data_config(config))
  for _ in range(epochs * steps_per_epoch):
    batch = next(stream)
    state = jitted(encoder_params, state,
                   jax.make_array_from_process_local_data(batch_sharding, batch['image']),
                   jax.make_array_from_process_local_data(batch_sharding, batch['label']))
  state = jax.tree_util.tree_map(np.asarray, state)
  normalize = lambda x: (x - state['mean']) / np.sqrt(state['var'] + BN_EPS)  # noqa: E731
  return _report(base_lrs, top1(state['heads'], normalize(hold_x), hold_y),
                 top1(state['heads'], normalize(test_x), test_y), feature=feature,
                 optimizer=optimizer, epochs=epochs, batch_size=lin.batch_size,
                 crop_scale=list(lin.crop_scale), train_examples=num_train,
                 holdout_examples=len(hold_y), test_examples=len(test_y))

