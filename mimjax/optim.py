"""Optimizer and learning-rate schedule: AdamW with MAE's weight-decay rules, warmup + cosine."""
import jax
import optax

# Parameters never decayed besides 1-D ones (biases, norm scales, layer scales).
NO_DECAY_NAMES = ('pos_embedding', 'cls', 'mask_token')


def path_str(path):
  """'encoder/Transformer/encoderblock_0/...' from a jax tree path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def decay_mask(params):
  """True for the parameters that get weight decay: weights of rank >= 2 except embeddings/tokens."""
  def decays(path, leaf):
    name = path_str(path).split('/')[-1]
    return leaf.ndim >= 2 and name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate(config):
  """Peak lr = base_lr * batch / lr_base_batch; linear warmup from 0, cosine decay to min_lr."""
  peak = config.optim.base_lr * config.batch_size / config.optim.lr_base_batch
  warmup = min(config.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=config.optim.min_lr)


def make_optimizer(config, params):
  """AdamW (decoupled decay on `decay_mask`) with optional global-norm clipping."""
  lr = learning_rate(config)
  chain = []
  if config.optim.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(config.optim.grad_clip))
  chain.append(optax.adamw(lr, b1=config.optim.b1, b2=config.optim.b2,
                           weight_decay=config.optim.weight_decay, mask=decay_mask(params)))
  return optax.chain(*chain), lr
