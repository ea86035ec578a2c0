"""MTO, Masked Token Optimization (Choi et al., "Emerging Property of Masked Token for Effective
Pre-training"): entropy losses on the affinity between masked and visible tokens.

Notation: x [B, N, D] token features of one layer (patch tokens only, no cls), mask bool [B, N]
True for masked positions (the ones holding the mask token at layer 0). Every quantity is computed
in float32, per image, then averaged over the batch; masks keep all shapes static under jit.

Choices the paper leaves open (defaults follow the paper; see docs/recipes.md):
- Affinities are eq. (2)'s A = softmax(X_M X_V^T) on the layer's raw features, no temperature
  (mto.tau=1, mto.layer_norm=False). Options: layer-normalised features (zero mean, unit variance
  per token, no learned scale) and a temperature (mto.tau=0 means sqrt(D)). Their scale argument:
  raw dot products grow with the feature norm, so the entropies partly measure the norm and the
  losses can lower or raise them by rescaling features (L_e by shrinking layer-0 norms); with
  normalised features and tau = sqrt(D) the logits are correlations of O(1) and H measures only
  the direction of the features. On a trained MAE decoder the two forms give opposite per-layer
  trends (issue 23: raw falls 0.59 -> 0.12 -> 0.06 over decoder layers, as the paper's Fig. 1a;
  normalised rises 2.14 -> 2.36 -> 2.47), so the normalised form is not the paper's quantity.
- L_spa's affinity psi(X X^T) is printed over all tokens, each token's similarity to itself
  included. On raw (or normalised, tau = sqrt(D)) features the self logit |x|^2 dwarfs the others,
  so every visible row puts almost all its mass on itself and L_spa is ~0 with no gradient: the
  term is inert (see `self_mass` and docs/recipes.md for the measurements). The default
  (mto.spa_self=False) leaves the diagonal out, the only reading under which L_spa can move a
  visible token's weight from masked to visible tokens, as the paper intends.
- Eq. (3) sums row entropies over visible rows; here they are averaged (as H averages over masked
  rows), so the term does not scale with the number of visible tokens.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections

from mimjax import errors
from mimjax.frameworks import base
from mimjax.models import vit

RANKINGS = ('decrease', 'printed')


def row_entropy(logits, valid):
  """Entropy of softmax(logits) over the columns where `valid` (broadcastable) is True.

  Uses H = logsumexp(z) - sum_j p_j z_j, which has finite gradients when some p_j are zero.
  """
  logits = logits.astype(jnp.float32)
  valid = jnp.broadcast_to(valid, logits.shape)
  masked = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  lse = jax.nn.logsumexp(masked, axis=-1)
  p = jax.nn.softmax(masked, axis=-1)
  return lse - jnp.sum(p * jnp.where(valid, logits, 0.0), axis=-1)


def affinity_logits(x, tau=1.0, layer_norm=False):
  """Token-by-token logits X X^T / tau, [B, N, N] in float32; tau None or 0 means sqrt(D)."""
  x = x.astype(jnp.float32)
  if layer_norm:
    x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
  tau = tau or math.sqrt(x.shape[-1])
  return jnp.einsum('bnd,bmd->bnm', x, x) / tau


def affinity_options(mto_config):
  """Keyword arguments of the affinity (tau, layer_norm) from a run's `config.mto`."""
  return dict(tau=mto_config.tau or None, layer_norm=mto_config.layer_norm)


def _mean_over_rows(values, rows):
  """Per image mean of values [B, N] over `rows` [B, N], then the batch mean."""
  rows = rows.astype(jnp.float32)
  return jnp.mean(jnp.sum(values * rows, -1) / jnp.maximum(rows.sum(-1), 1.0))


def heterogeneity(x, mask, tau=1.0, layer_norm=False):
  """Eq. (2): mean over masked rows of the entropy of the softmax over visible tokens.

  High H: masked tokens are equally (un)related to all visible tokens; at most log(#visible).
  """
  logits = affinity_logits(x, tau, layer_norm)
  entropy = row_entropy(logits, ~mask[:, None, :])
  return _mean_over_rows(entropy, mask)


def _off_diagonal(n):
  """[1, N, N] True except on the diagonal."""
  return ~jnp.eye(n, dtype=bool)[None]


def self_mass(x, mask, tau=1.0, layer_norm=False):
  """Mean over visible rows of the softmax weight (over all tokens) a token puts on itself."""
  p = jax.nn.softmax(affinity_logits(x, tau, layer_norm), axis=-1)
  return _mean_over_rows(jnp.diagonal(p, axis1=-2, axis2=-1), ~mask)


def sparsity_loss(x, mask, tau=1.0, layer_norm=False, include_self=False):
  """L_spa, eq. (3): mean over visible rows of the entropy of the softmax over all tokens
  (without the token itself unless `include_self`, see the module docstring).

  Minimal (zero) when every visible token puts all its weight on one token; the paper's
  supplementary proof shows the minimum is reached with that weight on a visible token, so that
  visible tokens stop aggregating the semantically void mask tokens.
  """
  logits = affinity_logits(x, tau, layer_norm)
  entropy = row_entropy(logits, True if include_self else _off_diagonal(x.shape[1]))
  return _mean_over_rows(entropy, ~mask)


