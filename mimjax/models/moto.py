"""MoTo, Modulation across Tokens (Qian et al., "What Makes for Good Tokenizers in Vision
Transformer?").

A patch tokenizer that normalises a pixel-resolution feature map X [B, h, w, c] over soft semantic
regions before the patch embedding:

  Z = u * (k_n(X)^T q(X)) + f(X)                                            (eq. 3)
  L = softmax over the n entities of tau * Z                                (eq. 4)
  MoTo(X) = sum_i ((X - mu_i) / (sigma_i + eps) * beta_i + alpha_i) * L_i   (eq. 5)

Choices the paper leaves open, and what this module does:
- X is a linear 3x3 conv stem (no activation) to `stem_channels` channels at stride
  `stem_stride` (s), or the normalised image itself with `stem_channels` = 0. The patch embedding
  after MoTo then patchifies X with (p/s) x (p/s) cells, so each token still covers p x p pixels.
- Parameter overhead over the plain ViT (Table 2: +0.4M for DeiT-S, +0.3M for DeiT-B): almost all
  of it is the patch embedding reading c channels instead of 3, (p/s)^2 c D - p^2 3 D. Table 2's
  overhead *falls* with width D, which no single (c, s) reproduces, so `configs/supervised.py`
  sets them per size: a stride-1 stem is too coarse for B (one channel costs p^2 D = 197k: 0.20M
  or 0.39M), a stride-2 one costs 64 D per channel (25k for S, 49k for B), and c = 28 (S) / 18 (B)
  give +0.396M / +0.296M (`tests/test_moto.py`). The library default (16 channels, stride 1,
  +1.28M on S) keeps MoTo at pixel resolution, as Table 3 times it (16 channels at 224 px).
- f, k and q are 1x1 convs with bias, with n, `key_dim` and `key_dim` outputs.
- The n feature points are k(X) at the centres of the cells of a gh x gw grid (gh * gw = n, gh the
  largest divisor of n not above sqrt(n): 8 -> 2 x 4, 16 -> 4 x 4), nearest pixel, no interpolation.
- k_n(X)^T q(X) is a plain dot product (no 1/sqrt(d)); u ~ N(0, 1), so at initialisation the
  correlation and f(X) enter Z on the same scale; tau multiplies Z, as the paper writes it.
- mu_i and sigma_i are the L_i-weighted mean and (biased) standard deviation of X over space, per
  image and channel (sum_p L_ip X_p / sum_p L_ip); eps = 1e-5 is added to sigma, as in eq. 5.
- beta_i, alpha_i are per entity and channel, initialised to 1 and 0 (identity affine).
- The partition, statistics and modulation run in float32; the convs in the compute dtype.
- The patch embedding after MoTo is the plain ViT one: a p x p, stride-p conv to the width.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import errors

Dtype = Any


def grid_points(height, width, n):
  """(rows, cols) int arrays [n] of the centres of a uniform gh x gw grid of cells, gh * gw = n."""
  gh = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
  gw = n // gh
  if gh > height or gw > width:
    raise ValueError(f'MoTo cannot place {n} feature points ({gh} x {gw}) on a {height} x {width} '
                     'map; use fewer entities (model.moto.entities).')
  rows = ((np.arange(gh) + 0.5) * height / gh).astype(np.int32)
  cols = ((np.arange(gw) + 0.5) * width / gw).astype(np.int32)
  return np.repeat(rows, gw), np.tile(cols, gh)


def modulate(x, layout, beta, alpha, eps):
  """Eq. 5: normalise `x` [B, h, w, c] per soft region of `layout` [B, h, w, n]; float32 out.

  `beta`, `alpha` are [n, c]. Expanded as x * sum_i L_i s_i + sum_i L_i (alpha_i - mu_i s_i) with
  s_i = beta_i / (sigma_i + eps), which never materialises a [B, h, w, n, c] tensor.
  """
  x = x.astype(jnp.float32)
  layout = layout.astype(jnp.float32)
  mass = jnp.maximum(layout.sum(axis=(1, 2)), 1e-6)[..., None]  # [B, n, 1]; guards an empty region
  mean = jnp.einsum('bhwc,bhwn->bnc', x, layout) / mass
  mean_sq = jnp.einsum('bhwc,bhwn->bnc', jnp.square(x), layout) / mass
  std = jnp.sqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0))
  scale = beta / (std + eps)  # [B, n, c]
  shift = alpha - mean * scale
  return (x * jnp.einsum('bhwn,bnc->bhwc', layout, scale)
          + jnp.einsum('bhwn,bnc->bhwc', layout, shift))


class MoTo(nn.Module):
  """Soft semantic partition (eqs. 3-4) and spatial-aware modulation (eq. 5) of [B, h, w, c].

  The layout L [B, h, w, n] is sown as intermediates/.../layout for visualisation.
  """
  entities: int = 8
  key_dim: int = 16
  temperature: float = 0.1
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    n = self.entities
    f = nn.Conv(n, (1, 1), dtype=self.dtype, name='f')(x)
    k = nn.Conv(self.key_dim, (1, 1), dtype=self.dtype, name='k')(x)
    q = nn.Conv(self.key_dim, (1, 1), dtype=self.dtype, name='q')(x)
    rows, cols = grid_points(h, w, n)
    k_n = k[:, rows, cols]  # [B, n, d]
    correlation = jnp.einsum('bhwd,bnd->bhwn', q, k_n, preferred_element_type=jnp.float32)
    u = self.param('u', nn.initializers.normal(1.0), (1, 1, n))
    z = u * correlation + f.astype(jnp.float32)
    layout = jax.nn.softmax(self.temperature * z, axis=-1)
    self.sow('intermediates', 'layout', layout)
    beta = self.param('beta', nn.initializers.ones, (n, c))
    alpha = self.param('alpha', nn.initializers.zeros, (n, c))
    return modulate(x, layout, beta, alpha, self.eps).astype(self.dtype)


class PatchEmbedding(nn.Module):
  """The p x p, stride-p patch convolution computed as patchify + matmul.

  Same params as `nn.Conv(width, (p, p), strides=(p, p), padding='VALID')` (kernel [p, p, C, width],
  Xavier-uniform over the flattened kernel, zero bias). MoTo trains through the embedding, so the
  step needs its input gradient, which XLA:CPU computes about 15x slower for the strided convolution
  than for the matmul (ViT-B/16, 16 channels at 224 px: 6.5 s against 0.35 s per batch of 8).
  """
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch_size
    kernel = self.param('kernel', nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, c, self.width))
    bias = self.param('bias', nn.initializers.zeros, (self.width,))
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h // p, w // p, p * p * c).astype(self.dtype)
    return x @ kernel.reshape(p * p * c, self.width).astype(self.dtype) + bias.astype(self.dtype)


class MoToTokenizer(nn.Module):
  """Images [B, H, W, C] -> stem -> MoTo -> patch embedding [B, H/p, W/p, width].

  Used as `ViT.tokenizer`; params: stem (absent with stem_channels=0), moto/{f,k,q,u,beta,alpha},
  embedding. A stem of stride s runs MoTo at 1/s of the image side; the embedding's cells are then
  p/s wide.
  """
  width: int
  patch_size: int
  entities: int = 8
  stem_channels: int = 16
  stem_stride: int = 1
  key_dim: int = 16
  temperature: float = 0.1
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    del train  # no randomness or batch statistics
    x = images.astype(self.dtype)
    s = self.stem_stride
    if self.patch_size % s or (s > 1 and not self.stem_channels):
      raise ValueError(f'model.moto.stem_stride={s} needs a stem (stem_channels > 0) and must '
                       f'divide the patch size {self.patch_size}.')
    if self.stem_channels:
      x = nn.Conv(self.stem_channels, (3, 3), strides=(s, s), padding='SAME', dtype=self.dtype,
                  name='stem')(x)
    x = MoTo(self.entities, self.key_dim, self.temperature, self.eps, self.dtype, name='moto')(x)
    return PatchEmbedding(self.width, self.patch_size // s, self.dtype, name='embedding')(x)


TOKENIZER_NORMS = ('none', 'moto')  # the plain patch embedding, or MoTo before it


def check_config(model_config, patch_size):
  """`config.model.tokenizer_norm` and, when it is moto, the `config.model.moto` fields."""
  errors.require_choice('model.tokenizer_norm', model_config.tokenizer_norm, TOKENIZER_NORMS)
  if model_config.tokenizer_norm != 'moto':
    return
  m = model_config.moto
  for key in ('entities', 'key_dim', 'stem_stride'):
    errors.require(m[key] >= 1, f'model.moto.{key}', m[key], 'use a positive integer')
  errors.require(m.stem_channels >= 0, 'model.moto.stem_channels', m.stem_channels,
                 'use >= 0 (0 = MoTo on the image)')
  errors.require(patch_size % m.stem_stride == 0 and (m.stem_stride == 1 or m.stem_channels),
                 'model.moto.stem_stride', m.stem_stride,
                 f'use 1 or a divisor of the patch size {patch_size} with a stem '
                 '(model.moto.stem_channels > 0)')
  for key in ('temperature', 'eps'):
    errors.require(m[key] > 0, f'model.moto.{key}', m[key], 'use a positive number')


def tokenizer_from_config(model_config, width, patch_size, dtype):
  """The tokenizer module of `config.model` (None for the plain patch embedding)."""
  if model_config.tokenizer_norm == 'none':
    return None
  if model_config.tokenizer_norm not in TOKENIZER_NORMS:
    raise ValueError(f'model.tokenizer_norm must be one of {TOKENIZER_NORMS}, not '
                     f'{model_config.tokenizer_norm!r}')
  m = model_config.moto
  return MoToTokenizer(width=width, patch_size=patch_size, entities=m.entities,
                       stem_channels=m.stem_channels, stem_stride=m.stem_stride,
                       key_dim=m.key_dim,
                       temperature=m.temperature, eps=m.eps, dtype=dtype)
