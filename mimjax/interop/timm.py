"""The mimjax ViT <-> timm `VisionTransformer` state dict, both ways, in numpy (no torch needed).

mimjax encoders map onto timm's ViT with its default layout: `pos_embed` holds a slot for the cls
token at index 0 (`no_embed_class=False`): mimjax's learned slot, or zeros for the fixed sin-cos
table, which gives the cls token no position (as MAE). An encoder with `config.model.fc_norm`
(MAE's fine-tuning model: no final norm, a LayerNorm after pooling) exports as timm's
`fc_norm=True` (`norm` is then the identity); otherwise `fc_norm=False`, timm's final `norm`.
Conversion is a pure reshuffle of arrays, so timm -> mimjax -> timm is exact.

A timm model with `no_embed_class=True` (no cls slot) imports with a zero slot, the same function.
Into a config with the fixed sin-cos embedding, which has no slot, a cls slot is folded into the
cls token (`mimjax.interop.pretrained`): timm adds `pos_embed[:, 0]` to the cls token before the
first block and nothing else reads it, so `cls + pos_embed[:, :1]` without a slot is the same model.
"""
import dataclasses
import json
import os
import re

import numpy as np

from mimjax import errors
from mimjax.interop import torch_files
from mimjax.models import posemb as posemb_lib
from mimjax.models import vit

# The name only selects timm's VisionTransformer class; every architecture setting comes from the
# keyword arguments written next to it.
TIMM_MODEL = 'vit_base_patch16_224'

_ENCODER_KEYS = {'embedding', 'pos_embedding', 'cls', 'Transformer', 'fc_norm', 'head'}



@dataclasses.dataclass(frozen=True)
class Arch:
  """What a timm ViT state dict says about its architecture (heads are not in the weights)."""
  width: int
  depth: int
  mlp_dim: int
  patch_size: int
  grid_size: int
  in_chans: int
  cls_token: bool
  posemb: str  # 'sincos2d' when pos_embed's patch part is the fixed MAE table, else 'learn'
  layerscale: bool
  num_classes: int
  fc_norm: bool = False  # timm fc_norm=True / Beit avg pooling: a norm on the pooled feature only

  @property
  def image_size(self):
    return self.grid_size * self.patch_size

  def size_name(self):
    """The mimjax variant size with these dimensions, or None."""
    for name, (width, depth, mlp_dim, _) in vit.VARIANTS.items():
      if (width, depth, mlp_dim) == (self.width, self.depth, self.mlp_dim):
        return name
    return None

  def num_heads(self):
    name = self.size_name()
    return vit.VARIANTS[name][3] if name else None


def check_representable(encoder_params):
  """Raises InteropError for encoders timm's ViT cannot represent (e.g. a MoTo tokenizer)."""
  extra = sorted(set(encoder_params) - _ENCODER_KEYS)
  if extra or 'embedding' not in encoder_params:
    raise errors.InteropError(
        f'This encoder has parameters timm\'s VisionTransformer cannot represent ({extra or "no "}'
        f'{"" if extra else "plain patch embedding"}); a non-linear tokenizer such as MoTo '
        '(config.model.tokenizer_norm) has no timm equivalent. Export only plain-ViT encoders.')


def _t(kernel):
  """[in, out] dense kernel -> torch [out, in] weight."""
  return np.ascontiguousarray(np.asarray(kernel).T)


