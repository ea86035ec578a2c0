"""LUT: Learning with Unmasked Tokens (Kim, Chun, Heo, Han), a plug-in to MAE.

Besides MAE's reconstruction of view 1, a second view is masked disjointly (the next `n_keep`
patches of MAE's random order) and also encoded. For each view, the mean of its visible patch tokens
goes through a projector and a predictor and is pulled (2 - 2 cos) toward the projected mean token
of the *other*, unmasked view from a context encoder: an EMA of the encoder and projector, with
BatchNorm in inference mode on EMA'd running statistics.

State: params['lut'] = {projector, predictor}; model_state['lut'] = {batch_stats (the student
heads' running BatchNorm statistics), context (EMA encoder, projector, projector_stats)}.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimjax import errors
from mimjax import masking
from mimjax.data import features
from mimjax.frameworks import base

# torch BatchNorm1d defaults: running = 0.9 * running + 0.1 * batch, eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class MLPHead(nn.Module):
  """Linear (no bias) -> BatchNorm -> ReLU -> Linear (no bias), Xavier-uniform, in float32."""
  hidden_dim: int
  out_dim: int

  @nn.compact
  def __call__(self, x, train=False):
    xavier = nn.initializers.xavier_uniform()
    x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=xavier)(x.astype(jnp.float32))
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)(x)
    x = nn.relu(x)
    return nn.Dense(self.out_dim, use_bias=False, kernel_init=xavier)(x)


def pool_visible(patch_tokens):
  """Mean of the (visible, final-norm) patch tokens [B, n, D] -> [B, D] in float32."""
  return patch_tokens.astype(jnp.float32).mean(axis=1)


def cosine_distance(prediction, target, eps=1e-12):
  """Per-sample 2 - 2 cos(prediction, target) = |p/|p| - t/|t||^2, [B]."""
  def normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  p, t = normalize(prediction), normalize(target)
  return 2.0 - 2.0 * jnp.sum(p * t, axis=-1)


def broader_context_loss(student1, student2, context1, context2):
  """L_bc: mean over the two cross-view pairs (student 1 vs context 2, student 2 vs context 1) of
  the batch-mean cosine distance."""
  return 0.5 * (cosine_distance(student1, context2).mean()
                + cosine_distance(student2, context1).mean())


def momentum_schedule(step, total_steps, base_momentum):
  """Cosine increase of the EMA momentum from `base_momentum` at step 0 to 1 at `total_steps`."""
  progress = jnp.asarray(step, jnp.float32) / total_steps
  return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + jnp.cos(math.pi * progress))


def ema_update(target, online, momentum):
  """momentum * target + (1 - momentum) * online, leaf by leaf."""
  return jax.tree_util.tree_map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


class LUT(base.Plugin):
  """The LUT loss term alpha * L_bc for the MAE framework; see the module docstring."""
  name = 'lut'

  def __init__(self, config, framework):
    super().__init__(config, framework)
    width = framework.encoder_kwargs['width']
    self.encoder = framework.build_encoder()
    self.projector = MLPHead(config.lut.head_dim, width)
    self.predictor = MLPHead(config.lut.head_dim, width)

  @classmethod
  def enabled(cls, config):
    return config.lut.enabled

  @classmethod
  def check_config(cls, config, framework):
    if config.framework != 'mae':
      raise errors.ConfigError(
          f'config.lut.enabled needs config.framework="mae" (got {config.framework!r}): LUT takes '
          'its second masked view from MAE\'s patch order.')
    if 'image2' not in features.outputs(config.data.augment):
      raise errors.ConfigError(
          f'config.lut.enabled needs a two-view augmentation; config.data.augment='
          f'{config.data.augment!r} gives no "image2". Set config.data.augment="lut_two_view".')
    if config.mae.mask_ratio < 0.5:
      raise errors.ConfigError(
          f'config.mae.mask_ratio={config.mae.mask_ratio} leaves too many visible patches for two '
          'disjoint masked views; LUT needs mask_ratio >= 0.5 (the paper uses 0.75).')
    if not 0.0 <= config.lut.momentum <= 1.0:
      raise errors.ConfigError(
          f'config.lut.momentum={config.lut.momentum} must be in [0, 1].')

  def _init_heads(self, rng):
    x = jnp.zeros((2, self.framework.encoder_kwargs['width']), jnp.float32)
    proj_rng, pred_rng = jax.random.split(rng)
    return {'projector': self.projector.init(proj_rng, x),
            'predictor': self.predictor.init(pred_rng, x)}

  def init_params(self, rng, outputs):
    del outputs
    return {k: v['params'] for k, v in self._init_heads(rng).items()}

  def init_state(self, params):
    # BatchNorm statistics start at mean 0, variance 1 whatever the rng.
    stats = {k: v['batch_stats'] for k, v in self._init_heads(jax.random.PRNGKey(0)).items()}
    context = dict(encoder=params['encoder'], projector=params[self.name]['projector'],
                   projector_stats=stats['projector'])
    # Own buffers, so that a donated train state never holds one buffer twice.
    return dict(batch_stats=stats, context=jax.tree_util.tree_map(jnp.copy, context))

  def _head(self, module, params, stats, x, train):
    """Applies a head; in training, BatchNorm uses (global) batch statistics and updates `stats`."""
    variables = {'params': params, 'batch_stats': stats}
    if not train:
      return module.apply(variables, x, train=False), stats
    out, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
    return out, updates['batch_stats']

  def _student(self, params, stats, pooled, train):
    z, proj_stats = self._head(self.projector, params['projector'], stats['projector'], pooled,
                               train)
    q, pred_stats = self._head(self.predictor, params['predictor'], stats['predictor'], z, train)
    return q, dict(projector=proj_stats, predictor=pred_stats)

  def _context(self, context, images):
    """Projected mean patch token of the unmasked images under the EMA encoder, no gradient."""
    enc = self.encoder.apply({'params': context['encoder']}, images, train=False)
    z = self.projector.apply({'params': context['projector'],
                              'batch_stats': context['projector_stats']},
                             pool_visible(enc['patch_tokens']), train=False)
    return jax.lax.stop_gradient(z)

  def loss(self, params, state, outputs, batch, rng, step, train):
    keep2, _ = masking.keep_from_order(outputs['patch_order'], self.framework.num_kept, view=1)
    enc2 = self.encoder.apply({'params': params['encoder']}, batch['image2'], keep_idx=keep2,
                              train=train, rngs={'dropout': rng})
    stats = state['batch_stats']
    student1, stats = self._student(params[self.name], stats,
                                    pool_visible(outputs['encoder']['patch_tokens']), train)
    student2, stats = self._student(params[self.name], stats, pool_visible(enc2['patch_tokens']),
                                    train)
    context1 = self._context(state['context'], batch['image'])
    context2 = self._context(state['context'], batch['image2'])
    loss_bc = broader_context_loss(student1, student2, context1, context2)
    metrics = {'loss_lut': loss_bc,
               'lut_momentum': momentum_schedule(step, self.config.total_steps,
                                                 self.config.lut.momentum)}
    return self.config.lut.alpha * loss_bc, metrics, dict(state, batch_stats=stats)

  def update_state(self, params, state, step):
    """Moves the context encoder (encoder, projector, projector statistics) toward the student."""
    online = dict(encoder=params['encoder'], projector=params[self.name]['projector'],
                  projector_stats=state['batch_stats']['projector'])
    momentum = momentum_schedule(step, self.config.total_steps, self.config.lut.momentum)
    return dict(state, context=ema_update(state['context'], online, momentum))
