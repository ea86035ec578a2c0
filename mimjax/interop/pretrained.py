"""Start a fresh run from saved weights: `config.init.checkpoint` + `config.init.format`.

PyTorch files (timm, official MAE) or the encoder of another mimjax run (format 'mimjax', the
checkpoint being its workdir: fine-tuning a pre-trained encoder).

`load(config, abstract_params)` reads the file, checks that the config describes the same
architecture (naming the config key to change when it does not), and returns the subtree of
params to put in place of the random initialisation. Parts the file does not hold, or the config
reshapes (a classifier head of another size, an MAE decoder for another framework), keep their
random initialisation and are reported.
"""
import jax
import numpy as np

from mimjax import checkpoint as checkpoint_lib
from mimjax import errors
from mimjax import tree_util
from mimjax import workdir as workdir_lib
from mimjax.interop import beit as beit_lib
from mimjax.interop import mae as mae_lib
from mimjax.interop import timm as timm_lib
from mimjax.interop import torch_files
from mimjax.models import vit


def _read(config):
  """(params, Arch, config.mae values) of the file named by config.init."""
  num_heads = vit.parse_variant(config.model.variant)['num_heads']
  if config.init.format == 'timm':
    state = torch_files.read_state_dict(config.init.checkpoint)
    if beit_lib.is_beit_state_dict(state):  # relative position bias: BEiT / DTM backbones
      arch = beit_lib.infer_arch(state)
      params, _ = beit_lib.from_beit(state, num_heads,
                                     key_bias=config.model.weight_init != 'beit')
      if config.model.rel_pos == 'none':
        raise errors.ConfigError(
            f'config.init.checkpoint={config.init.checkpoint!r} is a timm Beit (relative position '
            'bias), but config.model.rel_pos="none"; set --config.model.rel_pos=both (or block).')
      params = beit_lib.fit_rel_pos(params, config.model.rel_pos)
    else:
      params, arch = timm_lib.from_timm(state, num_heads)
    return {'encoder': params}, arch, {}
  params, arch, _, mae = mae_lib.import_mae(config.init.checkpoint, num_heads,
                                            config.mae.decoder_heads)
  return params, arch, mae


def _check_arch(config, arch):
  """ConfigError naming the key when `config.model` / `config.data` cannot hold these weights."""
  kw = vit.parse_variant(config.model.variant)
  src = f'config.init.checkpoint={config.init.checkpoint!r}'
  dims = (arch.width, arch.depth, arch.mlp_dim, arch.patch_size)
  if (kw['width'], kw['depth'], kw['mlp_dim'], kw['patch_size']) != dims:
    size = arch.size_name()
    hint = (f'set --config.model.variant={size}/{arch.patch_size}' if size else
            'no mimjax variant has these dimensions')
    raise errors.ConfigError(
        f'{src} holds a ViT of width {arch.width}, depth {arch.depth}, MLP {arch.mlp_dim}, patch '
        f'{arch.patch_size}, but config.model.variant={config.model.variant!r}; {hint}.')
  checks = [  # (key, value in the config, value the weights need, value to suggest)
      ('data.image_size', config.data.image_size, arch.image_size, arch.image_size),
      ('model.cls_token', config.model.cls_token, arch.cls_token, arch.cls_token),
      ('model.layerscale > 0', bool(config.model.layerscale), arch.layerscale,
       1e-4 if arch.layerscale else 0),
  ]
  if arch.posemb in ('learn', 'none'):  # a fixed sin-cos table may initialise a learned one
    checks.append(('model.posemb', config.model.posemb, arch.posemb, arch.posemb))
  if arch.fc_norm:  # a norm on the pooled feature only (timm fc_norm=True, Beit avg pooling)
    checks.append(('model.fc_norm', config.model.fc_norm, True, True))
  for key, have, need, fix in checks:
    if have != need:
      raise errors.ConfigError(
          f'{src} needs config.{key} to be {need} (the weights say so), got {have}; set '
          f'--config.{key.split()[0]}={fix}.')


def _select(config, params, mae, abstract_params):
  """Drops the parts the run (`abstract_params`) has no place for; returns (params, notes)."""
  notes = []
  encoder = dict(params['encoder'])
  if config.model.posemb == 'sincos2d':
    # The patch part equals the fixed table (checked by _check_arch); the cls slot, which the
    # fixed embedding does not have, is folded into the cls token: the same function.
    table = encoder.pop('pos_embedding')
    if config.model.cls_token:
      encoder['cls'] = encoder['cls'] + table[:, :1]
  if config.model.rel_pos == 'block' and 'rel_pos_bias' in encoder['Transformer']:
    encoder['Transformer'] = _shared_into_blocks(dict(encoder['Transformer']))
    notes.append("each block's relative position bias starts from its own plus the shared table")
  head = encoder.pop('head', None)
  if head is not None and config.model.num_classes == head['bias'].shape[0]:
    encoder['head'] = head
  elif config.model.num_classes:
    notes.append(f'the classifier head ({config.model.num_classes} classes) starts random')
  selected = {'encoder': encoder}
  if 'decoder' in params and 'decoder' in abstract_params:  # an MAE decoder for an MAE run
    for key, value in mae.items():
      if config.mae[key] != value:
        raise errors.ConfigError(
            f'config.init.checkpoint holds an MAE decoder with {key}={value}, but '
            f'config.mae.{key}={config.mae[key]}; set --config.mae.{key}={value}.')
    selected['decoder'] = params['decoder']
  return selected, notes


