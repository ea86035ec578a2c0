"""Vision Transformer encoder with big_vision parameter names.

One encoder serves every use: MAE (visible tokens only, via `keep_idx`), SimMIM / distillation (a
mask token substituted for masked patches, via `mask` and `mask_token`), teachers, probes and
fine-tuning (`num_classes`). Per-layer token features and attention maps are returned only when
asked for (`capture_layers`, `capture_attention`), so the default path carries no extra cost.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import errors
from mimjax.models import moto
from mimjax.models import posemb as posemb_lib

# size -> (width, depth, mlp_dim, num_heads). mu and pico are tiny sizes for CPU runs and tests.
VARIANTS = {
    'mu': (32, 1, 128, 2),
    'pico': (128, 4, 512, 4),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}

Dtype = Any
xavier = nn.initializers.xavier_uniform()
# Xavier-uniform of timm's fused [3D, D] qkv Linear (MAE, SimMIM, DeiT), applied to each of the
# separate q/k/v kernels: variance 2 / (D + 3D), i.e. scale 1/2 of the per-kernel fan average D.
qkv_init = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')
RELPOS = ('none', 'block', 'shared', 'both')  # relative position bias: per block, shared, or both
# default: MAE's (Xavier); beit: BEiT's (and SimMIM's ViT's); timm: timm's VisionTransformer as
# DeiT runs it. See `normal_02` and `layer_kernel_inits`.
INITS = ('default', 'beit', 'timm')
POOLS = ('tok', 'gap')  # the class token, or the mean patch token
POSEMBS = ('learn', 'sincos2d', 'none')
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')  # auto: bfloat16 on GPU/TPU, float32 on CPU


def beit_normal(layer_id=0):
  """BEiT's weight init as its reference code runs it: N(0, 0.02^2) truncated to +-0.02 (one std,
  not the rescaled two-std flax default), divided by sqrt(2 * layer_id) when layer_id > 0 (the
  attention and MLP output projections of block layer_id, 1-based)."""
  scale = 0.02 / math.sqrt(2 * layer_id) if layer_id else 0.02

  def init(key, shape, dtype=jnp.float32):
    return scale * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)
  return init


def timm_trunc_normal(std):
  """timm's `trunc_normal_(w, std=std)`: N(0, std^2) cut at the *absolute* bounds +-2 (its
  defaults a=-2, b=2), so for a small std (MAE's head, 2e-5) the cut is never reached."""
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
  return init


def normal_02(weight_init, layer_id=0):
  """The std-0.02 init of a non-default `weight_init` (Linear and patch-embedding weights, tokens):
  BEiT cuts it at +-1 std (`beit_normal`); timm/DeiT call timm's `trunc_normal_`, cut at +-2
  absolute (`timm_trunc_normal`). layer_id > 0 divides it by sqrt(2 * layer_id)."""
  if weight_init == 'beit':
    return beit_normal(layer_id)
  return timm_trunc_normal(0.02 / math.sqrt(2 * layer_id) if layer_id else 0.02)


def layer_kernel_inits(weight_init, layer_id):
  """(q/k/v, attention out, MLP fc1, MLP fc2) kernel inits and the MLP bias init of block
  `layer_id` (1-based) under `weight_init`: MAE's Xavier (fused-qkv fans), or std 0.02, BEiT's
  rescaling the two output projections. Biases start at zero, as in all four references."""
  if weight_init == 'default':
    return qkv_init, xavier, xavier, xavier, nn.initializers.zeros
  out_id = layer_id if weight_init == 'beit' else 0
  plain, rescaled = normal_02(weight_init), normal_02(weight_init, out_id)
  return plain, rescaled, plain, rescaled, nn.initializers.zeros


def relative_position_index(grid_size, cls_token=True):
  """BEiT's int [T, T] index into a table of (2g-1)^2 + 3 relative-position entries (T = g*g + cls).

  Patch pairs index their (dy, dx) offset; the last three entries are cls-to-token, token-to-cls
  and cls-to-cls. Without a cls token, only the patch block remains.
  """
  g = grid_size
  coords = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (g - 1)
  num = (2 * g - 1) ** 2 + 3
  index = np.full((g * g + 1,) * 2, num - 3, np.int32)
  index[1:, 1:] = rel[0] * (2 * g - 1) + rel[1]
  index[1:, 0] = num - 2
  index[0, 0] = num - 1
  return index if cls_token else index[1:, 1:]


class RelativePositionBias(nn.Module):
  """Additive attention bias [1 or B, heads, T, T] from BEiT's learned table (zero init)."""
  num_heads: int
  grid_size: int
  cls_token: bool = True

  @nn.compact
  def __call__(self, token_pos=None):
    """token_pos: optional int [B, T] position of each token in the full (cls + grid) sequence,
    for encoders that drop tokens (MAE); None = all tokens in order."""
    num = (2 * self.grid_size - 1) ** 2 + 3
    table = self.param('relative_position_bias_table', nn.initializers.zeros,
                       (num, self.num_heads))
    index = jnp.asarray(relative_position_index(self.grid_size, self.cls_token))
    if token_pos is None:
      index = index[None]
    else:
      index = index[token_pos[:, :, None], token_pos[:, None, :]]
    return jnp.moveaxis(table[index], -1, 1)


def parse_variant(variant):
  """'S/16' -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16)."""
  size, _, patch = variant.partition('/')
  if size not in VARIANTS or not patch.isdigit():
    raise ValueError(f'Unknown model variant {variant!r}: use "<size>/<patch>" with size in '
                     f'{sorted(VARIANTS)} and an integer patch size, e.g. "S/16".')
  width, depth, mlp_dim, num_heads = VARIANTS[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(patch))


def check_config(config):
  """The `config.model` fields (and the image size the patches must tile), before anything runs."""
  m = config.model
  try:
    patch = parse_variant(m.variant)['patch_size']
  except ValueError as e:
    raise errors.ConfigError(f'config.model.variant: {e}') from e
  errors.require(patch >= 1, 'model.variant', m.variant, 'the patch size must be positive')
  size = config.data.image_size
  errors.require(size >= patch and size % patch == 0, 'data.image_size', size,
                 f'use a positive multiple of the patch size {patch} of model {m.variant!r} '
                 f'(e.g. {size // patch * patch or patch})')
  errors.require_choice('model.posemb', m.posemb, POSEMBS)
  errors.require_choice('model.pool', m.pool, POOLS)
  errors.require(m.cls_token or m.pool != 'tok', 'model.pool', m.pool,
                 'pool "tok" needs model.cls_token=True; use pool="gap" without it')
  errors.require_choice('model.rel_pos', m.rel_pos, RELPOS)
  errors.require_choice('model.weight_init', m.weight_init, INITS)
  errors.require_choice('model.dtype', m.dtype, DTYPES)
  errors.require(m.layerscale >= 0, 'model.layerscale', m.layerscale, 'use >= 0 (0 = off)')
  errors.require(0 <= m.drop_path < 1, 'model.drop_path', m.drop_path, 'use a rate in [0, 1)')
  errors.require(m.num_classes >= 0, 'model.num_classes', m.num_classes, 'use >= 0 (0 = no head)')
  errors.require(m.head_init_std >= 0, 'model.head_init_std', m.head_init_std,
                 'use >= 0 (0 = a zero head; MAE fine-tuning uses 2e-5)')
  moto.check_config(m, patch)


def grid_size(model_config, image_size):
  """Patches per side of a `config.model` ViT at `image_size` pixels."""
  return image_size // parse_variant(model_config.variant)['patch_size']


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> exact GELU -> Dense (as timm's `Mlp`)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  weight_init: str = 'default'  # one of INITS
  layer_id: int = 1  # the block's 1-based index (BEiT's init rescales fc2 by it)

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    _, _, fc1_init, fc2_init, bias_init = layer_kernel_inits(self.weight_init, self.layer_id)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=fc1_init, bias_init=bias_init)(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(width, dtype=self.dtype, kernel_init=fc2_init, bias_init=bias_init)(x)


def _prefers_cudnn(dtype):
  """Whether to ask for cuDNN's fused flash attention: half precision on a GPU (XLA's otherwise)."""
  return jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _sum_to_shape(x, shape):
  """`x` summed over the axes that `shape` broadcasts (leading ones, and those of size 1)."""
  x = jnp.sum(x, axis=tuple(range(x.ndim - len(shape))))
  return jnp.sum(x, axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1),
                 keepdims=True)


def _attention_forward(q, k, v, bias):
  """softmax(q k^T / sqrt(d) + bias) v, logits and softmax float32; (out, residuals)."""
  logits = jnp.einsum('btnh,bsnh->bnts', q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bnts,bsnh->btnh', probs.astype(v.dtype), v)
  return out, (q, k, v, bias, probs, out)


def _attention_backward(residuals, d_out):
  """The gradients of `_attention_forward`. The softmax's backward needs rowsum(dP * P) over the
  [B, heads, T, S] scores; it equals rowsum(dO * O) over [B, T, heads, d] (FlashAttention's D),
  which spares XLA:CPU a reduction fused into the dO V^T product (the step's slowest kernel)."""
  q, k, v, bias, probs, out = residuals
  d_v = jnp.einsum('bnts,btnh->bsnh', probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum('btnh,bsnh->bnts', d_out, v, preferred_element_type=jnp.float32)
  row = jnp.einsum('btnh,btnh->bnt', d_out, out, preferred_element_type=jnp.float32)
  d_logits = probs * (d_probs - row[..., None])
  d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
  d_scaled = (d_logits / math.sqrt(q.shape[-1])).astype(q.dtype)
  d_q = jnp.einsum('bnts,bsnh->btnh', d_scaled, k)
  d_k = jnp.einsum('bnts,btnh->bsnh', d_scaled, q)
  return d_q, d_k, d_v, d_bias


@jax.custom_vjp
def xla_attention(q, k, v, bias=None):
  """Attention as `jax.nn.dot_product_attention`'s XLA path, with the backward pass of
  `_attention_backward` (equal to float32 rounding; faster on XLA:CPU)."""
  return _attention_forward(q, k, v, bias)[0]


xla_attention.defvjp(_attention_forward, _attention_backward)


def dot_product_attention(q, k, v, bias=None, return_weights=False):
  """softmax(q k^T / sqrt(d) + bias) v for q, k, v [B, N, heads, d]; logits and softmax float32.

  `bias` is an optional additive logit bias broadcastable to [B, heads, N, N] (e.g. relative
  position bias). The default path is cuDNN's fused attention where it applies, else
  `xla_attention`, which returns no weights; only `return_weights=True` (attention maps for MTO and
  analyses) takes the explicit einsum path and returns the [B, heads, N, N] float32 weights as
  well (else None).
  """
  if not return_weights:
    if _prefers_cudnn(q.dtype):
      try:
        return jax.nn.dot_product_attention(q, k, v, bias, implementation='cudnn'), None
      except (ValueError, NotImplementedError, RuntimeError):
        pass  # shapes, dtypes or cuDNN version the fused kernel does not cover: XLA below
    if q.dtype == jnp.float16 and jax.default_backend() == 'cpu':
      # XLA:CPU has no float16 dot accumulating in float32 (F16_F16_F32), which jax's attention
      # asks for: float16 runs on CPU (the loss-scaling tests) compute attention in float32.
      out = xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                          bias)
      return out.astype(q.dtype), None
    return xla_attention(q, k, v, bias), None
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v), weights


class ProjectionParams(nn.Module):
  """The kernel [width, heads, head_dim] and bias [heads, head_dim] of one q/k/v projection.

  Created exactly as `nn.DenseGeneral` creates them (same names, shapes, and the flattened
  [width, heads * head_dim] kernel initialisation), so checkpoints and big_vision names are
  unchanged; `MultiHeadAttention` applies q, k and v together as one fused product.
  """
  num_heads: int
  head_dim: int
  kernel_init: Any
  use_bias: bool = True

  @nn.compact
  def __call__(self, width):
    shape = (width, self.num_heads, self.head_dim)
    flat_init = lambda key, shape, dtype=jnp.float32: self.kernel_init(  # noqa: E731
        key, (shape[0], shape[1] * shape[2]), dtype).reshape(shape)
    kernel = self.param('kernel', flat_init, shape)
    if self.use_bias:
      return kernel, self.param('bias', nn.initializers.zeros, shape[1:])
    return kernel, jnp.zeros(shape[1:], kernel.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention with q/k/v/out DenseGeneral params (flax/big_vision layout), f32 softmax.

  q, k and v are computed by one [width, 3 * width] matrix product (as timm's fused `qkv`
  Linear): one larger product instead of three, and one for their input gradient.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  weight_init: str = 'default'  # one of INITS; 'beit' has no key bias (q/v bias)
  layer_id: int = 1  # the block's 1-based index (BEiT's init rescales `out` by it)

  @nn.compact
  def __call__(self, x, return_weights=False, bias=None):
    """x [B, N, width] -> ([B, N, width], weights or None); `bias`: an additive attention-logit bias
    [1 or B, heads, T, T] (relative position), see dot_product_attention."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    qkv_kernel_init, out_init, _, _, _ = layer_kernel_inits(self.weight_init, self.layer_id)
    no_key_bias = self.weight_init == 'beit'
    kernels, biases = zip(*(
        ProjectionParams(self.num_heads, head_dim, qkv_kernel_init,
                         use_bias=not (no_key_bias and name == 'key'), name=name)(width)
        for name in ('query', 'key', 'value')))
    kernel = jnp.stack(kernels, axis=1).astype(self.dtype)  # [width, 3, heads, head_dim]
    qkv = jnp.einsum('...d,dthk->...thk', x.astype(self.dtype), kernel)
    qkv = qkv + jnp.stack(biases).astype(self.dtype)
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    out, weights = dot_product_attention(q, k, v, bias, return_weights)
    # DenseGeneral initialises the flattened 2-D kernel, so plain Xavier has the right fans.
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out',
                          kernel_init=out_init)(out)
    return out, weights


class LayerScale(nn.Module):
  """Per-channel learnable scale of a residual branch (CaiT / timm `ls1`, `ls2`)."""
  init_value: float

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), with drop path."""
  mlp_dim: int
  num_heads: int
  layerscale: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  rel_pos_grid: int = 0  # > 0: a relative position bias of its own over this grid (BEiT)
  cls_token: bool = True
  weight_init: str = 'default'  # one of INITS
  layer_id: int = 1  # this block's 1-based index

  @nn.compact
  def __call__(self, x, train=False, return_weights=False, shared_bias=None, token_pos=None):
    """shared_bias: optional attention bias from the Transformer; token_pos: see
    `RelativePositionBias`."""
    def branch(y, idx):
      if self.layerscale:
        y = LayerScale(self.layerscale, name=f'LayerScale_{idx}')(y)
      # Stochastic depth: drop the whole branch per sample (broadcast over tokens and channels).
      return nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)(y)

    bias = shared_bias
    if self.rel_pos_grid:
      own = RelativePositionBias(self.num_heads, self.rel_pos_grid, self.cls_token,
                                 name='rel_pos_bias')(token_pos)
      bias = own if bias is None else bias + own
    y = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name='LayerNorm_0')(x)
    attention = MultiHeadAttention(self.num_heads, self.dtype, self.weight_init, self.layer_id,
                                   name='MultiHeadDotProductAttention_0')
    y, weights = attention(y, return_weights=return_weights, bias=bias)
    x = x + branch(y, 0).astype(x.dtype)
    y = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name='LayerNorm_1')(x)
    y = MlpBlock(self.mlp_dim, self.dtype, self.weight_init, self.layer_id, name='MlpBlock_0')(y)
    x = x + branch(y, 1).astype(x.dtype)
    return x, weights


