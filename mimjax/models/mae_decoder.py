"""MAE decoder: visible encoder tokens + learned mask tokens -> per-patch pixel predictions."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mimjax.models import posemb as posemb_lib
from mimjax.models import vit


class MAEDecoder(nn.Module):
  """Embeds the encoder's tokens, puts them back at their grid positions among mask tokens, adds
  fixed sin-cos position embeddings and runs a small transformer (He et al., 2022).

  Params: decoder_embed, mask_token, Transformer/{encoderblock_i, decoder_norm}, decoder_pred.
  """
  width: int
  depth: int
  num_heads: int
  mlp_ratio: int
  grid_size: int
  out_dim: int  # per-patch prediction size, e.g. p * p * C pixels
  num_prefix: int = 1  # cls tokens at the front of the encoder output
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, keep_idx, train=False, capture_layers=False):
    """tokens: [B, num_prefix + n_keep, D_enc]; keep_idx: [B, n_keep].

    Returns dict(pred=[B, N, out_dim], layers=...) where layers[0] is the decoder's input after
    its embedding with mask tokens inserted and position embeddings added (cls excluded).
    """
    num_patches = self.grid_size ** 2
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.xavier, name='decoder_embed')(tokens)
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
    prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
    batch = jnp.arange(x.shape[0])[:, None]
    full = jnp.broadcast_to(mask_token.astype(x.dtype), (x.shape[0], num_patches, self.width))
    full = full.at[batch, keep_idx].set(visible)
    full = full + jnp.asarray(posemb_lib.sincos_2d(self.grid_size, self.width), x.dtype)[None]
    x = jnp.concatenate([prefix, full], axis=1)
    x, extras = vit.Transformer(self.depth, self.width * self.mlp_ratio, self.num_heads,
                                dtype=self.dtype, norm_name='decoder_norm', name='Transformer')(
                                    x, train, capture_layers)
    pred = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=vit.xavier,
                    name='decoder_pred')(x[:, self.num_prefix:])
    layers = None
    if capture_layers:
      layers = [layer[:, self.num_prefix:] for layer in extras['layers']]
    return dict(pred=pred.astype(jnp.float32), layers=layers)
