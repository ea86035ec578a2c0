"""Optimizer and learning-rate schedule: AdamW with MAE's weight-decay rules, warmup + cosine,
and optional layer-wise lr decay (BEiT / MAE fine-tuning)."""
import math
import re

import jax
import optax

from mimjax import errors
from mimjax.models import vit

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


LR_SCALINGS = ('linear', 'sqrt')


def peak_lr(config):
  """base_lr scaled by batch / lr_base_batch (linear, MAE) or its square root (sqrt, BEiT v2)."""
  o = config.optim
  if o.lr_scaling not in LR_SCALINGS:
    raise errors.ConfigError(f'config.optim.lr_scaling={o.lr_scaling!r}; use one of {LR_SCALINGS}.')
  ratio = config.batch_size / o.lr_base_batch
  return o.base_lr * (math.sqrt(ratio) if o.lr_scaling == 'sqrt' else ratio)


def learning_rate(config):
  """Peak lr `peak_lr`; linear warmup from warmup_init_lr, cosine decay to min_lr."""
  peak = peak_lr(config)
  warmup = min(config.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=config.optim.warmup_init_lr, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=config.optim.min_lr)


def layer_id(path, depth):
  """Depth of a parameter in the encoder: 0 for the patch/position embeddings and cls token,
  i + 1 for `encoderblock_i`, depth + 1 for the final norm, the head and everything outside."""
  name = path_str(path)
  if not name.startswith('encoder/'):
    return depth + 1
  block = re.match(r'encoder/Transformer/encoderblock_(\d+)/', name)
  if block:
    return int(block.group(1)) + 1
  if name.startswith('encoder/Transformer/') or name.startswith('encoder/head/'):
    return depth + 1
  return 0  # embedding, pos_embedding, cls, the tokenizer (e.g. MoTo)


def layer_decay_factors(params, depth, decay):
  """Per-parameter lr multipliers decay ** (depth + 1 - layer_id), as BEiT and MAE fine-tune."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay ** (depth + 1 - layer_id(path, depth)), params)


def scale_by_tree(factors):
  """Multiplies each update by the matching leaf of `factors` (a tree of floats like params)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, f: u * f, updates, factors), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, params):
  """AdamW (decoupled decay on `decay_mask`) with optional global-norm clipping.

  With `optim.layer_decay` < 1 the whole AdamW step of a parameter (weight decay included, as in
  PyTorch's per-group lr) is scaled by its layer-wise factor.
  """
  lr = learning_rate(config)
  chain = []
  if config.optim.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(config.optim.grad_clip))
  chain.append(optax.adamw(lr, b1=config.optim.b1, b2=config.optim.b2,
                           weight_decay=config.optim.weight_decay, mask=decay_mask(params)))
  if config.optim.layer_decay < 1:
    depth = vit.parse_variant(config.model.variant)['depth']
    chain.append(scale_by_tree(layer_decay_factors(params, depth, config.optim.layer_decay)))
  return optax.chain(*chain), lr