def distinctiveness_loss(h0, eps=1e-6):
  """L_e, eq. (4): 1 / (H^0 + eps), minimised by making layer-0 masked tokens distinct."""
  return 1.0 / (h0 + eps)


def ranking_loss(hs, form='decrease'):
  """L_r, eq. (5), over consecutive heterogeneities hs [L + 1] (layer 0 first).

  form='decrease' (default) sums softplus(H^l - H^{l-1}): it penalises heterogeneity that grows
  with depth, which is what the paper's text, Fig. 1 and its ablation ("all heterogeneity
  converges to zero" when L_r is used alone) describe. form='printed' sums
  softplus(H^{l-1} - H^l), eq. (5) as printed, which is minimised by *increasing* H with depth and
  so contradicts the text; it is kept for comparison.
  """
  if form not in RANKINGS:
    raise ValueError(f'ranking form must be one of {RANKINGS}, not {form!r}')
  diff = hs[1:] - hs[:-1]
  return jnp.sum(jax.nn.softplus(diff if form == 'decrease' else -diff))


class MTO(base.Plugin):
  """Adds lambda_spa * L_spa + lambda_e * L_e + lambda_r * L_r on the framework's mask-token site.

  Reads the per-layer tokens of the encoder (SimMIM) or of the MAE decoder (`mto.where`): layer 0
  is the input of the first block (mask tokens substituted, position embeddings added), layers
  1..L the block outputs. Logs every layer's heterogeneity as `mto_H{l}`.
  """
  name = 'mto'

  @classmethod
  def config_fields(cls):
    """`config.mto`: where the affinities are taken, their temperature, the weights of the three
    losses."""
    s = ml_collections.ConfigDict()
    s.enabled = False
    s.where = 'encoder'  # encoder (SimMIM: mask tokens in the encoder) | decoder (MAE's decoder)
    s.tau = 1.0  # affinity temperature; 1 = eq. 2 (none); 0 means sqrt(feature dim)
    s.layer_norm = False  # layer-normalise (no params) the features first; False = eq. 2 (raw)
    s.spa_self = False  # L_spa counts each token's affinity to itself (inert: mto.py docstring)
    s.ranking = 'decrease'  # decrease (the text's intent) | printed (eq. 5 as printed)
    s.lambda_spa = 1.0  # weight of L_spa (eq. 3): visible tokens ignore masked ones at layer 0
    s.lambda_e = 1.0  # weight of L_e (eq. 4): 1 / (H^0 + eps), maximises layer-0 heterogeneity
    s.lambda_r = 1.0  # weight of L_r (eq. 5): heterogeneity ranked to fall with depth
    s.eps = 1e-6  # epsilon of L_e
    return s

  @classmethod
  def enabled(cls, config):
    return config.mto.enabled

  @classmethod
  def requires(cls, config):
    where = config.mto.where
    fix = (f'config.mto.where={where!r} needs a framework with mask tokens in its {where}: '
           f'{"MAE" if where == "decoder" else "SimMIM"}, or set config.mto.where='
           f'{"encoder" if where == "decoder" else "decoder"} for '
           f'{"SimMIM" if where == "decoder" else "MAE"}')
    return {f'{where}_mask_tokens': fix, f'{where}_layers': fix}

  @classmethod
  def check_config(cls, config):
    mto = config.mto
    if mto.where not in ('encoder', 'decoder'):
      raise errors.ConfigError(f'config.mto.where must be "encoder" or "decoder", not '
                               f'{mto.where!r}.')
    if mto.ranking not in RANKINGS:
      raise errors.ConfigError(f'config.mto.ranking must be one of {RANKINGS}, not '
                               f'{mto.ranking!r}.')
    errors.require(mto.tau >= 0, 'mto.tau', mto.tau, 'use >= 0 (0 means sqrt(D))')
    for key in ('lambda_spa', 'lambda_e', 'lambda_r'):
      errors.require(mto[key] >= 0, f'mto.{key}', mto[key], 'use a weight >= 0 (0 = that term off)')
    errors.require(mto.eps > 0, 'mto.eps', mto.eps, 'use a positive epsilon')

  def layers(self, outputs):
    """Per-layer patch tokens [B, N, D] (cls removed) of the configured site."""
    if self.config.mto.where == 'decoder':
      return outputs.decoder['layers']
    num_prefix = vit.from_config(self.config).num_prefix
    return [layer[:, num_prefix:] for layer in outputs.encoder['layers']]

  def loss(self, params, state, outputs, batch, rng, step, train):
    del params, batch, rng, step, train
    mto = self.config.mto
    mask = outputs.mask
    layers = self.layers(outputs)
    kw = affinity_options(mto)
    hs = jnp.stack([heterogeneity(x, mask, **kw) for x in layers])
    l_spa = sparsity_loss(layers[0], mask, include_self=mto.spa_self, **kw)
    l_e = distinctiveness_loss(hs[0], mto.eps)
    l_r = ranking_loss(hs, mto.ranking)
    term = mto.lambda_spa * l_spa + mto.lambda_e * l_e + mto.lambda_r * l_r
    metrics = dict(loss_mto=term, loss_mto_spa=l_spa, loss_mto_e=l_e, loss_mto_r=l_r)
    metrics.update({f'mto_H{l}': h for l, h in enumerate(hs)})
    return term, metrics, state
