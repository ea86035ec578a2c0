"""Official MAE PyTorch checkpoints (He et al., 2022; facebookresearch/mae) -> mimjax MAE params.

The checkpoint's `model` holds the encoder under timm ViT names (`patch_embed`, `cls_token`,
`pos_embed` with a cls slot, `blocks`, `norm`) and, in the checkpoints that have it (e.g. the
`mae_visualize_*` releases), the decoder: `decoder_embed`, `mask_token`, `decoder_pos_embed`,
`decoder_blocks`, `decoder_norm`, `decoder_pred`. Both position embeddings are MAE's fixed 2-D
sin-cos tables with a zero cls slot, which is what mimjax computes, so they are checked and
dropped; a checkpoint whose decoder position embedding is anything else is refused.
"""
import numpy as np

from mimjax import errors
from mimjax.interop import timm as timm_lib
from mimjax.interop import torch_files
from mimjax.models import posemb as posemb_lib


def _decoder_from_mae(sd, num_heads, grid_size):
  """The `decoder_*` / `mask_token` weights -> (MAEDecoder params, decoder settings)."""
  width = sd['decoder_embed.weight'].shape[0]
  depth = torch_files.num_blocks(sd, 'decoder_blocks')
  pos = sd['decoder_pos_embed']
  fixed = posemb_lib.sincos_2d(grid_size, width)[None]
  if pos.shape[1] != grid_size ** 2 + 1 or pos[:, 0].any() or not np.allclose(
      pos[:, 1:], fixed, atol=1e-5):
    raise errors.InteropError(
        'decoder_pos_embed is not MAE\'s fixed 2-D sin-cos table with a zero cls slot; the mimjax '
        'MAE decoder has only that position embedding, so these weights cannot be imported.')
  tr = {f'encoderblock_{i}': timm_lib.block_from_timm(sd, f'decoder_blocks.{i}.', num_heads)
        for i in range(depth)}
  tr['decoder_norm'] = {'scale': sd['decoder_norm.weight'], 'bias': sd['decoder_norm.bias']}
  params = {'decoder_embed': {'kernel': sd['decoder_embed.weight'].T,
                              'bias': sd['decoder_embed.bias']},
            'mask_token': sd['mask_token'],
            'Transformer': tr,
            'decoder_pred': {'kernel': sd['decoder_pred.weight'].T,
                             'bias': sd['decoder_pred.bias']}}
  settings = dict(decoder_width=width, decoder_depth=depth, decoder_heads=num_heads,
                  decoder_mlp_ratio=sd['decoder_blocks.0.mlp.fc1.weight'].shape[0] // width)
  return timm_lib.as_float32(params), settings


def from_mae(sd, num_heads, decoder_heads):
  """MAE state dict -> (params {'encoder', and 'decoder' when present}, config.model values,
  config.mae values). Head counts are not in the weights; they come from the arguments."""
  is_decoder = lambda k: k.startswith('decoder_') or k == 'mask_token'  # noqa: E731
  encoder_sd = {k: v for k, v in sd.items() if not is_decoder(k)}
  encoder, arch = timm_lib.from_timm(encoder_sd, num_heads)
  model = dict(posemb=arch.posemb, cls_token=arch.cls_token, layerscale=arch.layerscale)
  if arch.size_name():
    model['variant'] = f'{arch.size_name()}/{arch.patch_size}'
  params, mae = {'encoder': encoder}, {}
  if 'decoder_embed.weight' in sd:
    params['decoder'], mae = _decoder_from_mae(sd, decoder_heads, arch.grid_size)
  return params, arch, model, mae


def import_mae(path, num_heads, decoder_heads=16):
  """An official MAE checkpoint file (.pth, read without running pickled code) -> `from_mae`."""
  return from_mae(torch_files.read_state_dict(path), num_heads, decoder_heads)
