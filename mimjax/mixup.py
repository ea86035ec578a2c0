"""Mixup / CutMix on device, as timm's `Mixup` in its default 'batch' mode (used by DeiT).

One mixing weight per batch; each image is mixed with the image at the mirrored batch position
(timm's `x.flip(0)`). With probability `switch_prob` the batch gets CutMix (a box of area ~ 1 - lam
pasted from the partner, lam then corrected to the box's true clipped area) instead of mixup
(lam * x + (1 - lam) * partner). Targets are mixed with the same lam. Everything is a function of
the step rng with static shapes, so it runs inside the jitted train step.
"""
import jax
import jax.numpy as jnp


def cutmix_box(rng, height, width, lam):
  """timm's `rand_bbox` + `correct_lam`: bool [H, W] box (True = from the partner), corrected lam.

  The box has sides int(H * sqrt(1 - lam)) x int(W * sqrt(1 - lam)) around a uniform random centre,
  clipped to the image; the corrected lam is 1 - box area / image area.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy_rng, cx_rng = jax.random.split(rng)
  cy = jax.random.randint(cy_rng, (), 0, height)
  cx = jax.random.randint(cx_rng, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  corrected = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  return box, corrected


def mix(rng, images, targets, mixup_alpha, cutmix_alpha, switch_prob=0.5, mix_prob=1.0):
  """Mixes `images` [B, H, W, C] and soft `targets` [B, K]; returns (images, targets, lam).

  `mixup_alpha` / `cutmix_alpha` are Python floats (0 turns that kind off; both 0 returns the
  inputs with lam = 1).
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  apply_rng, switch_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(rng, 5)
  _, h, w, _ = images.shape
  partner = images[::-1]
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_rng) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = (jax.random.beta(mixup_rng, mixup_alpha, mixup_alpha) if mixup_alpha > 0
               else jnp.ones((), jnp.float32))
  lam_cutmix = (jax.random.beta(cutmix_rng, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0
                else jnp.ones((), jnp.float32))
  box, lam_box = cutmix_box(box_rng, h, w, lam_cutmix)
  apply = jax.random.uniform(apply_rng) < mix_prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mixup), 1.0).astype(jnp.float32)
  from_partner = (box & use_cutmix & apply)[None, :, :, None]
  blended = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * partner
  mixed_images = jnp.where(from_partner, partner, jnp.where(use_cutmix, images, blended))
  mixed_targets = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed_images, mixed_targets, lam
