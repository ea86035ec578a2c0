"""Mask samplers. Masks are drawn outside the model, with static shapes, from a step-folded key.

Conventions: `keep_idx` int32 [B, n_keep] lists the visible patches of each sample; `mask` bool
[B, N] is True where a patch is masked (hidden from the encoder or replaced by the mask token).
"""
import math

import jax
import jax.numpy as jnp


def num_kept(num_patches, mask_ratio):
  """Static number of visible patches, as MAE computes it: int(N * (1 - ratio))."""
  n_keep = int(num_patches * (1 - mask_ratio))
  if not 0 < n_keep <= num_patches:
    raise ValueError(f'mask ratio {mask_ratio} leaves {n_keep} of {num_patches} patches visible; '
                     'choose a ratio in [0, 1) that keeps at least one patch.')
  return n_keep


def random_permutation(rng, batch_size, num_patches):
  """An independent uniformly random permutation of the patch indices per sample, [B, N]."""
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  return jnp.argsort(noise, axis=1).astype(jnp.int32)


def mask_from_keep(keep_idx, num_patches):
  """bool [B, N], True for the patches not listed in `keep_idx`."""
  batch = jnp.arange(keep_idx.shape[0])[:, None]
  return jnp.ones((keep_idx.shape[0], num_patches), bool).at[batch, keep_idx].set(False)


def keep_from_order(order, n_keep, view=0):
  """View `view` of a random patch order [B, N]: positions [view * n_keep, (view + 1) * n_keep).

  View 0 is MAE's mask; the views of one order are disjoint (LUT's second masked view is view 1).
  Returns (keep_idx [B, n_keep], mask [B, N]).
  """
  num_patches = order.shape[1]
  if (view + 1) * n_keep > num_patches:
    raise ValueError(f'{view + 1} disjoint views of {n_keep} visible patches do not fit in '
                     f'{num_patches} patches; raise the mask ratio.')
  keep_idx = order[:, view * n_keep:(view + 1) * n_keep]
  return keep_idx, mask_from_keep(keep_idx, num_patches)


def random_keep(rng, batch_size, num_patches, mask_ratio):
  """MAE masking: per sample, a uniformly random subset of `num_kept` patches stays visible.

  Returns (keep_idx [B, n_keep], mask [B, N]).
  """
  order = random_permutation(rng, batch_size, num_patches)
  return keep_from_order(order, num_kept(num_patches, mask_ratio))


def block_mask(rng, batch_size, grid_size, mask_ratio=0.4, min_block=16,
               aspect=(0.3, 1 / 0.3), attempts=10, num_masked=0):
  """BEiT block-wise masking with exactly round(ratio * N) masked patches per sample, bool [B, N]
  (exactly `num_masked` when > 0, as BEiT's `--num_mask_patches`).

  Blocks are placed as in BEiT's MaskingGenerator: a block of area ~ U(min_block, remaining) and
  log-uniform aspect ratio is accepted when it masks between 1 and `remaining` new patches; up to
  `attempts` tries per block (drawn at once, the first acceptable one wins). When no try succeeds
  (BEiT stops there, short of the target), the remaining patches are drawn uniformly among the
  unmasked ones, so every sample has the same number of masked patches (static shapes downstream).
  """
  n_mask = num_masked or int(round(mask_ratio * grid_size ** 2))
  rows = jnp.arange(grid_size)[:, None]
  cols = jnp.arange(grid_size)[None, :]
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

  def one(key):
    def place_block(state):
      mask, remaining, key, _ = state
      key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
      area = min_block + (remaining - min_block) * jax.random.uniform(k_area, (attempts,))
      ratio = jnp.exp(jax.random.uniform(k_aspect, (attempts,), minval=log_aspect[0],
                                         maxval=log_aspect[1]))
      h = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
      w = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
      fits = (h < grid_size) & (w < grid_size)
      top = jax.random.randint(k_top, (attempts,), 0, grid_size - h + 1)
      left = jax.random.randint(k_left, (attempts,), 0, grid_size - w + 1)
      block = ((rows[None] >= top[:, None, None]) & (rows[None] < (top + h)[:, None, None]) &
               (cols[None] >= left[:, None, None]) & (cols[None] < (left + w)[:, None, None]))
      new = (block & ~mask[None]).sum((1, 2))
      ok = fits & (new > 0) & (new <= remaining)
      first = jnp.argmax(ok)
      found = ok[first]
      mask = jnp.where(found, mask | block[first], mask)
      return mask, remaining - jnp.where(found, new[first], 0), key, ~found

    def more(state):
      _, remaining, _, stuck = state
      return (remaining > 0) & ~stuck

    key, fill_key = jax.random.split(key)
    init = (jnp.zeros((grid_size, grid_size), bool), jnp.int32(n_mask), key, jnp.bool_(False))
    mask, remaining, _, _ = jax.lax.while_loop(more, place_block, init)
    mask = mask.reshape(-1)
    # Top up with uniformly random unmasked patches when block placement got stuck.
    noise = jnp.where(mask, jnp.inf, jax.random.uniform(fill_key, mask.shape))
    rank = jnp.argsort(jnp.argsort(noise))
    return mask | (rank < remaining)

  return jax.vmap(one)(jax.random.split(rng, batch_size))


def num_masked_cells(num_cells, mask_ratio):
  """Static number of masked cells, as SimMIM counts them: ceil(cells * ratio)."""
  n_mask = math.ceil(num_cells * mask_ratio)
  if not 0 < n_mask < num_cells:
    raise ValueError(f'mask ratio {mask_ratio} masks {n_mask} of {num_cells} mask cells; choose '
                     'a ratio that masks at least one cell and leaves at least one visible.')
  return n_mask


def random_cells(rng, batch_size, grid_size, cell_size, mask_ratio):
  """SimMIM masking: square cells of `cell_size` x `cell_size` patches, aligned to the patch grid.

  The grid of `grid_size` x `grid_size` patches is covered by ceil(grid / cell)^2 cells starting at
  the top-left corner; exactly `num_masked_cells` of them are masked per sample. When `cell_size`
  does not divide `grid_size`, the last row and column of cells are cut at the border, so the
  number of masked *patches* then varies between samples (the number of masked cells does not).

  Returns mask bool [B, grid_size**2], True for masked patches (row-major, as the ViT's tokens).
  """
  cells = -(-grid_size // cell_size)
  n_mask = num_masked_cells(cells ** 2, mask_ratio)
  ranks = jnp.argsort(random_permutation(rng, batch_size, cells ** 2), axis=1)
  cell_mask = (ranks < n_mask).reshape(batch_size, cells, cells)
  mask = jnp.repeat(jnp.repeat(cell_mask, cell_size, axis=1), cell_size, axis=2)
  return mask[:, :grid_size, :grid_size].reshape(batch_size, grid_size ** 2)
