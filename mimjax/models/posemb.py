"""Fixed 2-D sine-cosine position embeddings (the MAE formulation)."""
import numpy as np


def sincos_1d(width, positions):
  """[len(positions), width]: sin of position * omega in the first half, cos in the second."""
  if width % 2:
    raise ValueError(f'sin-cos embedding width must be even, got {width}')
  omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
  angles = np.outer(positions.reshape(-1), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(grid_size, width):
  """[grid_size**2, width] embedding, row-major over the grid, as MAE's get_2d_sincos_pos_embed.

  The first half of the channels encodes the column (x) coordinate and the second half the row (y)
  coordinate, which is the order MAE's reference implementation produces.
  """
  if width % 4:
    raise ValueError(f'2-D sin-cos embedding width must be a multiple of 4, got {width}')
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                           np.arange(grid_size, dtype=np.float64), indexing='ij')
  emb = np.concatenate([sincos_1d(width // 2, cols), sincos_1d(width // 2, rows)], axis=1)
  return emb.astype(np.float32)
