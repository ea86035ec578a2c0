"""The mimjax ViT with relative position bias <-> timm `Beit` state dict, both ways, in numpy.

timm's `Beit` is the BEiT / BEiT v2 / DTM backbone: q and v biases without a k bias, a relative
position bias table per block (and optionally one shared by all blocks), an optional absolute
position embedding, layer scale `gamma_1` / `gamma_2`. A shared table alone (SimMIM's backbone) is
exported as timm's shared `rel_pos_bias` (`use_shared_rel_pos_bias=True`); with per-block tables
too ('both'), it is added into every block's table (the bias is a lookup of the table, so
`T_block[idx] + T_shared[idx] = (T_block + T_shared)[idx]`), so any timm reads it as plain BEiT.
A mimjax k bias is dropped: it adds `q . b_k` to every logit of a query row, which softmax ignores.
"""
import re

import numpy as np

from mimjax import errors
from mimjax.interop import timm as timm_lib
from mimjax.interop import torch_files
from mimjax.models import vit

# Selects timm's Beit class; the architecture comes from the keyword arguments written next to it.
TIMM_MODEL = 'beit_base_patch16_224'
_TABLE = 'relative_position_bias_table'


def is_beit(model_config):
  """Whether an encoder of `config.model` needs timm's Beit (relative position bias, or none)."""
  return model_config.rel_pos != 'none' or model_config.posemb == 'none'


def timm_kwargs(model_config, image_size, in_chans):
  """Keyword arguments of `timm.create_model(TIMM_MODEL, ...)` for a mimjax `config.model`."""
  if not model_config.cls_token:
    raise errors.InteropError('timm\'s Beit always has a cls token; export needs '
                              'config.model.cls_token=True.')
  kw = vit.parse_variant(model_config.variant)
  return dict(
      img_size=image_size, patch_size=kw['patch_size'], in_chans=in_chans,
      embed_dim=kw['width'], depth=kw['depth'], num_heads=kw['num_heads'],
      mlp_ratio=kw['mlp_dim'] / kw['width'], qkv_bias=True,
      use_abs_pos_emb=model_config.posemb != 'none',
      use_rel_pos_bias=model_config.rel_pos != 'shared',
      use_shared_rel_pos_bias=model_config.rel_pos == 'shared',
      init_values=float(model_config.layerscale),  # 0: none
      global_pool='token' if model_config.pool == 'tok' else 'avg',
      use_fc_norm=bool(model_config.fc_norm),
      num_classes=model_config.num_classes)


def to_beit(encoder_params, posemb_table):
  """mimjax encoder params -> timm Beit state dict {name: float32 array}.

  Args:
    encoder_params: `params['encoder']` of a mimjax ViT with a cls token.
    posemb_table: [1, cls + N, width] absolute position embedding, or None (posemb 'none').
  """
  p = timm_lib.jax_free(encoder_params)
  tr = p['Transformer']
  shared = tr.get('rel_pos_bias', {}).get(_TABLE)
  vit_sd = timm_lib.to_timm(encoder_params, np.zeros((1, 1, 1), np.float32))
  sd = {}
  for key, value in vit_sd.items():
    m = re.fullmatch(r'blocks\.(\d+)\.(.+)', key)
    if key == 'pos_embed':
      if posemb_table is not None:
        sd[key] = np.asarray(posemb_table, np.float32)
    elif m is None:
      sd[key] = value
    elif m.group(2) == 'attn.qkv.bias':
      q, _, v = np.split(value, 3)
      sd[f'blocks.{m.group(1)}.attn.q_bias'], sd[f'blocks.{m.group(1)}.attn.v_bias'] = q, v
    elif m.group(2) in ('ls1.gamma', 'ls2.gamma'):
      sd[f'blocks.{m.group(1)}.gamma_{m.group(2)[2]}'] = value
    else:
      sd[key] = value
  depth = len([k for k in tr if k.startswith('encoderblock_')])
  own_tables = [tr[f'encoderblock_{i}'].get('rel_pos_bias', {}).get(_TABLE) for i in range(depth)]
  if shared is not None and all(own is None for own in own_tables):
    sd[f'rel_pos_bias.{_TABLE}'] = shared
  for i, own in enumerate(own_tables):
    if own is None and shared is None:
      raise errors.InteropError('This encoder has no relative position bias; export it as a timm '
                                'VisionTransformer (config.model.rel_pos="none").')
    if own is not None:
      sd[f'blocks.{i}.attn.{_TABLE}'] = np.asarray(own if shared is None else own + shared,
                                                   np.float32)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def from_beit(sd, num_heads, key_bias=False):
  """timm Beit state dict -> (mimjax encoder params as numpy, `config.model` values).

  `fc_norm` (timm's default avg pooling: `norm` is the identity, the pooled feature is normalised)
  goes to the encoder's `fc_norm` (`config.model.fc_norm`), `norm` to the final norm. Per-block
  tables go to each block, a shared table (`rel_pos_bias.*`) to the Transformer. The
  params have no k bias (as `model.weight_init='beit'` builds them) unless `key_bias`, which adds a
  zero one (an encoder built with the default init).
  """
  for key in ('patch_embed.proj.weight', 'cls_token', 'blocks.0.attn.q_bias'):
    if key not in sd:
      raise errors.InteropError(f'The state dict has no {key!r}; it is not a timm Beit encoder.')
  depth = torch_files.num_blocks(sd)
  block_tables = f'blocks.0.attn.{_TABLE}' in sd
  shared = f'rel_pos_bias.{_TABLE}' in sd
  p = {'embedding': {'kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
                     'bias': sd['patch_embed.proj.bias']},
       'cls': sd['cls_token']}
  if 'pos_embed' in sd:
    p['pos_embedding'] = sd['pos_embed']
  tr = {}
  for i in range(depth):
    pre = f'blocks.{i}.'
    q_bias = sd[pre + 'attn.q_bias']
    block_sd = {pre + 'attn.qkv.bias': np.concatenate([q_bias, np.zeros_like(q_bias),
                                                       sd[pre + 'attn.v_bias']])}
    for name in ('norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.proj.weight',
                 'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
                 'mlp.fc2.weight', 'mlp.fc2.bias'):
      block_sd[pre + name] = sd[pre + name]
    for j in (1, 2):
      if f'{pre}gamma_{j}' in sd:
        block_sd[f'{pre}ls{j}.gamma'] = sd[f'{pre}gamma_{j}']
    blk = timm_lib.block_from_timm(block_sd, pre, num_heads)
    if not key_bias:
      del blk['MultiHeadDotProductAttention_0']['key']['bias']
    if block_tables:
      blk['rel_pos_bias'] = {_TABLE: sd[pre + f'attn.{_TABLE}']}
    tr[f'encoderblock_{i}'] = blk
  fc_norm = timm_lib.final_norm(sd, p, tr)
  if shared:
    tr['rel_pos_bias'] = {_TABLE: sd[f'rel_pos_bias.{_TABLE}']}
  p['Transformer'] = tr
  if 'head.weight' in sd:
    p['head'] = {'kernel': sd['head.weight'].T, 'bias': sd['head.bias']}
  rel_pos = {(True, True): 'both', (True, False): 'block', (False, True): 'shared',
             (False, False): 'none'}[(block_tables, shared)]
  model = dict(rel_pos=rel_pos, posemb='learn' if 'pos_embed' in sd else 'none', cls_token=True,
               num_classes=sd['head.weight'].shape[0] if 'head.weight' in sd else 0,
               weight_init='default' if key_bias else 'beit', fc_norm=fc_norm)
  return timm_lib.as_float32(p), model


