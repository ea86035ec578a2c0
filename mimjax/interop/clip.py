"""CLIP image-tower weights from a local PyTorch checkpoint -> `clip_vit.CLIPVisionTransformer`.

Reads OpenAI `clip` checkpoints (TorchScript archives or plain state dicts) and open_clip state
dicts (`.pt`/`.bin` or `.safetensors`), with or without the `visual.` prefix. Plain state dicts
load with `torch.load(weights_only=True)`, which executes no pickled code; TorchScript archives
(the OpenAI release format) go through `torch.jit.load`, which runs no Python either.
"""
import re

import numpy as np

from mimjax.interop import torch_files
from mimjax.models import clip_vit


def visual_weights(state):
  """The image tower's entries of a full CLIP state dict, without the `visual.` prefix."""
  state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
  if any(k.startswith('visual.') for k in state):
    state = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')}
  if 'conv1.weight' not in state or 'proj' not in state:
    raise ValueError('not a CLIP ViT image tower: expected conv1.weight and proj (OpenAI clip / '
                     'open_clip VisionTransformer names); ResNet towers are not supported.')
  return state


def module_kwargs(state, quick_gelu=True, num_heads=None):
  """CLIPVisionTransformer arguments inferred from the weights' shapes (heads = width / 64)."""
  width, _, patch, _ = state['conv1.weight'].shape
  depth = len({int(m.group(1)) for k in state
               if (m := re.match(r'transformer\.resblocks\.(\d+)\.', k))})
  grid = int(round((state['positional_embedding'].shape[0] - 1) ** 0.5))
  return dict(width=int(width), depth=depth, num_heads=num_heads or int(width) // 64,
              mlp_dim=int(state['transformer.resblocks.0.mlp.c_fc.weight'].shape[0]),
              patch_size=int(patch), image_size=grid * int(patch),
              out_dim=int(state['proj'].shape[1]), quick_gelu=quick_gelu)


def convert(state):
  """Flax params of `CLIPVisionTransformer` from the tower's torch state dict (numpy)."""
  ln = lambda p: {'scale': state[f'{p}.weight'], 'bias': state[f'{p}.bias']}  # noqa: E731
  dense = lambda p: {'kernel': state[f'{p}.weight'].T, 'bias': state[f'{p}.bias']}  # noqa: E731
  params = {
      'conv1': {'kernel': state['conv1.weight'].transpose(2, 3, 1, 0)},
      'class_embedding': state['class_embedding'],
      'positional_embedding': state['positional_embedding'],
      'ln_pre': ln('ln_pre'), 'ln_post': ln('ln_post'), 'proj': state['proj'],
  }
  depth = module_kwargs(state)['depth']
  for i in range(depth):
    p = f'transformer.resblocks.{i}'
    params[f'resblocks_{i}'] = {
        'ln_1': ln(f'{p}.ln_1'), 'ln_2': ln(f'{p}.ln_2'),
        'in_proj': {'kernel': state[f'{p}.attn.in_proj_weight'].T,
                    'bias': state[f'{p}.attn.in_proj_bias']},
        'out_proj': dense(f'{p}.attn.out_proj'),
        'c_fc': dense(f'{p}.mlp.c_fc'), 'c_proj': dense(f'{p}.mlp.c_proj'),
    }
  return params


def load(path, quick_gelu=True, num_heads=None, dtype=np.float32):
  """(CLIPVisionTransformer, params) of the CLIP checkpoint at `path`.

  `quick_gelu`: True for OpenAI weights and open_clip's `-quickgelu` models, False for other
  open_clip models. `num_heads` defaults to width / 64, as in every released CLIP ViT.
  """
  state = visual_weights(torch_files.read_state_dict(path))
  model = clip_vit.CLIPVisionTransformer(**module_kwargs(state, quick_gelu, num_heads),
                                         dtype=dtype)
  return model, convert(state)