def to_timm(encoder_params, posemb_table):
  """mimjax encoder params -> timm state dict {name: float32 array}.

  Args:
    encoder_params: `params['encoder']` of a mimjax ViT.
    posemb_table: [1, cls + N, width] position embedding (the learned one, or the fixed sin-cos
      table materialised); see `position_embedding`.
  """
  check_representable(encoder_params)
  p = jax_free(encoder_params)
  sd = {}
  sd['patch_embed.proj.weight'] = p['embedding']['kernel'].transpose(3, 2, 0, 1)
  sd['patch_embed.proj.bias'] = p['embedding']['bias']
  if 'cls' in p:
    sd['cls_token'] = p['cls']
  sd['pos_embed'] = np.asarray(posemb_table, np.float32)
  tr = p['Transformer']
  depth = len([k for k in tr if k.startswith('encoderblock_')])
  for i in range(depth):
    blk, pre = tr[f'encoderblock_{i}'], f'blocks.{i}.'
    attn = blk['MultiHeadDotProductAttention_0']
    width = attn['query']['kernel'].shape[0]
    sd[pre + 'norm1.weight'] = blk['LayerNorm_0']['scale']
    sd[pre + 'norm1.bias'] = blk['LayerNorm_0']['bias']
    sd[pre + 'attn.qkv.weight'] = np.concatenate(
        [_t(attn[n]['kernel'].reshape(width, -1)) for n in ('query', 'key', 'value')])
    # A model without k bias (model.weight_init='beit') has the zero one timm's layout needs.
    sd[pre + 'attn.qkv.bias'] = np.concatenate(
        [attn[n].get('bias', np.zeros(width, np.float32)).reshape(-1)
         for n in ('query', 'key', 'value')])
    sd[pre + 'attn.proj.weight'] = _t(attn['out']['kernel'].reshape(-1, width))
    sd[pre + 'attn.proj.bias'] = attn['out']['bias']
    for j in (0, 1):
      if f'LayerScale_{j}' in blk:
        sd[pre + f'ls{j + 1}.gamma'] = blk[f'LayerScale_{j}']['scale']
    sd[pre + 'norm2.weight'] = blk['LayerNorm_1']['scale']
    sd[pre + 'norm2.bias'] = blk['LayerNorm_1']['bias']
    for j in (0, 1):
      sd[pre + f'mlp.fc{j + 1}.weight'] = _t(blk['MlpBlock_0'][f'Dense_{j}']['kernel'])
      sd[pre + f'mlp.fc{j + 1}.bias'] = blk['MlpBlock_0'][f'Dense_{j}']['bias']
  norm = 'fc_norm' if 'fc_norm' in p else 'norm'
  final = p['fc_norm'] if 'fc_norm' in p else tr['encoder_norm']
  sd[f'{norm}.weight'], sd[f'{norm}.bias'] = final['scale'], final['bias']
  if 'head' in p:
    sd['head.weight'] = _t(p['head']['kernel'])
    sd['head.bias'] = p['head']['bias']
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def jax_free(tree):
  """A nested dict of numpy arrays (device arrays fetched, FrozenDicts unfrozen)."""
  if hasattr(tree, 'items'):
    return {k: jax_free(v) for k, v in tree.items()}
  return np.asarray(tree)


def position_embedding(encoder_params, grid_size):
  """[1, cls + N, width] timm `pos_embed`: the learned table (with its cls slot), or the fixed
  sin-cos one with a zero cls slot."""
  if 'pos_embedding' in encoder_params:
    return np.asarray(encoder_params['pos_embedding'])
  width = encoder_params['embedding']['kernel'].shape[-1]
  table = posemb_lib.sincos_2d(grid_size, width)
  if 'cls' in encoder_params:
    table = np.concatenate([np.zeros((1, width), np.float32), table])
  return table[None]


def timm_kwargs(model_config, image_size, in_chans):
  """Keyword arguments of `timm.create_model(TIMM_MODEL, ...)` for a mimjax `config.model`."""
  kw = vit.parse_variant(model_config.variant)
  return dict(
      img_size=image_size, patch_size=kw['patch_size'], in_chans=in_chans,
      embed_dim=kw['width'], depth=kw['depth'], num_heads=kw['num_heads'],
      mlp_ratio=kw['mlp_dim'] / kw['width'], qkv_bias=True, class_token=model_config.cls_token,
      global_pool='token' if model_config.pool == 'tok' else 'avg', no_embed_class=False,
      pos_embed='learn', fc_norm=bool(model_config.fc_norm),
      init_values=model_config.layerscale or None, num_classes=model_config.num_classes)


# ---------------------------------------------------------------------------------------------
# Import.

_BLOCK_KEYS = {'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
               'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
               'mlp.fc2.weight', 'mlp.fc2.bias', 'ls1.gamma', 'ls2.gamma'}
_TOP_KEYS = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'cls_token', 'pos_embed',
             'norm.weight', 'norm.bias', 'fc_norm.weight', 'fc_norm.bias', 'head.weight',
             'head.bias'}


