r"""Export a mimjax encoder to timm: `python -m mimjax.export --workdir DIR --out FILE.safetensors`.

Writes the encoder of a checkpoint (the latest, or `--step`) as a timm VisionTransformer state dict
(`--format safetensors`, the default; an encoder with relative position bias, `model.rel_pos`,
becomes a timm `Beit`, see `mimjax.interop.beit`) or as a big_vision-style `.npz` with
`params/...` keys that timm's own `.npz` loader reads (`--format npz`), plus `FILE.json`: the
`timm.create_model` name and keyword arguments that rebuild the architecture, and the input
normalisation. Everything outside `params['encoder']` (decoders, plug-in heads, mask tokens, EMA
copies) is left out. `--format hub --out DIR` writes a timm model folder instead
(mimjax/interop/hub.py): `timm.create_model('local-dir:DIR', pretrained=True)`, and prints its
timm train.py command.

  sc = json.load(open('enc.safetensors.json'))
  model = timm.create_model(sc['timm_model'], **sc['timm_kwargs'])
  model.load_state_dict(safetensors.torch.load_file('enc.safetensors'))
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import checkpoint as checkpoint_lib
from mimjax import errors
from mimjax import workdir as workdir_lib
from mimjax import workdir_io
from mimjax.interop import beit as beit_lib
from mimjax.interop import hub
from mimjax.interop import timm as timm_lib
from mimjax.models import vit

FORMATS = ('safetensors', 'npz', 'hub')


def load_encoder(workdir, step=None):
  """(config, encoder params as numpy, step) of a training workdir's checkpoint."""
  params, step = checkpoint_lib.restore(workdir, step)
  return workdir_lib.read_config(workdir), params['encoder'], step


def build_encoder(config):
  """The float32 mimjax ViT of `config` (inference: no drop path)."""
  return vit.from_config(config, dtype=jnp.float32, drop_path=0.0, remat=False)


def forward_features(config, encoder_params, images):
  """timm's `forward_features` computed by mimjax: all tokens after the final norm, cls first.

  images: [B, H, W, C] normalised (mimjax layout; timm takes the same values as [B, C, H, W]).
  """
  out = build_encoder(config).apply({'params': encoder_params}, jnp.asarray(images, jnp.float32))
  return np.asarray(out['tokens'])


def check_exportable(config, encoder_params):
  """Raises errors.InteropError when timm's ViT cannot reproduce this encoder."""
  tokenizer_norm = config.model.tokenizer_norm if 'tokenizer_norm' in config.model else 'none'
  if tokenizer_norm != 'none':
    raise errors.InteropError(
        f'config.model.tokenizer_norm={tokenizer_norm!r} (MoTo) changes the patch tokenizer in a '
        'way timm\'s VisionTransformer cannot represent; refusing to export a model that would '
        'compute something else. Use the encoder from JAX (mimjax.export.forward_features).')
  timm_lib.check_representable(encoder_params)


def _npz_arrays(encoder_params, posemb_table):
  """big_vision `params/...` arrays for timm's npz loader, layer scale folded into the weights.

  timm's npz loader has no layer-scale weights, so each block's scale is multiplied into the
  output projection it follows (attention `out`, MLP `Dense_1`): `(x W + b) * g = x (W g) + b g`.
  """
  p = timm_lib.jax_free(encoder_params)
  p['pos_embedding'] = np.asarray(posemb_table, np.float32)
  for name, blk in p['Transformer'].items():
    if not name.startswith('encoderblock_'):
      continue
    for idx, layer in ((0, blk['MultiHeadDotProductAttention_0']['out']),
                       (1, blk['MlpBlock_0']['Dense_1'])):
      if f'LayerScale_{idx}' in blk:
        gamma = blk.pop(f'LayerScale_{idx}')['scale']
        layer['kernel'] = layer['kernel'] * gamma
        layer['bias'] = layer['bias'] * gamma
  flat = jax.tree_util.tree_flatten_with_path(p)[0]
  return {'params/' + '/'.join(k.key for k in path): np.asarray(v, np.float32) for path, v in flat}