class Transformer(nn.Module):
  """Stack of blocks plus the final norm (unless `final_norm=False`); optionally records every
  layer's input/output."""
  depth: int
  mlp_dim: int
  num_heads: int
  layerscale: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  norm_name: str = 'encoder_norm'
  rel_pos: str = 'none'  # one of RELPOS
  grid_size: int = 0  # patch grid side, needed with rel_pos
  cls_token: bool = True
  weight_init: str = 'default'  # one of INITS
  final_norm: bool = True  # False: the blocks' output as is (the ViT's fc_norm normalises later)

  @nn.compact
  def __call__(self, x, train=False, capture_layers=False, capture_attention=False,
               token_pos=None):
    """token_pos: see `RelativePositionBias` (only read with relative position bias)."""
    block_cls = Encoder1DBlock
    if self.remat:
      block_cls = nn.remat(Encoder1DBlock, static_argnums=(2, 3))
    shared_bias = None
    if self.rel_pos in ('shared', 'both'):
      shared_bias = RelativePositionBias(self.num_heads, self.grid_size, self.cls_token,
                                         name='rel_pos_bias')(token_pos)
    block_grid = self.grid_size if self.rel_pos in ('block', 'both') else 0
    layers, attention = [x], []
    for i in range(self.depth):
      x, weights = block_cls(self.mlp_dim, self.num_heads, self.layerscale,
                             self.drop_path * i / max(self.depth - 1, 1), self.dtype,
                             block_grid, self.cls_token, self.weight_init, i + 1,
                             name=f'encoderblock_{i}')(x, train, capture_attention, shared_bias,
                                                       token_pos)
      if capture_layers:
        layers.append(x)
      if capture_attention:
        attention.append(weights)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name=self.norm_name)(x)
    return x, dict(layers=layers if capture_layers else None,
                     attention=attention if capture_attention else None)


