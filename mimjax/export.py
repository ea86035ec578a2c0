r"""Export a mimjax encoder to timm: `python -m mimjax.export --workdir DIR --out FILE.safetensors`.

Writes the encoder of a checkpoint (the latest, or `--step`) as a timm VisionTransformer state dict
(`--format safetensors`, the default; an encoder with relative position bias, `model.rel_pos`,
becomes a timm `Beit`, see `mimjax.interop.beit`) or as a big_vision-style `.npz` with
`params/...` keys that timm's own `.npz` loader reads (`--format npz`), plus `FILE.json`: the
`timm.create_model` name and keyword arguments that rebuild the architecture, and the input
normalisation. Everything outside `params['encoder']` (decoders, plug-in heads, mask tokens, EMA
copies) is left out. `--format hub --out DIR` writes a timm model folder instead
(mimjax/interop/hub.py): `timm.create_model('local-dir:DIR', pretrained=True)`, and prints its
timm train.py command. Every export then checks itself: timm builds the model from the files just
written and must compute the JAX encoder's outputs on a fixed input, or the files are deleted and
the export fails (`verify_export`).

  sc = json.load(open('enc.safetensors.json'))
  model = timm.create_model(sc['timm_model'], **sc['timm_kwargs'])
  model.load_state_dict(safetensors.torch.load_file('enc.safetensors'))
"""
import contextlib
import json
import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import errors
from mimjax import registry
from mimjax import workdir_io
from mimjax.interop import beit as beit_lib
from mimjax.interop import hub
from mimjax.interop import timm as timm_lib
from mimjax.interop import torch_files
from mimjax.models import vit

FORMATS = ('safetensors', 'npz', 'hub')
# How far timm's outputs from an export may be from the JAX encoder's (relative; float32 gives
# about 1e-6 on these shapes).
VERIFY_TOLERANCE = 1e-4


def load_encoder(workdir, step=None):
  """(config, encoder params as numpy, step) of a training workdir's checkpoint."""
  params, step = checkpoint_lib.restore(workdir, step)
  return config_lib.read_config(workdir), params['encoder'], step


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
  """Writes `out` (+ `out.json`; for 'hub' the folder `out`) from encoder params of a model built
  by `config`, then checks it (`verify_export`).

  Returns the sidecar dict, for 'hub' (config.json dict, fine-tuning command); either way with
  `verified`: the checked relative difference, or None where timm is not installed. `source`
  (e.g. workdir and step) is recorded in the sidecar (and, without the workdir path, config.json).
  Raises InteropError / ConfigError with nothing written (or, for a failed check, nothing left).
  """
  if fmt not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, not {fmt!r}')
  check_exportable(config, encoder_params)
  check_out(out, fmt)
  # Before anything loads TensorFlow (hub: the dataset's label names), see torch_files.load_timm.
  timm = torch_files.load_timm()
  if fmt == 'hub':
    with staged_folder(out, hub.FILES) as staging:
      written = [os.path.join(staging, name) for name in hub.FILES]
      recipe = registry.FRAMEWORKS[config.framework].finetune_recipe(config)
      hub_config, command = hub.export_hub(config, encoder_params, out, source or {}, recipe,
                                           staging)
      hub_config['verified'] = verify_export(
          timm, config, encoder_params, written,
          lambda: timm.create_model(f'local-dir:{staging}', pretrained=True))
    return hub_config, command
  sidecar = _write_file(config, encoder_params, out, fmt, source)
  sidecar['verified'] = verify_export(timm, config, encoder_params, [out, out + '.json'],
                                      lambda: create_timm_model(out))
  return sidecar


@contextlib.contextmanager
def staged_folder(out, replaced):
  """A new temporary folder next to `out` for the body to write a folder export into, moved to
  `out` when the body completes; when it fails (a full disk, a failed check, Ctrl-C) it is removed
  with the parent folders made for it, so nothing is left and an earlier export at `out` stays.
  `out` that does not exist, or is empty, is replaced at once (a rename); an `out` that holds
  files (an earlier export, the user's own) is swapped by renames (`_swap`), so `out` holds
  either the earlier export or the new one whole, never a mix; `replaced` names the export's
  files (the others, the user's, are kept)."""
  parent = os.path.dirname(os.path.abspath(out))
  missing, folder = [], parent
  while not os.path.exists(folder):
    missing.append(folder)
    folder = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out))}.',
                             suffix='.partial', dir=parent)
  try:
    yield staging
    try:
      os.rename(staging, out)
    except OSError:  # `out` holds files
      _swap(staging, out, replaced)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    for folder in missing:  # deepest first; only those still empty (a failed export's)
      if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def _swap(staging, out, replaced):
  """Replaces the folder `out` by `staging` with renames: `out` to a sibling `.old` (put back if
  the next rename fails), `staging` to `out`, then the old folder's files not in `replaced` (the
  user's own) moved into the new `out`, and the old folder removed. A failure while moving those
  back leaves the rest of them in the `.old` sibling (named in the error), the new export whole."""
  old = staging[:-len('.partial')] + '.old'
  os.rename(out, old)
  try:
    os.rename(staging, out)
  except BaseException:
    os.rename(old, out)
    raise
  try:
    for name in os.listdir(old):
      if name not in replaced and not os.path.exists(os.path.join(out, name)):
        os.replace(os.path.join(old, name), os.path.join(out, name))
  except OSError as e:
    raise OSError(e.errno, f'{e.strerror}; the files of {out} before this export not moved back '
                  f'are in {old}') from e
  shutil.rmtree(old, ignore_errors=True)