def export_params(config, encoder_params, out, fmt='safetensors', source=None):
  """Writes `out` (+ `out.json`) from encoder params of a model built by `config`.

  Returns the sidecar dict. `source` (e.g. workdir and step) is recorded in the sidecar.
  """
  if fmt not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, not {fmt!r}')
  check_exportable(config, encoder_params)
  check_out(out, fmt)
  beit = beit_lib.is_beit(config.model)
  if beit and fmt != 'safetensors':
    raise errors.InteropError('An encoder with relative position bias exports to timm\'s Beit as '
                              'safetensors only; use --format safetensors.')
  if config.model.fc_norm and fmt == 'npz':
    raise errors.InteropError('timm\'s npz loader does not read fc_norm (config.model.fc_norm, '
                              'MAE\'s fine-tuning model); use --format safetensors.')
  grid = vit.grid_size(config.model, config.data.image_size)
  table = None
  if config.model.posemb != 'none':
    table = timm_lib.position_embedding(encoder_params, grid)
  in_chans = int(np.shape(encoder_params['embedding']['kernel'])[2])
  kwargs = (beit_lib if beit else timm_lib).timm_kwargs(config.model, config.data.image_size,
                                                        in_chans)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if fmt == 'safetensors':
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(beit_lib.to_beit(encoder_params, table) if beit else
              timm_lib.to_timm(encoder_params, table), out)
  else:
    kwargs['init_values'] = None  # folded into the weights, see _npz_arrays
    with open(out, 'wb') as f:  # a file object: np.savez would append .npz to other names
      np.savez(f, **_npz_arrays(encoder_params, table))
  mean, std = list(config.data.mean), list(config.data.std)
  kwargs['pretrained_cfg_overlay'] = dict(
      mean=mean, std=std, input_size=[in_chans, config.data.image_size, config.data.image_size],
      crop_pct=config.data.eval_crop_fraction, interpolation='bicubic',
      num_classes=config.model.num_classes)
  sidecar = dict(timm_model=(beit_lib if beit else timm_lib).TIMM_MODEL, timm_kwargs=kwargs,
                 format=fmt, mean=mean, std=std, image_size=config.data.image_size,
                 input_range=[0.0, 1.0],
                 source=dict(source or {}, framework=config.framework,
                             variant=config.model.variant))
  with open(out + '.json', 'w') as f:
    json.dump(sidecar, f, indent=2)
  return sidecar


def check_out(out, fmt):
  """ConfigError, before anything is read, unless `out` can be written: a file path (a folder for
  'hub') whose parent is, or can be created as, a writable directory."""
  folder = out if fmt == 'hub' else os.path.dirname(os.path.abspath(out))
  if fmt == 'hub' and os.path.isfile(out):
    raise errors.ConfigError(f'--out {out} is a file; --format hub writes a folder.')
  if fmt != 'hub' and os.path.isdir(out):
    raise errors.ConfigError(f'--out {out} is a directory; give a file path, e.g. '
                             f'{os.path.join(out, "encoder." + fmt)}.')
  workdir_io.check_creatable_dir(folder, '--out', 'choose another --out')


def export_checkpoint(workdir, out, step=None, fmt='safetensors'):
  """Exports the encoder of `workdir`'s checkpoint `step` (default latest); returns the sidecar
  (for 'hub': the folder's config.json and the timm fine-tuning command)."""
  check_out(out, fmt)
  config, encoder_params, step = load_encoder(workdir, step)
  source = dict(workdir=os.path.abspath(workdir), step=int(step))
  if fmt == 'hub':
    check_exportable(config, encoder_params)
    return hub.export_hub(config, encoder_params, out, source)
  return export_params(config, encoder_params, out, fmt, source=source)


def create_timm_model(path):
  """The timm model of an export, with its weights loaded (needs torch and timm)."""
  import timm  # pylint: disable=g-import-not-at-top
  sidecar = timm_lib.read_sidecar(path)
  kwargs = dict(sidecar['timm_kwargs'])
  kwargs['pretrained_cfg_overlay'] = dict(kwargs['pretrained_cfg_overlay'], file=path,
                                          custom_load=sidecar['format'] == 'npz')
  return timm.create_model(sidecar['timm_model'], pretrained=True, **kwargs)


def _define_flags():
  """Flags of the CLI, defined only when run as a program (mimjax.train defines --workdir too)."""
  flags.DEFINE_string('workdir', None, 'Training workdir holding config.json and checkpoints/.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
  flags.DEFINE_string('out', None, 'Output file (.safetensors or .npz; FILE.json is written next '
                      'to it), or folder (--format hub).')
  flags.DEFINE_enum('format', None, FORMATS, 'Output format (default: from the --out extension, '
                    'safetensors unless it ends in .npz); hub: a timm model folder for '
                    'timm.create_model("local-dir:OUT") and the Hugging Face hub.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.workdir or not f.out:
    raise app.UsageError('--workdir and --out are required.')
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every read at INFO.
    logging.set_verbosity(logging.ERROR)
  fmt = f.format or ('npz' if f.out.endswith('.npz') else 'safetensors')
  try:
    result = export_checkpoint(f.workdir, f.out, f.step, fmt)
  except (errors.MimjaxError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # the disk filled, or the mount turned read-only, while writing
    print(f'error: writing --out {f.out} failed: {e.strerror or e}; free space or choose '
          'another --out.', file=sys.stderr)
    sys.exit(1)
  if fmt == 'hub':
    hub_config, command = result
    step = hub_config['mimjax']['step']
    print(f'Wrote the timm model folder {f.out} (step {step}); load it with '
          f"timm.create_model('local-dir:{f.out}', pretrained=True). Fine-tune it with timm's "
          f'train.py (also in {os.path.join(f.out, hub.COMMAND_FILE)}):\n{command}')
    return
  print(f'Wrote {f.out} ({fmt}, step {result["source"]["step"]}) and {f.out}.json')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