def final_norm(sd, p, transformer):
  """Puts a timm state dict's final norm into mimjax params: `norm` (on every token) into the
  Transformer's `encoder_norm`, `fc_norm` (on the pooled feature, timm's `fc_norm=True` and Beit's
  avg pooling, where `norm` is the identity) into `fc_norm`. Returns whether it was fc_norm."""
  has_norm, has_fc_norm = 'norm.weight' in sd, 'fc_norm.weight' in sd
  if has_norm == has_fc_norm:
    raise errors.InteropError(
        'The state dict has '
        + ('both norm and fc_norm' if has_norm else 'neither norm nor fc_norm')
        + ' weights; a timm ViT or Beit has exactly one of them (fc_norm with global_pool avg).')
  name = 'fc_norm' if has_fc_norm else 'norm'
  norm = {'scale': sd[f'{name}.weight'], 'bias': sd[f'{name}.bias']}
  if has_fc_norm:
    p['fc_norm'] = norm
  else:
    transformer['encoder_norm'] = norm
  return has_fc_norm


def infer_arch(sd):
  """The architecture of a timm ViT state dict; InteropError for layouts mimjax cannot hold."""
  unknown = sorted(k for k in sd if k not in _TOP_KEYS and not (
      re.fullmatch(r'blocks\.\d+\.(.+)', k) and
      re.fullmatch(r'blocks\.\d+\.(.+)', k).group(1) in _BLOCK_KEYS))
  if unknown:
    raise errors.InteropError(
        f'The state dict has weights the mimjax ViT has no place for: {unknown[:5]}. Only plain '
        'timm VisionTransformers import (no norm_pre, register tokens, qk-norm or attention '
        'pooling); for official MAE or CLIP checkpoints use mimjax.interop.mae / clip.')
  for key in ('patch_embed.proj.weight', 'pos_embed'):
    if key not in sd:
      raise errors.InteropError(f'The state dict has no {key!r}; it is not a timm ViT encoder.')
  width, in_chans, patch, _ = sd['patch_embed.proj.weight'].shape
  depth = torch_files.num_blocks(sd)
  cls_token = 'cls_token' in sd
  num_pos = sd['pos_embed'].shape[1]
  grid = int(round(np.sqrt(num_pos - cls_token)))
  if grid * grid not in (num_pos, num_pos - 1) or (grid * grid != num_pos and not cls_token):
    raise errors.InteropError(
        f'pos_embed has {num_pos} positions: not a square grid (plus a cls slot).')
  patch_table = sd['pos_embed'][:, num_pos - grid * grid:]
  fixed = posemb_lib.sincos_2d(grid, width)[None]
  is_sincos = np.allclose(patch_table, fixed, atol=1e-5)  # a cls slot is folded on import
  return Arch(width=width, depth=depth, mlp_dim=sd['blocks.0.mlp.fc1.weight'].shape[0],
              patch_size=patch, grid_size=grid, in_chans=in_chans, cls_token=cls_token,
              posemb='sincos2d' if is_sincos else 'learn', layerscale='blocks.0.ls1.gamma' in sd,
              num_classes=sd['head.weight'].shape[0] if 'head.weight' in sd else 0,
              fc_norm='fc_norm.weight' in sd)


def from_timm(sd, num_heads):
  """timm ViT state dict -> (mimjax encoder params as numpy, Arch).

  The params always hold `pos_embedding` [1, cls + N, width] (a zero cls slot is added when timm
  has none, `no_embed_class=True`); a config with the fixed sin-cos embedding drops it (see
  `mimjax.interop.pretrained`). A timm `fc_norm` goes to `fc_norm` (`config.model.fc_norm`, MAE's
  fine-tuning model), timm's `norm` to the final norm (`final_norm`).
  """
  try:
    return _from_timm(sd, num_heads)
  except KeyError as e:
    raise errors.InteropError(f'The state dict has no {e.args[0]!r}; it is not a complete timm '
                              'ViT encoder.') from e


