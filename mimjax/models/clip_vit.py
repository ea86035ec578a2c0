"""CLIP's image tower (Radford et al., 2021) in Flax, to serve as a frozen distillation teacher.

Layout and parameter names follow the OpenAI / open_clip `VisionTransformer` (conv1 without bias,
class and position embeddings, ln_pre, pre-norm residual blocks, ln_post, proj) so that weights
convert one to one (`mimjax.interop.clip`). LayerNorms use eps 1e-5 and run in float32.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimjax.models import vit


def quick_gelu(x):
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(name):
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)); attention with a fused qkv projection."""
  num_heads: int
  mlp_dim: int
  quick_gelu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, width = x.shape
    head_dim = width // self.num_heads
    y = _layer_norm('ln_1')(x).astype(self.dtype)
    qkv = nn.Dense(3 * width, dtype=self.dtype, name='in_proj')(y)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, head_dim), 3, axis=2)
    y, _ = vit.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    y = y.reshape(b, n, width)
    x = x + nn.Dense(width, dtype=self.dtype, name='out_proj')(y)
    y = _layer_norm('ln_2')(x).astype(self.dtype)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name='c_fc')(y)
    y = quick_gelu(y) if self.quick_gelu else nn.gelu(y, approximate=False)
    return x + nn.Dense(width, dtype=self.dtype, name='c_proj')(y)


class CLIPVisionTransformer(nn.Module):
  """Returns dict(tokens=[B, N, out_dim] = ln_post(patch tokens) @ proj, pooled=[B, out_dim])."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  out_dim: int
  quick_gelu: bool = True
  dtype: Any = jnp.float32

  @property
  def grid_size(self):
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', use_bias=False, dtype=self.dtype, name='conv1')(
                    images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param('class_embedding', nn.initializers.normal(self.width ** -0.5), (self.width,))
    pos = self.param('positional_embedding', nn.initializers.normal(self.width ** -0.5),
                     (self.grid_size ** 2 + 1, self.width))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    x = _layer_norm('ln_pre')(x)
    for i in range(self.depth):
      x = ResidualAttentionBlock(self.num_heads, self.mlp_dim, self.quick_gelu, self.dtype,
                                 name=f'resblocks_{i}')(x)
    x = _layer_norm('ln_post')(x)
    proj = self.param('proj', nn.initializers.normal(self.width ** -0.5),
                      (self.width, self.out_dim))
    x = jnp.einsum('bnd,de->bne', x, proj, preferred_element_type=jnp.float32)
    return dict(tokens=x[:, 1:], pooled=x[:, 0])
