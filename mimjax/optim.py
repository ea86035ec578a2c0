"""Optimizer and learning-rate schedule: AdamW with each reference's weight-decay groups, warmup +
cosine or multi-step decay, linear or square-root batch scaling of the lr, and optional layer-wise
lr decay (BEiT / MAE fine-tuning)."""
import math
import re

import jax
import jax.numpy as jnp
import optax

from mimjax import errors
from mimjax.tree_util import path_str
from mimjax.models import vit

def decay_mask(params, no_decay_names=()):
  """True for the parameters that get weight decay: all but 1-D ones, biases (mimjax's q/k/v
  biases are [heads, head_dim], timm's fused qkv bias is 1-D) and `no_decay_names` (a
  framework's `no_weight_decay`, its reference's list in mimjax names)."""
  skip = tuple(no_decay_names)

  def decays(path, leaf):
    name = path_str(path).split('/')[-1]
    return leaf.ndim >= 2 and name != 'bias' and name not in skip
  return jax.tree_util.tree_map_with_path(decays, params)


LR_SCALINGS = ('linear', 'sqrt')
SCHEDULES = ('cosine', 'multistep')


def check_config(config):
  """The `config.optim` fields and the schedule's `warmup_steps`, before anything runs."""
  o = config.optim
  errors.require(o.accum_steps >= 1, 'optim.accum_steps', o.accum_steps,
                 'use a positive number of micro-batches (1 = no accumulation)')
  errors.require(config.batch_size % o.accum_steps == 0, 'optim.accum_steps', o.accum_steps,
                 f'it must divide config.batch_size={config.batch_size}')
  errors.require(config.warmup_steps >= 0, 'warmup_steps', config.warmup_steps,
                 'use >= 0 (0 = no warmup)')
  errors.require(o.base_lr >= 0, 'optim.base_lr', o.base_lr, 'use a learning rate >= 0')
  errors.require(o.lr_base_batch >= 1, 'optim.lr_base_batch', o.lr_base_batch,
                 'use a positive batch size (256 in the references)')
  errors.require_choice('optim.lr_scaling', o.lr_scaling, LR_SCALINGS)
  for key in ('warmup_init_lr', 'min_lr', 'weight_decay'):
    errors.require(o[key] >= 0, f'optim.{key}', o[key], 'use a value >= 0')
  errors.require_choice('optim.schedule', o.schedule, SCHEDULES)
  milestones = tuple(o.milestones)
  errors.require(all(isinstance(b, int) and a < b for a, b in zip((-1,) + milestones, milestones)),
                 'optim.milestones', milestones, 'give increasing integer steps >= 0')
  errors.require(0 < o.gamma <= 1, 'optim.gamma', o.gamma,
                 'use a factor in (0, 1] (multistep: the lr is multiplied by it per milestone)')
  for key in ('b1', 'b2'):
    errors.require(0 <= o[key] < 1, f'optim.{key}', o[key],
                   'Adam\'s decay rates must be in [0, 1) (b2 = 1 makes every update NaN)')
  errors.require(o.grad_clip >= 0, 'optim.grad_clip', o.grad_clip, 'use >= 0 (0 = off)')
  errors.require(0 < o.layer_decay <= 1, 'optim.layer_decay', o.layer_decay,
                 'use a factor in (0, 1] (1 = off)')


def peak_lr(config):
  """base_lr scaled by batch / lr_base_batch (linear, MAE) or its square root (sqrt, BEiT v2)."""
  o = config.optim
  if o.lr_scaling not in LR_SCALINGS:
    raise errors.ConfigError(f'config.optim.lr_scaling={o.lr_scaling!r}; use one of {LR_SCALINGS}.')
  ratio = config.batch_size / o.lr_base_batch
  return o.base_lr * (math.sqrt(ratio) if o.lr_scaling == 'sqrt' else ratio)


def learning_rate(config):
  """Peak lr `peak_lr`; linear warmup from optim.warmup_init_lr, then cosine decay to min_lr or
  (optim.schedule='multistep', SimMIM) x optim.gamma from each step in optim.milestones on."""
  peak = peak_lr(config)
  warmup = min(config.warmup_steps, config.total_steps)
  if config.optim.schedule == 'multistep':
    return multistep_schedule(peak, warmup, config.optim.milestones, config.optim.gamma)
  return optax.warmup_cosine_decay_schedule(
      init_value=config.optim.warmup_init_lr, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=config.optim.min_lr)


def multistep_schedule(peak, warmup, milestones, gamma):
  """Linear warmup from 0 to `peak`, then peak * gamma ** (number of milestones <= step), as
  SimMIM's MultiStepLRScheduler (torch's bisect_right over milestone steps)."""
  milestones = jnp.asarray(milestones, jnp.int32).reshape(-1)

  def schedule(step):
    decayed = peak * gamma ** jnp.sum(step >= milestones)
    return jnp.where(step < warmup, peak * step / max(warmup, 1), decayed)
  return schedule


def layer_id(path, depth):
  """Depth of a parameter in the encoder: 0 for the patch/position embeddings and cls token,
  i + 1 for `encoderblock_i`, depth + 1 for the final norm (or fc_norm), the head and everything
  outside (MAE's `get_layer_id_for_vit`)."""
  name = path_str(path)
  if not name.startswith('encoder/'):
    return depth + 1
  block = re.match(r'encoder/Transformer/encoderblock_(\d+)/', name)
  if block:
    return int(block.group(1)) + 1
  if name.startswith(('encoder/Transformer/', 'encoder/head/', 'encoder/fc_norm/')):
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


def make_optimizer(config, params, no_decay_names=()):
  """AdamW (decoupled decay on `decay_mask(params, no_decay_names)`) with optional global-norm
  clipping.

  With `optim.layer_decay` < 1 the whole AdamW step of a parameter (weight decay included, as in
  PyTorch's per-group lr) is scaled by its layer-wise factor.
  """
  lr = learning_rate(config)
  chain = []
  if config.optim.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(config.optim.grad_clip))
  chain.append(optax.adamw(lr, b1=config.optim.b1, b2=config.optim.b2,
                           weight_decay=config.optim.weight_decay,
                           mask=decay_mask(params, no_decay_names)))
  if config.optim.layer_decay < 1:
    depth = vit.parse_variant(config.model.variant)['depth']
    chain.append(scale_by_tree(layer_decay_factors(params, depth, config.optim.layer_decay)))
  return optax.chain(*chain), lr