def _from_timm(sd, num_heads):
  """`from_timm` without the translation of a missing key into an InteropError."""
  arch = infer_arch(sd)
  if arch.width % num_heads:
    raise errors.InteropError(f'width {arch.width} is not divisible by num_heads={num_heads}.')
  pos = sd['pos_embed']
  p = {'embedding': {'kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
                     'bias': sd['patch_embed.proj.bias']},
       'pos_embedding': pos}
  if arch.cls_token:
    p['cls'] = sd['cls_token']
    if pos.shape[1] == arch.grid_size ** 2:
      p['pos_embedding'] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  tr = {f'encoderblock_{i}': block_from_timm(sd, f'blocks.{i}.', num_heads)
        for i in range(arch.depth)}
  final_norm(sd, p, tr)
  p['Transformer'] = tr
  if 'head.weight' in sd:
    p['head'] = {'kernel': sd['head.weight'].T, 'bias': sd['head.bias']}
  return as_float32(p), arch


def block_from_timm(sd, prefix, num_heads):
  """One timm `Block` (keys `prefix` + norm1, attn.qkv, ...) -> mimjax `Encoder1DBlock` params."""
  g = lambda name: sd[prefix + name]  # noqa: E731
  width = g('norm1.weight').shape[0]
  head_dim = width // num_heads
  for name, shape in (('attn.qkv.weight', (3 * width, width)), ('attn.qkv.bias', (3 * width,))):
    if g(name).shape != shape:
      raise errors.InteropError(f'{prefix}{name} has shape {tuple(g(name).shape)}; a width-{width} '
                                f'ViT block needs {shape}.')
  q, k, v = np.split(g('attn.qkv.weight'), 3)
  qb, kb, vb = np.split(g('attn.qkv.bias'), 3)
  attn = {n: {'kernel': w.T.reshape(width, num_heads, head_dim),
              'bias': b.reshape(num_heads, head_dim)}
          for n, w, b in (('query', q, qb), ('key', k, kb), ('value', v, vb))}
  attn['out'] = {'kernel': g('attn.proj.weight').T.reshape(num_heads, head_dim, width),
                 'bias': g('attn.proj.bias')}
  blk = {'LayerNorm_0': {'scale': g('norm1.weight'), 'bias': g('norm1.bias')},
         'MultiHeadDotProductAttention_0': attn,
         'LayerNorm_1': {'scale': g('norm2.weight'), 'bias': g('norm2.bias')},
         'MlpBlock_0': {f'Dense_{j}': {'kernel': g(f'mlp.fc{j + 1}.weight').T,
                                       'bias': g(f'mlp.fc{j + 1}.bias')} for j in (0, 1)}}
  for j in (0, 1):
    if f'{prefix}ls{j + 1}.gamma' in sd:
      blk[f'LayerScale_{j}'] = {'scale': g(f'ls{j + 1}.gamma')}
  return blk


def as_float32(tree):
  """A copy of a nested dict with every leaf a contiguous float32 numpy array."""
  if isinstance(tree, dict):
    return {k: as_float32(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, np.float32)


def read_sidecar(path):
  """The `PATH.json` an export wrote next to `path`, or None."""
  sidecar = path + '.json'
  if not os.path.exists(sidecar):
    return None
  with open(sidecar) as f:
    return json.load(f)


def import_timm(path, num_heads=None):
  """A timm ViT checkpoint file -> (mimjax encoder params, Arch, mimjax `config.model` values).

  `num_heads` is not stored in the weights: it comes from the argument, else from a mimjax export
  sidecar next to the file, else from the mimjax variant of the same dimensions. The returned
  config values are what a mimjax config needs to hold these weights (pool only when a sidecar
  says it; otherwise the weights do not determine it).
  """
  sd = torch_files.read_state_dict(path)
  arch = infer_arch(sd)
  sidecar = read_sidecar(path)
  model = {}
  if sidecar:
    kw = sidecar['timm_kwargs']
    num_heads = num_heads or kw['num_heads']
    model['pool'] = 'tok' if kw['global_pool'] == 'token' else 'gap'
    if kw.get('init_values'):
      model['layerscale'] = kw['init_values']
  num_heads = num_heads or arch.num_heads()
  if num_heads is None:
    raise errors.InteropError(f'Cannot tell the number of attention heads of a width-{arch.width} '
                              'ViT from its weights; pass num_heads.')
  params, arch = from_timm(sd, num_heads)
  if arch.size_name():
    model['variant'] = f'{arch.size_name()}/{arch.patch_size}'
  model.update(posemb=arch.posemb, cls_token=arch.cls_token, num_classes=arch.num_classes,
               fc_norm=arch.fc_norm)
  return params, arch, model