def _write_file(config, encoder_params, out, fmt, source):
  """Writes the safetensors or npz export and its sidecar; returns the sidecar dict."""
  beit = beit_lib.is_beit(config.model)
  if beit and fmt != 'safetensors':
    raise errors.InteropError('An encoder with relative position bias exports to timm\'s Beit as '
                              'safetensors or a hub folder only; use --format safetensors or hub.')
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
  weights = (beit_lib.to_beit(encoder_params, table) if beit else
             timm_lib.to_timm(encoder_params, table) if fmt == 'safetensors' else
             _npz_arrays(encoder_params, table))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if fmt == 'safetensors':
    torch_files.save_safetensors(weights, out)
  else:
    kwargs['init_values'] = None  # folded into the weights, see _npz_arrays
    with open(out, 'wb') as f:  # a file object: np.savez would append .npz to other names
      np.savez(f, **weights)
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


def check_images(config, in_chans):
  """The fixed input every export is checked on: 2 images of N(0, 1) pixels (seed 0), NHWC."""
  size = config.data.image_size
  return np.random.RandomState(0).randn(2, size, size, in_chans).astype(np.float32)


def relative_difference(ours, theirs):
  """max |ours - theirs| / max |ours|: 1e-6 is float32 rounding, 1 a different function."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(ours)), 1e-12))


def verify_export(timm, config, encoder_params, written, build):
  """Checks an export as its user will load it: timm's model from the written files (`build()`)
  must compute the JAX encoder's tokens, pooled features and logits on `check_images` to
  VERIFY_TOLERANCE relative. Returns the largest relative difference, or None without timm
  (`timm` None: nothing to check with). A failed check deletes `written` (and a folder emptied by
  that) and raises InteropError: an export that computes something else must not be used.
  """
  if timm is None:
    return None
  import torch  # pylint: disable=g-import-not-at-top
  in_chans = int(np.shape(encoder_params['embedding']['kernel'])[2])
  x = check_images(config, in_chans)
  ours = build_encoder(config).apply({'params': encoder_params}, jnp.asarray(x))
  try:
    model = build().eval()
    with torch.no_grad():
      tokens = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
      theirs = dict(tokens=tokens, pooled=model.forward_head(tokens, pre_logits=True))
      if 'logits' in ours:
        theirs['logits'] = model.forward_head(tokens)
    diffs = {k: relative_difference(ours[k], v.numpy()) for k, v in theirs.items()}
    failure = None if max(diffs.values()) <= VERIFY_TOLERANCE else ', '.join(
        f'{k} {d:.2g}' for k, d in diffs.items())
  except Exception as e:  # pylint: disable=broad-except  # timm refusing the files is a failure too
    failure = f'timm could not build it ({type(e).__name__}: {str(e).splitlines()[0][:200]})'
  if failure is None:
    return max(diffs.values())
  for path in written:
    if os.path.isfile(path):
      os.remove(path)
  folder = os.path.dirname(written[0])
  if written[0].endswith('config.json') and os.path.isdir(folder) and not os.listdir(folder):
    os.rmdir(folder)
  raise errors.InteropError(
      f'The export does not compute what the JAX encoder computes when timm loads it ({failure}; '
      f'relative, tolerance {VERIFY_TOLERANCE}); it was deleted. This is a mimjax bug: please '
      'report it with the config.')


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
  """Exports the encoder of `workdir`'s checkpoint `step` (default latest), `out` checked before
  anything is read; returns what `export_params` returns."""
  check_out(out, fmt)
  config, encoder_params, step = load_encoder(workdir, step)
  source = dict(workdir=os.path.abspath(workdir), step=int(step))
  return export_params(config, encoder_params, out, fmt, source=source)


def create_timm_model(path):
  """The timm model of a safetensors or npz export, with its weights loaded (needs torch and
  timm; for a hub folder: `timm.create_model('local-dir:DIR', pretrained=True)`)."""
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
    result, command = result
    print(f'Wrote the timm model folder {f.out} (step {result["mimjax"]["step"]}); load it with '
          f"timm.create_model('local-dir:{f.out}', pretrained=True).")
  else:
    print(f'Wrote {f.out} ({fmt}, step {result["source"]["step"]}) and {f.out}.json')
  if result['verified'] is None:
    print("Not checked against timm: torch and timm are not installed (pip install '.[torch]' in "
          'the mimjax checkout); the export is unverified.')
  else:
    print(f"Checked: timm's model from these files computes the encoder's tokens, pooled features "
          f"and logits to {result['verified']:.1e} relative.")
  if fmt == 'hub':
    print(f"Fine-tune it with the train.py of timm 1.0.31 ({hub.TIMM_TRAIN_PY}), run in timm's "
          f'checkout; add --device cpu on a machine without a CUDA GPU (also in '
          f'{os.path.join(f.out, hub.COMMAND_FILE)}):\n{command}')

if __name__ == '__main__':
  _define_flags()
  app.run(main)
