"""The ViT encoder with a learned mask token substituted for masked patches, plus a per-token
linear head: SimMIM's pixel regressor and the distillation student share it."""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from mimjax.models import vit


class MaskedEncoderWithHead(nn.Module):
  """Params: encoder/..., mask_token [1, 1, width] (top level), head/{kernel, bias}."""
  encoder: vit.ViT
  out_dim: int  # per-token output: p * p * C pixels (SimMIM) or the teacher's width (distill)
  mask_token_init: Callable
  head_init: Callable

  @nn.compact
  def __call__(self, images, mask, train=False, capture=frozenset()):
    """(encoder outputs, per-patch predictions [B, N, out_dim] in float32)."""
    mask_token = self.param('mask_token', self.mask_token_init, (1, 1, self.encoder.width))
    enc = self.encoder(images, mask=mask, mask_token=mask_token, train=train,
                       capture_layers='encoder_layers' in capture,
                       capture_attention='encoder_attention' in capture)
    pred = nn.Dense(self.out_dim, dtype=self.encoder.dtype, kernel_init=self.head_init,
                    name='head')(enc['patch_tokens'])
    return enc, pred.astype(jnp.float32)
