"""Optimizer and learning-rate schedule: AdamW with each reference's weight-decay groups, warmup +
cosine or multi-step decay, linear or square-root batch scaling of the lr, and optional layer-wise
lr decay (BEiT / MAE fine-tuning)."""
import math
import re
from typing import Callable, NamedTuple

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


def applied_lr(schedule, opt_state):
  """The lr of the next update of `opt_state`: `schedule` at the optimizer's own update count (the
  count of AdamW's `scale_by_schedule` state), which an update skipped for a float16 overflow does
  not advance, so it is the lr optax applies, whatever the train state's step count says."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  counts = [s.count for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule)
            if is_schedule(s)]
  if len(counts) != 1:
    raise ValueError(f'expected one scale_by_schedule state in the optimizer, found {len(counts)}')
  return schedule(counts[0])


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


def flat_update_applies(config):
  """Whether `make_optimizer` updates over flattened groups: `optim.flat_update` on and no fsdp axis
  (`mesh.fsdp` 1). Concatenating leaves that fsdp shards along different dimensions would gather
  them, so sharded runs keep the per-leaf update."""
  return bool(config.optim.flat_update) and config.mesh.fsdp == 1


class Groups:
  """Flattened views of trees shaped like `params`: one 1-D buffer per group of leaves.

  `keys` is a tree like `params` of hashable group keys (e.g. (dtype, decays, lr factor)); leaves
  of one key are raveled and concatenated in tree order. `flatten` maps such a tree to
  {group name: buffer}, `unflatten` back (slices reshaped to the leaves' shapes).
  """

  def __init__(self, params, keys):
    leaves, self.treedef = jax.tree_util.tree_flatten(params)
    key_leaves = self.treedef.flatten_up_to(keys)
    self.shapes = [tuple(leaf.shape) for leaf in leaves]
    names = {}
    for key in key_leaves:
      names.setdefault(key, f'{len(names):03d}')
    self.key_of = {name: key for key, name in names.items()}  # group name -> key
    self.members = {name: [i for i, k in enumerate(key_leaves) if names[k] == name]
                    for name in names.values()}

  def flatten(self, tree):
    """{group name: 1-D concatenation of its leaves of `tree` (a tree like params)}."""
    leaves = self.treedef.flatten_up_to(tree)
    return {name: jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])
            for name, idx in self.members.items()}

  def unflatten(self, flat):
    """The tree like params whose leaves are the slices of `flat`'s buffers."""
    leaves = [None] * len(self.shapes)
    for name, idx in self.members.items():
      offset = 0
      for i in idx:
        size = math.prod(self.shapes[i])
        leaves[i] = flat[name][offset:offset + size].reshape(self.shapes[i])
        offset += size
    return self.treedef.unflatten(leaves)

  def per_group(self, fn):
    """{group name: fn(group key)}: a per-group constant (mask, lr factor) for the flat view."""
    return {name: fn(key) for name, key in self.key_of.items()}

  def _is_params_like(self, x):
    return jax.tree_util.tree_structure(x) == self.treedef

  def _is_flat(self, x):
    return isinstance(x, dict) and set(x) == set(self.members) and all(
        isinstance(v, jax.Array) for v in x.values())

  def flatten_state(self, state):
    """An optimizer state with each subtree shaped like params (Adam's moments) flattened."""
    return jax.tree_util.tree_map(lambda x: self.flatten(x) if self._is_params_like(x) else x,
                                  state, is_leaf=self._is_params_like)

  def unflatten_state(self, state):
    """The inverse of `flatten_state`: the per-leaf layout every checkpoint holds."""
    return jax.tree_util.tree_map(lambda x: self.unflatten(x) if self._is_flat(x) else x,
                                  state, is_leaf=self._is_flat)


class PerLeaf:
  """The identity view (`Groups`' interface): the update runs leaf by leaf."""

  @staticmethod
  def flatten(tree):
    return tree

  unflatten = flatten_state = unflatten_state = flatten


class Flattened(NamedTuple):
  """A GradientTransformation (per-leaf interface and state layout) computed as `inner` over the
  flat buffers of `groups`; the train step uses `inner` and `groups` directly (`update_view`)."""
  init: Callable
  update: Callable
  inner: optax.GradientTransformation
  groups: Groups


def flattened(make_inner, groups):
  """A transformation with the per-leaf interface and state layout of `make_inner(groups)`'s
  transformation applied leaf by leaf, computed over `groups`' flat buffers instead: one short
  chain of kernels per group replaces one per leaf (fewer kernels, yet slower on XLA:CPU, where
  the concatenations into the buffers cost more than the kernels saved).

  `make_inner(groups)` builds the inner transformation over {group name: buffer} trees (masks and
  factors as `groups.per_group` constants). The state is stored unflattened, so checkpoints keep
  the per-leaf layout and names, and restore either way.
  """
  inner = make_inner(groups)

  def init(params):
    return groups.unflatten_state(inner.init(groups.flatten(params)))

  def update(updates, state, params=None):
    flat_params = None if params is None else groups.flatten(params)
    flat_updates, flat_state = inner.update(groups.flatten(updates), groups.flatten_state(state),
                                            flat_params)
    return groups.unflatten(flat_updates), groups.unflatten_state(flat_state)
  return Flattened(init, update, inner, groups)


def update_view(tx):
  """(transformation, view) for a train step that keeps its whole update (norms, finiteness
  guard) in the view's flat buffers: `Flattened`'s inner transformation and groups, or `tx` and
  the identity `PerLeaf`."""
  if isinstance(tx, Flattened):
    return tx.inner, tx.groups
  return tx, PerLeaf


def make_optimizer(config, params, no_decay_names=()):
  """AdamW (decoupled decay on `decay_mask(params, no_decay_names)`) with optional global-norm
  clipping.

  With `optim.layer_decay` < 1 the whole AdamW step of a parameter (weight decay included, as in
  PyTorch's per-group lr) is scaled by its layer-wise factor.

  Where `flat_update_applies(config)`, the same update runs over one buffer per (dtype, decayed,
  lr factor) group of parameters (`flattened`); the state's layout is the per-leaf one either way.
  Off by default: on XLA:CPU the concatenations into the flat buffers cost more than the per-leaf
  kernels they replace (BENCHMARKS.md, issue 35).
  """
  lr = learning_rate(config)
  mask = decay_mask(params, no_decay_names)
  factors = jax.tree_util.tree_map(lambda _: 1.0, params)
  if config.optim.layer_decay < 1:
    depth = vit.parse_variant(config.model.variant)['depth']
    factors = layer_decay_factors(params, depth, config.optim.layer_decay)

  def chain(mask, factors):
    parts = []
    if config.optim.grad_clip > 0:
      parts.append(optax.clip_by_global_norm(config.optim.grad_clip))
    parts.append(optax.adamw(lr, b1=config.optim.b1, b2=config.optim.b2,
                             weight_decay=config.optim.weight_decay, mask=mask))
    if config.optim.layer_decay < 1:
      parts.append(scale_by_tree(factors))
    return optax.chain(*parts)

  if not flat_update_applies(config) or len(jax.tree_util.tree_leaves(params)) < 2:
    return chain(mask, factors), lr
  keys = jax.tree_util.tree_map(lambda p, m, f: (jnp.dtype(p.dtype).name, m, f),
                                params, mask, factors)
  groups = Groups(params, keys)
  return flattened(lambda g: chain(g.per_group(lambda k: k[1]), g.per_group(lambda k: k[2])),
                   groups), lr