def is_beit_state_dict(sd):
  """Whether a state dict is a timm Beit's (q and v biases apart, no fused qkv bias)."""
  return 'blocks.0.attn.q_bias' in sd


def infer_arch(sd):
  """The `timm_lib.Arch` of a timm Beit state dict (posemb 'none' without an absolute table); the
  grid comes from the relative position table's (2 grid - 1)^2 + 3 rows."""
  table = next((v for k, v in sd.items() if k.endswith(_TABLE)), None)
  if table is None:
    raise errors.InteropError('The Beit has no relative position bias table; mimjax imports Beit '
                              'models with use_rel_pos_bias or use_shared_rel_pos_bias only.')
  grid = (int(round(np.sqrt(table.shape[0] - 3))) + 1) // 2
  width, in_chans, patch, _ = sd['patch_embed.proj.weight'].shape
  return timm_lib.Arch(
      width=width, depth=torch_files.num_blocks(sd), mlp_dim=sd['blocks.0.mlp.fc1.weight'].shape[0],
      patch_size=patch, grid_size=grid, in_chans=in_chans, cls_token='cls_token' in sd,
      posemb='learn' if 'pos_embed' in sd else 'none', layerscale='blocks.0.gamma_1' in sd,
      num_classes=sd['head.weight'].shape[0] if 'head.weight' in sd else 0,
      fc_norm='fc_norm.weight' in sd)


def fit_rel_pos(encoder_params, rel_pos):
  """Imported Beit params rearranged for a config's `model.rel_pos`, the same function.

  The bias is a lookup of (per-block + shared) tables, so a shared table folds into every block's
  ('block'), and a missing block or shared table is zeros ('both'; timm exports, which write
  per-block tables only, go back into the DTM recipe's 'both' this way). Only 'shared' cannot
  hold different tables per block: InteropError.
  """
  tr = dict(encoder_params['Transformer'])
  blocks = sorted(k for k in tr if k.startswith('encoderblock_'))
  shared = tr.pop('rel_pos_bias', {}).get(_TABLE)
  own = [tr[b].get('rel_pos_bias', {}).get(_TABLE) for b in blocks]
  like = shared if shared is not None else own[0]
  if rel_pos == 'shared':
    if any(t is not None for t in own):
      raise errors.InteropError('The Beit has a relative position table per block; a config with '
                                'model.rel_pos="shared" has one for all; use "block" or "both".')
    tr['rel_pos_bias'] = {_TABLE: shared}
  else:
    zeros = np.zeros_like(like)
    for b, t in zip(blocks, own):
      table = zeros if t is None else t
      if rel_pos == 'block' and shared is not None:
        table = table + shared
      tr[b] = dict(tr[b], rel_pos_bias={_TABLE: table})
    if rel_pos == 'both':
      tr['rel_pos_bias'] = {_TABLE: zeros if shared is None else shared}
  return dict(encoder_params, Transformer=tr)
