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


def patch_stats(patches, eps=1e-6):
  """(mean, sqrt(var + eps)) of each patch [..., 1] in float32: MAE's norm_pix_loss statistics.

  The variance is the unbiased one (torch's `Tensor.var` default), as in the reference MAE.
  """
  patches = patches.astype(jnp.float32)
  mean = patches.mean(axis=-1, keepdims=True)
  return mean, jnp.sqrt(patches.var(axis=-1, keepdims=True, ddof=1) + eps)


def normalize_patches(patches, eps=1e-6):
  """Per-patch standardisation of MAE's norm_pix_loss: (x - mean) / sqrt(var + eps)."""
  mean, std = patch_stats(patches, eps)
  return (patches.astype(jnp.float32) - mean) / std


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


DISTANCES = ('cosine', 'smooth_l1', 'l1', 'l2')


def cosine_similarity(a, b, eps, normalize_first=False):
  """cos(a, b) over the last axis in float32, each norm clamped at `eps` from below.

  Two operation orders, each its reference's to the last bit: the dot product over the norms
  (torch's CosineSimilarity: distillation, DTM) or the dot product of the normalised vectors
  (`normalize_first`, torch's F.normalize: LUT). They differ by float32 rounding only.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  norm = lambda x: jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)  # noqa: E731
  if normalize_first:
    return jnp.sum((a / norm(a)) * (b / norm(b)), -1)
  return jnp.sum(a * b, -1) / (norm(a) * norm(b))[..., 0]


def token_distance(pred, target, distance='cosine'):
  """Per-token distance [B, N] between [B, N, D] features, in float32.

  cosine: 1 - cos(pred, target) (norms clamped at 1e-6, as torch's CosineSimilarity); smooth_l1:
  Huber-style with beta = 2 (torch's SmoothL1Loss(beta=2)), l1: |d|, l2: d^2, each averaged over D.
  """
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  if distance == 'cosine':
    return 1.0 - cosine_similarity(pred, target, eps=1e-6)
  diff = jnp.abs(pred - target)
  if distance == 'smooth_l1':
    beta = 2.0
    return jnp.mean(jnp.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta), -1)
  if distance == 'l1':
    return jnp.mean(diff, -1)
  if distance == 'l2':
    return jnp.mean(diff ** 2, -1)
  raise ValueError(f'Unknown token distance {distance!r}; use one of {DISTANCES}.')


def feature_loss(pred, target, distance='cosine', mask=None, norm_target=False):
  """Token-wise feature-distillation loss: mean per-token distance over all tokens, or over the
  tokens where `mask` [B, N] is True. `norm_target` standardises each target token first."""
  if norm_target:
    target = normalize_patches(target)
  per_token = token_distance(pred, target, distance)
  if mask is None:
    return per_token.mean()
  return masked_mean(per_token, mask)


def simmim_loss(pred, images, mask, patch_size):
  """SimMIM reconstruction loss: L1 over the pixels of masked patches.

  Equals SimMIM's sum(|x - x_rec| * pixel_mask) / sum(pixel_mask) / channels, because every patch
  holds the same number of pixels; `pred` is [B, N, p*p*C] in `patchify` order.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  per_patch = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)
  return masked_mean(per_patch, mask)
