"""Reading PyTorch weight files (safetensors, state dicts, timm training checkpoints, TorchScript
archives) into float32 numpy arrays without running pickled code, writing .safetensors, and
importing timm safely next to TensorFlow; torch is imported only here and only when needed."""
import argparse
import importlib.util
import os
import pickle
import re
import sys
import zipfile

import numpy as np

from mimjax import errors


def _is_torchscript(path):
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(n.endswith('constants.pkl') for n in archive.namelist())


def read_state_dict(path):
  """{name: float32 numpy array} from a .safetensors file or a .pth/.pt/.bin torch checkpoint.

  Torch files are read with `torch.load(weights_only=True)`, which never runs pickled code; the
  one other type timm train.py checkpoints (`.pth.tar`) hold, its `args` (an argparse.Namespace of
  plain values), is allowed explicitly. A TorchScript archive (OpenAI's CLIP release) goes through
  `torch.jit.load`, which runs no Python either. A checkpoint that wraps the weights under 'model'
  or 'state_dict' is unwrapped. A timm model folder (`local-dir:` / Hugging Face hub layout, e.g. a
  `mimjax.export --format hub` export, or timm's `save_for_hf`) is read from its model.safetensors,
  else its pytorch_model.bin.
  """
  for name in ('model.safetensors', 'pytorch_model.bin'):
    if os.path.isfile(os.path.join(path, 'config.json')) and os.path.isfile(
        os.path.join(path, name)):
      path = os.path.join(path, name)
      break
  if not os.path.isfile(path):
    raise errors.InteropError(f'{path} is not a file.')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return {k: v.astype(np.float32) for k, v in load_file(path).items()}
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own types
      raise errors.InteropError(f'{path} is not a readable .safetensors file ({e}).') from e
  with open(path, 'rb') as f:
    head = f.read(2)
  if not (head.startswith(b'PK') or head[:1] == b'\x80'):  # torch's zip format or a raw pickle
    raise errors.InteropError(f'{path} is not a PyTorch checkpoint (neither a zip archive nor a '
                              'pickle); give a .pth/.pt/.bin state dict or a .safetensors file.')
  import torch  # pylint: disable=g-import-not-at-top
  if _is_torchscript(path):
    state = torch.jit.load(path, map_location='cpu').state_dict()
    return {k: v.detach().float().numpy() for k, v in state.items()}
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm train.py's `args`
      sd = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if 'weights_only' in str(e) or 'Weights only load failed' in str(e):
      found = re.search(r'GLOBAL (\S+)', str(e))
      raise errors.InteropError(
          f'{path} was refused as unsafe: it holds a Python object that is not a tensor or plain '
          f'value ({found.group(1) if found else "see torch.load"}), which could run code when '
          'loaded, so it was not loaded. Re-save its state_dict alone (or .safetensors) from a '
          'trusted environment.') from e
    raise errors.InteropError(f'{path} is not a PyTorch checkpoint ({e}).') from e
  except Exception as e:  # pylint: disable=broad-except  # zip / EOF / runtime errors of torch
    raise errors.InteropError(f'{path} is not a PyTorch checkpoint ({type(e).__name__}: '
                              f'{str(e).splitlines()[0] if str(e) else ""}).') from e
  for key in ('model', 'state_dict'):
    if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
      sd = sd[key]
  if not isinstance(sd, dict):
    raise errors.InteropError(f'{path} holds a {type(sd).__name__}, not a state dict '
                              '({name: tensor}).')
  return {k: v.float().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def num_blocks(state_dict, prefix='blocks'):
  """How many transformer blocks a PyTorch state dict holds: the distinct i of `prefix.i.*`."""
  return len({k.split('.')[1] for k in state_dict if k.startswith(prefix + '.')})


def save_safetensors(tensors, path):
  """Writes {name: array} to `path` as .safetensors with the permissions of any new file (0666 less
  the umask, 0644 usually): safetensors itself creates files 0600, which teammates on a shared
  filesystem cannot read."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(tensors, path)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def load_timm():
  """The timm module, or None where torch or timm is not installed (mimjax's `torch` extra).

  In the pinned environment a process that loads TensorFlow before `torch._dynamo` (which timm
  and every torch optimizer load) dies with a segmentation fault; loaded first, torch._dynamo is
  safe next to TensorFlow. So this loads it before timm, and refuses with an InteropError instead
  of crashing where TensorFlow is already loaded without it.
  """
  if importlib.util.find_spec('torch') is None or importlib.util.find_spec('timm') is None:
    return None
  if 'tensorflow' in sys.modules and 'torch._dynamo' not in sys.modules:
    raise errors.InteropError(
        'TensorFlow was loaded in this process before torch, and loading timm (torch._dynamo) now '
        'would crash it (a segmentation fault in the pinned TensorFlow + torch); import torch and '
        'timm before TensorFlow or mimjax.data, or run `python -m mimjax.export`.')
  import torch._dynamo  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import timm  # pylint: disable=g-import-not-at-top
  return timm
