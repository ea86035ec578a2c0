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
import ml_collections

from mimjax import errors
from mimjax import losses
from mimjax import masking
from mimjax import teachers
from mimjax.models import flops
from mimjax.frameworks import base
from mimjax.models import vit

# torch BatchNorm1d defaults: running = 0.9 * running + 0.1 * batch, eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class BatchNorm(nn.Module):
  """torch's BatchNorm1d: normalises with the biased batch variance but keeps the *unbiased* one
  (n / (n - 1)) in its running variance, which flax's BatchNorm keeps biased. Same parameter and
  statistic names as flax's (scale, bias; mean, var)."""
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x, train=False):
    features = x.shape[-1]
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean, var = x.mean(axes), x.var(axes)
      if not self.is_initializing():
        n = x.size // features
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = (self.momentum * running_var.value
                             + (1 - self.momentum) * var * n / max(n - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class MLPHead(nn.Module):
  """Linear (no bias) -> BatchNorm -> ReLU -> Linear (no bias), Xavier-uniform, in float32."""
  hidden_dim: int
  out_dim: int

  @nn.compact
  def __call__(self, x, train=False):
    xavier = nn.initializers.xavier_uniform()
    x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=xavier)(x.astype(jnp.float32))
    x = BatchNorm(name='BatchNorm_0')(x, train)
    x = nn.relu(x)
    return nn.Dense(self.out_dim, use_bias=False, kernel_init=xavier)(x)


def pool_visible(patch_tokens):
  """Mean of the (visible, final-norm) patch tokens [B, n, D] -> [B, D] in float32."""
  return patch_tokens.astype(jnp.float32).mean(axis=1)


def cosine_distance(prediction, target):
  """Per-sample 2 - 2 cos(prediction, target) = |p/|p| - t/|t||^2, [B] (norms clamped at 1e-12,
  as torch's F.normalize in the reference)."""
  return 2.0 - 2.0 * losses.cosine_similarity(prediction, target, eps=1e-12,
                                               normalize_first=True)


def broader_context_loss(student1, student2, context1, context2):
  """L_bc: mean over the two cross-view pairs (student 1 vs context 2, student 2 vs context 1) of
  the batch-mean cosine distance."""
  return 0.5 * (cosine_distance(student1, context2).mean()
                + cosine_distance(student2, context1).mean())


def momentum_schedule(step, total_steps, base_momentum):
  """Cosine increase of the EMA momentum from `base_momentum` at step 0 to 1 at `total_steps`."""
  progress = jnp.asarray(step, jnp.float32) / total_steps
  return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + jnp.cos(math.pi * progress))


class LUT(base.Plugin):
  """The LUT loss term alpha * L_bc for the MAE framework; see the module docstring."""
  name = 'lut'

  def __init__(self, config, host):
    super().__init__(config, host)
    width = host.width
    self.encoder = vit.from_config(config)
    self.projector = MLPHead(config.lut.head_dim, width)
    self.predictor = MLPHead(config.lut.head_dim, width)

  @classmethod
  def config_fields(cls):
    """`config.lut`: the weight of the broader-context loss, the context encoder's momentum,
    the heads' width."""
    s = ml_collections.ConfigDict()
    s.enabled = False
    s.alpha = 0.25  # weight of the broader-context loss (paper: 0.25 for ViT-B, 1.0 for ViT-S)
    s.momentum = 0.996  # context-encoder EMA momentum at step 0; cosine schedule up to 1
    s.head_dim = 4096  # hidden width of the projector and predictor MLPs
    return s

  @classmethod
  def enabled(cls, config):
    return config.lut.enabled

  @classmethod
  def requires(cls, config):
    return {'patch_order': 'LUT takes its second masked view from MAE\'s patch order; use '
                           'config.framework="mae"',
            'second_view': 'LUT needs a two-view augmentation; set '
                           'config.data.augment="lut_two_view"'}

  @classmethod
  def check_config(cls, config):
    if config.mae.mask_ratio < 0.5:
      raise errors.ConfigError(
          f'config.mae.mask_ratio={config.mae.mask_ratio} leaves too many visible patches for two '
          'disjoint masked views; LUT needs mask_ratio >= 0.5 (the paper uses 0.75).')
    lut = config.lut
    errors.require(0 <= lut.momentum <= 1, 'lut.momentum', lut.momentum, 'use a momentum in [0, 1]')
    errors.require(lut.alpha > 0, 'lut.alpha', lut.alpha,
                   'use a positive weight (the paper: 0.25 for ViT-B), or lut.enabled=False')
    errors.require(lut.head_dim >= 1, 'lut.head_dim', lut.head_dim, 'use a positive width')

  def _init_heads(self, rng):
    x = jnp.zeros((2, self.host.width), jnp.float32)
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
    num_kept = outputs.keep_idx.shape[1]
    keep2, _ = masking.keep_from_order(outputs.patch_order, num_kept, view=1)
    enc2 = self.encoder.apply({'params': params['encoder']}, batch['image2'], keep_idx=keep2,
                              train=train, rngs={'dropout': rng})
    stats = state['batch_stats']
    student1, stats = self._student(params[self.name], stats,
                                    pool_visible(outputs.encoder['patch_tokens']), train)
    student2, stats = self._student(params[self.name], stats, pool_visible(enc2['patch_tokens']),
                                    train)
    context1 = self._context(state['context'], batch['image'])
    context2 = self._context(state['context'], batch['image2'])
    loss_bc = broader_context_loss(student1, student2, context1, context2)
    metrics = {'loss_lut': loss_bc,
               'lut_momentum': momentum_schedule(step, self.config.total_steps,
                                                 self.config.lut.momentum)}
    return self.config.lut.alpha * loss_bc, metrics, dict(state, batch_stats=stats)

  def flop_terms(self):
    """The student's second masked view (trained) and the context encoder on both full views."""
    return {'lut_view2': flops.TRAIN_FACTOR * self.host.encoder_flops(self.host.num_kept),
            'lut_context': 2 * self.host.encoder_flops()}

  def update_state(self, params, state, step):
    """Moves the context encoder (encoder, projector, projector statistics) toward the student."""
    online = dict(encoder=params['encoder'], projector=params[self.name]['projector'],
                  projector_stats=state['batch_stats']['projector'])
    momentum = momentum_schedule(step, self.config.total_steps, self.config.lut.momentum)
    return dict(state, context=teachers.ema_update(state['context'], online, momentum))
