"""Loss functions shared by frameworks: pure functions of arrays, computed in float32."""
import jax
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


def smooth_labels(labels, num_classes, smoothing):
  """One-hot targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere (float32)."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits, targets):
  """Mean over the batch of -sum_k targets_k log softmax(logits)_k, in float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
