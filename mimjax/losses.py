"""Loss functions shared by frameworks: pure functions of arrays, computed in float32."""
import jax.numpy as jnp


def patchify(images, patch_size):
  """[B, H, W, C] -> [B, N, p*p*C], row-major patches, pixels in (row, col, channel) order."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, patch_size, channels):
  """Inverse of `patchify` for square images."""
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  p = patch_size
  x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, channels)


def normalize_patches(patches, eps=1e-6):
  """Per-patch standardisation of MAE's norm_pix_loss: (x - mean) / sqrt(var + eps).

  The variance is the unbiased one (torch's `Tensor.var` default), as in the reference MAE.
  """
  patches = patches.astype(jnp.float32)
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def masked_mean(per_token, mask):
  """Mean of per-token values [B, N] over the tokens where `mask` [B, N] is True."""
  mask = mask.astype(jnp.float32)
  return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mae_loss(pred, images, mask, patch_size, norm_pix_loss):
  """MAE reconstruction loss: per-patch MSE averaged over the masked patches only."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return masked_mean(per_patch, mask)


def simmim_loss(pred, images, mask, patch_size):
  """SimMIM reconstruction loss: L1 over the pixels of masked patches.

  Equals SimMIM's sum(|x - x_rec| * pixel_mask) / sum(pixel_mask) / channels, because every patch
  holds the same number of pixels; `pred` is [B, N, p*p*C] in `patchify` order.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  per_patch = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)
  return masked_mean(per_patch, mask)