def _read_mimjax(config):
  """(params, notes): the encoder of the mimjax workdir `config.init.checkpoint`, head dropped
  unless it has `config.model.num_classes` outputs. A learned position embedding in the config
  starts from the run's fixed sin-cos table (zero cls slot), as MAE's fine-tuning trains it."""
  step = None if config.init.step < 0 else config.init.step
  src = f'config.init.checkpoint={config.init.checkpoint!r} (format mimjax, a workdir)'
  try:
    encoder = dict(checkpoint_lib.restore_params(config.init.checkpoint, step)['encoder'])
    posemb = workdir_lib.read_encoder_config(config.init.checkpoint).model.posemb
  except errors.CheckpointError as e:
    raise errors.ConfigError(f'{src}: {e}') from e
  notes = []
  if config.model.posemb == 'learn' and posemb != 'learn':
    if posemb != 'sincos2d':
      raise errors.ConfigError(f'{src} has no absolute position embedding (model.posemb='
                               f'{posemb!r}); set --config.model.posemb={posemb}.')
    grid = vit.grid_size(config.model, config.data.image_size)
    encoder['pos_embedding'] = timm_lib.position_embedding(encoder, grid)
    notes.append('the learned position embedding starts from the fixed sin-cos table')
  if config.model.rel_pos == 'block' and 'rel_pos_bias' in encoder['Transformer']:
    encoder['Transformer'] = _shared_into_blocks(dict(encoder['Transformer']))
    notes.append("each block's relative position bias starts from its own plus the shared table")
  head = encoder.pop('head', None)
  if head is not None and config.model.num_classes == head['bias'].shape[0]:
    encoder['head'] = head
  elif config.model.num_classes:
    notes.append(f'the classifier head ({config.model.num_classes} classes) starts random')
  return {'encoder': encoder}, notes


def _shared_into_blocks(transformer):
  """A Transformer's params with the shared relative position table added into every block's
  own (zero where a block has none), as BEiT's and DTM's `--init_both_rpb` and SimMIM's
  `load_pretrained` start a per-block fine-tuning from a shared (and per-block) pre-training."""
  shared = transformer.pop('rel_pos_bias')['relative_position_bias_table']
  for name, block in transformer.items():
    if name.startswith('encoderblock_'):
      own = block.get('rel_pos_bias', {}).get('relative_position_bias_table', 0.0)
      transformer[name] = {**block, 'rel_pos_bias': {
          'relative_position_bias_table': np.asarray(own) + np.asarray(shared)}}
  return transformer


def _fresh_fc_norm(config, selected, notes):
  """MAE's fine-tuning model: the pre-trained final norm is dropped and `fc_norm` starts fresh
  (`models_vit.py` deletes `norm`; `main_finetune.py` loads with fc_norm missing)."""
  encoder = selected['encoder']
  if not config.model.fc_norm or 'fc_norm' in encoder:
    return
  transformer = dict(encoder['Transformer'])
  if transformer.pop('encoder_norm', None) is not None:
    notes.append("the pre-trained final norm is dropped, fc_norm starts fresh")
  encoder['Transformer'] = transformer


def _flat_shapes(tree):
  return {tree_util.path_str(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load(config, abstract_params):
  """Params (numpy) to replace in a fresh run's initial params; prints what starts random."""
  if config.init.format == 'mimjax':
    selected, notes = _read_mimjax(config)
  else:
    try:
      params, arch, mae = _read(config)
    except errors.InteropError as e:
      raise errors.ConfigError(
          f'config.init.checkpoint={config.init.checkpoint!r}: {e}') from e
    _check_arch(config, arch)
    selected, notes = _select(config, params, mae, abstract_params)
  _fresh_fc_norm(config, selected, notes)
  have, want = _flat_shapes(selected), _flat_shapes(abstract_params)
  wrong = sorted(k for k in have if want.get(k) != have[k])
  missing = sorted(k for k in want if k.startswith('encoder/') and k not in have
                   and not k.startswith(('encoder/head/', 'encoder/fc_norm/')))
  if wrong or missing:
    raise errors.ConfigError(
        f'config.init.checkpoint={config.init.checkpoint!r} does not fit this config: '
        + '; '.join(f'{k} {have[k]} vs {want.get(k)}' for k in wrong[:3])
        + (f' encoder params not in the file: {missing[:3]}' if missing else ''))
  rest = sorted({k.split('/')[0] for k in want} - set(selected))
  notes += [f'params[{k!r}] start random' for k in rest]
  print(f'Initialised {len(have)} of {len(want)} parameter arrays from '
        f'{config.init.checkpoint} ({config.init.format})'
        + (f'; {", ".join(notes)}.' if notes else '.'), flush=True)
  return selected