class ViT(nn.Module):
  """ViT encoder. Params: embedding, pos_embedding, cls, Transformer/..., fc_norm, head."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int
  posemb: str = 'sincos2d'
  cls_token: bool = True
  pool: str = 'tok'
  layerscale: float = 0.0
  drop_path: float = 0.0
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  remat: bool = False
  tokenizer: Optional[nn.Module] = None  # replaces the plain patch embedding (e.g. MoTo)
  rel_pos: str = 'none'  # relative position bias (BEiT): one of RELPOS
  weight_init: str = 'default'  # one of INITS (see `normal_02`, `layer_kernel_inits`)
  # MAE's fine-tuning model (`models_vit.py` with global_pool) and timm's fc_norm=True: no final
  # norm on the tokens; the pooled feature gets a LayerNorm of its own, `fc_norm`.
  fc_norm: bool = False
  head_init_std: float = 0.0  # the head kernel's init: 0 = zeros; else timm's trunc_normal_(std)

  @property
  def grid_size(self):
    return self.image_size // self.patch_size

  @property
  def num_patches(self):
    return self.grid_size ** 2

  @property
  def num_prefix(self):
    return int(self.cls_token)

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image size {self.image_size} is not a multiple of patch size '
                       f'{self.patch_size}; choose data.image_size = k * {self.patch_size}.')
    if self.pool not in POOLS:
      raise ValueError(f'model.pool must be one of {POOLS}, not {self.pool!r}')
    if self.pool == 'tok' and not self.cls_token:
      raise ValueError('model.pool="tok" needs model.cls_token=True; use pool="gap" without it.')
    if self.rel_pos not in RELPOS:
      raise ValueError(f'model.rel_pos must be one of {RELPOS}, not {self.rel_pos!r}')
    if self.weight_init not in INITS:
      raise ValueError(f'model.weight_init must be one of {INITS}, not {self.weight_init!r}')
    default = self.weight_init == 'default'
    token_init = nn.initializers.normal(0.02) if default else normal_02(self.weight_init)
    if self.tokenizer is None:
      if default:  # Xavier-uniform over the flattened [p*p*C, width] kernel, as MAE's
        embedding_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
      elif self.weight_init == 'timm':  # timm leaves PyTorch's Conv2d default, U(+-1/sqrt(fan_in))
        embedding_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform',
                                                          in_axis=(0, 1, 2), out_axis=3)
      else:
        embedding_init = normal_02(self.weight_init)
      self.embedding = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                               padding='VALID', dtype=self.dtype, name='embedding',
                               kernel_init=embedding_init)
    if self.posemb == 'learn':
      # As timm / MAE: the cls token has a learned position slot of its own (index 0).
      self.pos_embedding = self.param('pos_embedding', token_init,
                                      (1, self.num_prefix + self.num_patches, self.width))
    elif self.posemb not in POSEMBS:
      raise ValueError(f'model.posemb must be one of {POSEMBS}, not {self.posemb!r}')
    if self.cls_token:
      self.cls = self.param('cls', token_init, (1, 1, self.width))
    self.Transformer = Transformer(self.depth, self.mlp_dim, self.num_heads, self.layerscale,
                                   self.drop_path, self.dtype, self.remat, rel_pos=self.rel_pos,
                                   grid_size=self.grid_size, cls_token=self.cls_token,
                                   weight_init=self.weight_init, final_norm=not self.fc_norm)
    if self.fc_norm:
      self.fc_norm_layer = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name='fc_norm')
    if self.num_classes:
      kernel_init = (timm_trunc_normal(self.head_init_std) if self.head_init_std
                     else nn.initializers.zeros)
      self.head = nn.Dense(self.num_classes, kernel_init=kernel_init, name='head')

  def position_embedding(self):
    """([1, N, width] patch position embedding, [1, 1, width] cls one or None).

    Fixed sin-cos embeddings give the cls token none (MAE's zero slot); learned ones give it its
    own learned slot. posemb 'none' (BEiT with relative position bias only) gives (None, None).
    """
    if self.posemb == 'learn':
      return self.pos_embedding[:, self.num_prefix:], self.pos_embedding[:, :self.num_prefix]
    if self.posemb == 'none':
      return None, None
    return jnp.asarray(posemb_lib.sincos_2d(self.grid_size, self.width))[None], None

  def tokenize(self, images, train=False):
    """Images [B, H, W, C] -> patch tokens [B, N, width] before position embedding."""
    if images.ndim != 4 or images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f'expected images [B, {self.image_size}, {self.image_size}, C], '
                       f'got {images.shape}; set data.image_size to match the model.')
    x = images.astype(self.dtype)
    x = self.embedding(x) if self.tokenizer is None else self.tokenizer(x, train=train)
    return x.reshape(x.shape[0], -1, self.width)

  def __call__(self, images, *, keep_idx=None, mask=None, mask_token=None, train=False,
               capture_layers=False, capture_attention=False):
    """Encodes images.

    Args:
      images: [B, H, W, C] normalised images.
      keep_idx: optional int [B, n] indices of the patches to keep (MAE); the rest are dropped.
      mask: optional bool [B, N], True where `mask_token` replaces the patch embedding (SimMIM).
      mask_token: [width] or [1, 1, width] learned token, required with `mask`.
      capture_layers / capture_attention: also return every layer's tokens / attention maps.

    Returns a dict: `tokens` [B, T, width] after the final norm (cls first when present; the
    last block's output with `fc_norm`), `patch_tokens` (without cls), `pooled` [B, width] (with
    `fc_norm`, normalised by it), `tokenizer` [B, N, width] (the tokenizer's
    output), `logits` with a head, and `layers` (input of block 0, then each block's output, each
    [B, T, width]) and `attention` ([B, heads, T, T] per block) when captured.
    """
    tokens = self.tokenize(images, train)
    x = tokens
    if mask is not None:
      x = jnp.where(mask[..., None], jnp.reshape(mask_token, (1, 1, -1)).astype(x.dtype), x)
    patch_pos, cls_pos = self.position_embedding()
    if patch_pos is not None:
      x = x + patch_pos.astype(x.dtype)
    token_pos = None
    if keep_idx is not None:
      x = jnp.take_along_axis(x, keep_idx[..., None], axis=1)
      if self.rel_pos != 'none':  # positions of the kept tokens in the full (cls + grid) sequence
        cls_pos_idx = jnp.zeros((x.shape[0], self.num_prefix), keep_idx.dtype)
        token_pos = jnp.concatenate([cls_pos_idx, keep_idx + self.num_prefix], axis=1)
    if self.cls_token:
      cls = self.cls if cls_pos is None else self.cls + cls_pos
      cls = jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype)
      x = jnp.concatenate([cls, x], axis=1)
    x, extras = self.Transformer(x, train, capture_layers, capture_attention, token_pos)
    patch_tokens = x[:, self.num_prefix:]
    pooled = x[:, 0] if self.pool == 'tok' else patch_tokens.mean(axis=1)
    if self.fc_norm:
      pooled = self.fc_norm_layer(pooled)
    out = dict(tokens=x, patch_tokens=patch_tokens, pooled=pooled, tokenizer=tokens, **extras)
    if self.num_classes:
      out['logits'] = self.head(pooled).astype(jnp.float32)
    return out


def auto_dtype(device):
  """The compute dtype 'auto' picks on `device`: bfloat16 on TPU and on GPUs of compute capability
  >= 8.0 (Ampere and later, with bfloat16 tensor cores); float16 on older GPUs (T4 is 7.5, V100
  7.0), which have float16 tensor cores but no bfloat16 (emulated, slow, or refused), trained with
  dynamic loss scaling (see `train_step`); float32 on CPU, where reduced-precision matmuls are
  emulated and slower than float32. A GPU without a readable `compute_capability` counts as >= 8.0.
  """
  if device.platform == 'tpu':
    return jnp.dtype(jnp.bfloat16)
  if device.platform in ('gpu', 'cuda', 'rocm'):
    capability = getattr(device, 'compute_capability', None)
    try:
      major = float(capability) if capability is not None else 8.0
    except (TypeError, ValueError):
      major = 8.0
    return jnp.dtype(jnp.bfloat16 if major >= 8.0 else jnp.float16)
  return jnp.dtype(jnp.float32)


def compute_dtype(name):
  """A config's compute dtype name -> dtype; 'auto' is `auto_dtype` of the first device."""
  if name == 'auto':
    return auto_dtype(jax.devices()[0])
  return jnp.dtype(name)


def encoder_kwargs(model_config, image_size):
  """Keyword arguments of `ViT` from a `config.model` section."""
  kw = parse_variant(model_config.variant)
  kw.update(image_size=image_size, posemb=model_config.posemb, cls_token=model_config.cls_token,
            pool=model_config.pool, layerscale=model_config.layerscale,
            drop_path=model_config.drop_path, num_classes=model_config.num_classes,
            dtype=compute_dtype(model_config.dtype), remat=model_config.remat,
            rel_pos=model_config.rel_pos, weight_init=model_config.weight_init,
            fc_norm=model_config.fc_norm, head_init_std=model_config.head_init_std)
  kw['tokenizer'] = moto.tokenizer_from_config(model_config, kw['width'], kw['patch_size'],
                                               kw['dtype'])
  return kw


def from_config(config, **overrides):
  """The mimjax ViT of a run's `config` (config.model at config.data.image_size): the one module
  every framework keeps under params['encoder'] and that teachers, evaluation and export build
  again. `overrides` replace single arguments (e.g. drop_path=0.0 for a frozen copy)."""
  return ViT(**{**encoder_kwargs(config.model, config.data.image_size), **overrides})


def count_params(params):
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
