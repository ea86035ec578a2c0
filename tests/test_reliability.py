"""Fault injection (issue 18): NaN updates, changed-config resumes, damaged checkpoints, failed
saves and bad input. Each test fails on the code before the fix; docs/reliability.md maps them to
the guarantees."""
import copy
import errno
import json
import os
import shutil
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils import epath

from conftest import config_flags
from conftest import run_module
from conftest import tiny_overrides
from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import errors
from mimjax import export
from mimjax import resume
from mimjax import train
from mimjax import train_step as train_step_lib
from mimjax.data import sources
from mimjax.eval import loading
from test_train import _LinearRegression


def _steps(workdir):
  ckpt = checkpoint_lib.Checkpointer(workdir)
  try:
    return sorted(ckpt.manager.all_steps())
  finally:
    ckpt.close()


def _set(config, **values):
  with config.unlocked():
    for key, value in values.items():
      target = config
      *parents, leaf = key.split('.')
      for p in parents:
        target = target[p]
      target[leaf] = value
  return config


# Item 3: the update itself is guarded.

def _linreg_step(config):
  batch = {'x': jnp.ones((4, 3), jnp.float32), 'y': jnp.ones((4,), jnp.float32)}
  framework = _LinearRegression(config)
  init_fn, _, tx, lr = train_step_lib.build(framework, config, batch)
  return init_fn(), jax.jit(train_step_lib.make_train_step(framework, tx, lr)), batch


def test_nan_params_from_a_finite_loss_are_not_applied(tiny_mae_config):
  """Adam with b2 = 1: the second moment's bias correction is 0/0, so the update is NaN although
  the loss and gradient are finite (optax itself gives NaN here); the state must stay put."""
  config = _set(copy.deepcopy(tiny_mae_config), **{'optim.b2': 1.0})
  state, step, batch = _linreg_step(config)
  # What optax alone does with these gradients: NaN updates from a finite gradient.
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  adam = optax.adam(1e-3, b2=1.0)
  updates, _ = adam.update(grads, adam.init(state.params))
  assert np.isnan(np.asarray(jax.tree_util.tree_leaves(updates)[0])).all()

  before = jax.device_get(state.params)
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert float(metrics['nonfinite']) == 1.0
  np.testing.assert_array_equal(jax.device_get(new_state.params)['encoder']['kernel'],
                                before['encoder']['kernel'])


def test_finite_update_is_applied(tiny_mae_config):
  state, step, batch = _linreg_step(_set(copy.deepcopy(tiny_mae_config), warmup_steps=0))
  new_state, metrics = step(state, batch)
  assert float(metrics['nonfinite']) == 0.0
  assert not np.array_equal(jax.device_get(new_state.params)['encoder']['kernel'],
                            jax.device_get(state.params)['encoder']['kernel'])


def test_nan_params_are_never_checkpointed_and_no_step_none(tiny_mae_config, tmp_path):
  """A learning rate that passes validation but overflows float32 (1e39): an infinite update."""
  config = _set(tiny_mae_config, **{'optim.base_lr': 1e39, 'warmup_steps': 0, 'total_steps': 1,
                                    'checkpoint.every_steps': 1})
  with pytest.raises(errors.NonFiniteError) as e:
    train.train(config, str(tmp_path))
  assert 'step None' not in str(e.value)
  assert 'No checkpoint had been saved yet' in str(e.value)
  assert _steps(str(tmp_path)) == []


# Item 4: a changed config does not resume silently.

@pytest.mark.parametrize('key,value', [
    ('batch_size', 32), ('optim.base_lr', 1e-3), ('seed', 1), ('mae.mask_ratio', 0.5),
    ('warmup_steps', 1), ('data.train_split', 'train[:256]')])
def test_trajectory_changing_resume_is_refused_with_the_diff(tiny_mae_config, key, value):
  """resume.check's decision on the checkpoint's stored config, without training."""
  _set(tiny_mae_config, total_steps=3)  # the run that wrote the checkpoint
  meta = {'step': 3, 'config': json.loads(config_lib.to_json(tiny_mae_config))}
  config = _set(copy.deepcopy(tiny_mae_config), **{key: value, 'total_steps': 6})
  with pytest.raises(errors.ConfigError) as e:
    resume.check(config, meta, '/runs/x/checkpoints')
  message = str(e.value)
  accept = message.split('--config.resume.accept_changes=')[1].split(';')[0]
  assert f'{key}: ' in message and set(accept.split(',')) == {key, 'total_steps'}
  assert 'stretches the warmup + cosine schedule' in message  # total_steps changed too
  _set(config, **{'resume.accept_changes': f'total_steps, {key}'})
  resume.check(config, meta, '/runs/x/checkpoints')  # named, the same change is accepted


def test_refused_resume_of_a_real_run_changes_nothing(trained):
  config, workdir = trained
  config = _set(config, **{'batch_size': 32, 'total_steps': 6})
  config_before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(errors.ConfigError, match='batch_size: 16 -> 32'):
    train.train(config, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == config_before
  assert _steps(workdir) == [3]


def test_total_steps_below_the_checkpoint_is_an_error(tiny_mae_config):
  meta = {'step': 3, 'config': json.loads(config_lib.to_json(tiny_mae_config))}
  with pytest.raises(errors.ConfigError, match=r'total_steps=2 is below .* checkpoint \(3\)'):
    resume.check(_set(tiny_mae_config, **{'total_steps': 2}), meta, '/runs/x/checkpoints')


def test_accepted_change_resumes_keeps_history_and_counts_examples(trained):
  config, workdir = trained
  changed = _set(copy.deepcopy(config), **{
      'total_steps': 5, 'batch_size': 32, 'checkpoint.every_steps': 5, 'log.every_steps': 5,
      'resume.accept_changes': 'total_steps, batch_size'})
  train.train(changed, workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  meta = ckpt.read_meta(5)
  ckpt.close()
  assert meta['data_examples'] == 3 * 16 + 2 * 32
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [(h['start_step'], h['config']['batch_size']) for h in history] == [(0, 16), (3, 32)]
  assert json.load(open(os.path.join(workdir, 'config.json')))['batch_size'] == 32


def test_observation_only_changes_resume_freely(trained):
  config, workdir = trained
  changed = _set(copy.deepcopy(config), **{'log.every_steps': 2, 'checkpoint.every_steps': 6,
                                           'eval.batch_size': 32})
  train.train(changed, workdir)  # total_steps unchanged: nothing to do, no error
  assert _steps(workdir) == [3]


# Item 5: a damaged checkpoint is found before it is used.

def _flip_a_byte_in_state(step_dir):
  """Flips one byte in the middle of the largest file of the checkpoint's state."""
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, 'state')) for n in ns]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  return path


def test_flipped_byte_in_latest_checkpoint_is_reported_with_the_good_one(tiny_mae_config,
                                                                         tmp_path):
  workdir = str(tmp_path)
  train.train(_set(tiny_mae_config, **{'total_steps': 6}), workdir)  # checkpoints 3 and 6
  _flip_a_byte_in_state(os.path.join(workdir, 'checkpoints', '6'))
  _set(tiny_mae_config, **{'total_steps': 9, 'resume.accept_changes': 'total_steps'})
  with pytest.raises(errors.CheckpointError,
                     match=r'Checkpoint 6 .* is damaged: .* Checkpoint 3 verifies: move'):
    train.train(tiny_mae_config, workdir)
  with pytest.raises(errors.CheckpointError, match='Checkpoint 6 .* is damaged'):
    checkpoint_lib.restore_params(workdir)  # export / evaluate / init from the workdir
  # The offered fix works: with 6 moved away, the run resumes from 3 and ends at 9.
  step_dir = os.path.join(workdir, 'checkpoints', '6')
  os.rename(step_dir, step_dir + '.damaged')
  assert train.train(tiny_mae_config, workdir)['step'] == 9


def test_every_finalised_checkpoint_has_checksums(trained):
  _, workdir = trained
  sums = json.load(open(os.path.join(workdir, 'checkpoints', '3', checkpoint_lib.CHECKSUMS)))
  assert any(k.startswith('state') for k in sums) and any(k.startswith('meta') for k in sums)


# Item 6: a failed save stops the run at once with one message.

def test_enospc_in_the_async_save_stops_the_run_at_once(tiny_mae_config, tmp_path, monkeypatch):
  """The second save's background write fails with ENOSPC: the run stops at that step (not 10
  steps later or at exit), names the last complete checkpoint, and leaves no step-6 checkpoint."""
  handler = ocp.handlers.JsonCheckpointHandler
  real_save_fn = handler._save_fn
  calls = []

  async def full_disk(self, x, directory):
    calls.append(x['step'])
    if x['step'] == 6:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await real_save_fn(self, x, directory)

  monkeypatch.setattr(handler, '_save_fn', full_disk)
  workdir = str(tmp_path)
  _set(tiny_mae_config, **{'total_steps': 30})
  with pytest.raises(errors.CheckpointError) as e:
    train.train(tiny_mae_config, workdir)
  message = str(e.value)
  assert 'Saving checkpoint 6' in message and 'No space left on device' in message
  assert 'last complete checkpoint is step 3' in message and '\n' not in message
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert max(steps) <= 8  # stopped within the async window, far from 30
  assert calls == [3, 6]
  assert _steps(workdir) == [3]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']  # no tmp directory left
  assert message.startswith('Saving checkpoint 6 to')
  assert 'failed (No space left on device' in message
  assert checkpoint_lib.restore(workdir)[1] == 3  # checkpoint 3 still verifies


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    'known defect: on a real full disk, TensorStore callbacks from native threads can print '
    '"RuntimeError: Event loop is closed" tracebacks (timing-dependent; no logging filter reaches '
    'them) before the one error line; the injected-ENOSPC default test holds the rest'))
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_resumes(tmp_path):
  """A real full disk (a 3 MB tmpfs; needs root): one `error:` line naming "No space left on
  device", none of Orbax's logs or tracebacks, no temporary checkpoint directory left; the last
  complete checkpoint verifies and, once space is freed, the rerun resumes from it."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode:  # the same path with an injected ENOSPC runs in the default suite
    pytest.skip('mount -t tmpfs refused (needs root with CAP_SYS_ADMIN): '
                f'{mounted.stderr.strip()[:200]}; test_enospc_in_the_async_save_stops_the_run_at_'
                'once covers the same failure with an injected ENOSPC')
  try:
    workdir = disk / 'run'
    args = ['mimjax.train', '--config', 'configs/mae.py:runlocal', *config_flags(tiny_overrides(**{
        'mae.decoder_width': 32, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2,
        'total_steps': 30, 'checkpoint.keep': 20})), f'--workdir={workdir}']
    full = run_module(args)
    assert full.returncode == 1
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith('error: Saving checkpoint') and 'No space left on device' in (
        lines[-1]), full.stderr[-3000:]
    assert 'Traceback' not in full.stderr and 'orbax' not in '\n'.join(lines[:-1])
    left = os.listdir(workdir / 'checkpoints')
    assert all(name.isdigit() for name in left), left  # only whole steps, no tmp directory
    kept = sorted(map(int, left))
    assert checkpoint_lib.restore(str(workdir))[1] == kept[-1]
    for step in kept[:-1]:  # the user frees space (and keeps fewer checkpoints from now on)
      shutil.rmtree(workdir / 'checkpoints' / str(step))
    rerun = run_module(args[:-2] + ['--config.checkpoint.keep=2', f'--workdir={workdir}'])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f'Resuming from checkpoint {kept[-1]}' in rerun.stdout
  finally:
    subprocess.run(['umount', str(disk)], check=False)


# Items 7-10: bad input is one `error:` line, creates nothing, and messages name what exists.

def _one_line_error(e, *parts):
  message = str(e.value)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, message


def test_misspelt_config_key_names_the_near_miss(tmp_path):
  workdir = tmp_path / 'run'
  result = run_module(['mimjax.train', '--config', 'configs/mae.py:runlocal',
                       '--config.mae.mask_ration=0.5', f'--workdir={workdir}'])
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  errors_shown = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors_shown == ['error: --config.mae.mask_ration is not a config key; did you mean '
                          '--config.mae.mask_ratio?']
  assert not workdir.exists()


def _timm_state_dict():
  import timm  # pylint: disable=g-import-not-at-top
  return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=28, patch_size=4,
                           depth=1, num_classes=0).state_dict()


class _Unsafe:
  def __reduce__(self):
    return (os.system, ('echo this must never run',))


def _bad_init_files(directory):
  """{case: (path, expected message part)} of files a fresh run must refuse to start from."""
  import torch  # pylint: disable=g-import-not-at-top
  sd = _timm_state_dict()
  wrong_qkv = dict(sd, **{'blocks.0.attn.qkv.weight': sd['blocks.0.attn.qkv.weight'][:10]})
  missing = {k: v for k, v in sd.items() if k != 'blocks.0.norm1.bias'}
  cases = {'list': ([1, 2], 'holds a list, not a state dict'),
           'unsafe': (_Unsafe(), 'refused as unsafe'),
           'qkv': (wrong_qkv, 'blocks.0.attn.qkv.weight has shape (10, 192)'),
           'missing': (missing, "no 'blocks.0.norm1.bias'")}
  files = {}
  for name, (obj, part) in cases.items():
    path = os.path.join(directory, f'{name}.pth')
    torch.save(obj, path)
    files[name] = (path, part)
  text = os.path.join(directory, 'notes.pth')
  with open(text, 'w') as f:
    f.write('not weights\n')
  files['text'] = (text, 'is not a PyTorch checkpoint')
  return files


def test_malformed_init_files_are_one_line_errors(tiny_mae_config, tmp_path):
  for name, (path, part) in _bad_init_files(str(tmp_path)).items():
    config = _set(copy.deepcopy(tiny_mae_config), **{'init.checkpoint': path})
    workdir = tmp_path / f'run_{name}'
    with pytest.raises(errors.ConfigError) as e:
      train.train(config, str(workdir))
    _one_line_error(e, part, path)
    assert not workdir.exists(), name


@pytest.mark.parametrize('features,part', [
    ({'text': tfds.features.Text()}, 'has no `image` feature'),
    ({'image': tfds.features.Image(shape=(None, None, 4))}, 'has 4-channel images')])
def test_dataset_without_image_or_with_4_channels(tiny_mae_config, tmp_path, monkeypatch, features,
                                                  part):
  info = types.SimpleNamespace(splits={'train': None, 'test': None},
                               features=tfds.features.FeaturesDict(features))
  monkeypatch.setattr(sources, 'get_builder', lambda *a: types.SimpleNamespace(info=info))
  with pytest.raises(errors.DatasetError) as e:
    train.train(tiny_mae_config, str(tmp_path / 'run'))
  _one_line_error(e, part)
  assert not (tmp_path / 'run').exists()


def test_read_only_workdir(tiny_mae_config, tmp_path, monkeypatch):
  """A read-only parent (simulated: tests run as root, for whom chmod does not bite)."""
  parent = str(tmp_path / 'readonly')
  os.mkdir(parent)
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: p != parent and real_access(p, mode))
  with pytest.raises(errors.ConfigError) as e:
    train.train(tiny_mae_config, os.path.join(parent, 'run'))
  _one_line_error(e, 'cannot be created', 'is not writable')
  assert os.listdir(parent) == []


def test_export_out_directory_and_npz_name(trained, tmp_path):
  _, workdir = trained
  with pytest.raises(errors.ConfigError) as e:
    export.export_checkpoint(workdir, str(tmp_path))
  _one_line_error(e, 'is a directory')
  out = str(tmp_path / 'enc.bin')
  export.export_checkpoint(workdir, out, fmt='npz')
  assert sorted(os.listdir(tmp_path)) == sorted(['run', 'enc.bin', 'enc.bin.json'])
  assert 'params/embedding/kernel' in np.load(out).files


def test_missing_step_lists_the_steps_that_exist(trained):
  _, workdir = trained
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint_lib.restore_params(workdir, 999)
  _one_line_error(e, 'no checkpoint 999', 'holds steps 3.')
  with pytest.raises(errors.CheckpointError) as e:
    loading.load_run(workdir, 999)  # `evaluate --step 999`
  _one_line_error(e, 'no checkpoint 999', 'holds steps 3.')


def test_truncated_checkpoint_error_has_no_tensorstore_spec(trained):
  """A file truncated before its checksums were computed (damage checksums cannot see) still
  gives a short message when it is read."""
  _, workdir = trained
  step_dir = os.path.join(workdir, 'checkpoints', '3')
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, 'state')) for n in ns]
  for path in files:
    if os.path.getsize(path) > 1000:
      os.truncate(path, os.path.getsize(path) // 2)
  digests = checkpoint_lib._digests(epath.Path(step_dir))  # pylint: disable=protected-access
  with open(os.path.join(step_dir, checkpoint_lib.CHECKSUMS), 'w') as f:
    json.dump(digests, f)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint_lib.restore_params(workdir)
  _one_line_error(e, 'cannot be read')
  assert '{"' not in str(e.value) and len(str(e.value)) < 600


# Issue 32: damaged files, export paths and empty splits are one line and change nothing.

def test_a_damaged_or_missing_checksum_file_is_refused_like_a_damaged_checkpoint(tiny_mae_config,
                                                                                 tmp_path):
  """Not JSON, not a record, invalid UTF-8, a directory or deleted: checkpoint 6 cannot be
  verified, so it is never read (a deleted file once turned verification off silently); the
  message offers checkpoint 3, which verifies, as for a damaged checkpoint."""
  workdir = str(tmp_path)
  train.train(_set(tiny_mae_config, **{'total_steps': 6}), workdir)  # checkpoints 3 and 6
  sums = os.path.join(workdir, 'checkpoints', '6', checkpoint_lib.CHECKSUMS)
  good = open(sums, 'rb').read()
  damages = {'not JSON': lambda: open(sums, 'w').write('{"state/'),
             'a list': lambda: open(sums, 'w').write('[]'),
             'invalid UTF-8': lambda: open(sums, 'wb').write(b'\xff\xfe{}'),
             'a directory': lambda: (os.remove(sums), os.mkdir(sums)),
             'deleted': lambda: os.remove(sums)}
  for name, damage in damages.items():
    damage()
    with pytest.raises(errors.CheckpointError) as e:
      checkpoint_lib.restore_params(workdir)  # export / evaluate / init from the workdir
    _one_line_error(e, 'Checkpoint 6', checkpoint_lib.CHECKSUMS, 'cannot be verified',
                    'Checkpoint 3 verifies: move')
    if os.path.isdir(sums):
      os.rmdir(sums)
    open(sums, 'wb').write(good)
    checkpoint_lib.restore_params(workdir)  # the restored file verifies again: it was the cause
  os.remove(sums)
  config_json = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(errors.CheckpointError, match='checksums.json is missing'):
    train.train(_set(tiny_mae_config, **{'total_steps': 9,
                                         'resume.accept_changes': 'total_steps'}), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == config_json


def test_a_damaged_metrics_file_is_one_error_before_anything_is_rewritten(trained, capsys):
  """A last line without "step", invalid UTF-8, a directory: one error, and config.json /
  config_history.jsonl stay as they were (they were rewritten before the error). A deleted
  metrics.jsonl warns that the history is lost, and the run goes on."""
  config, workdir = trained
  _set(config, **{'total_steps': 6, 'resume.accept_changes': 'total_steps'})
  metrics = os.path.join(workdir, 'metrics.jsonl')
  good = open(metrics, 'rb').read()
  kept = {name: open(os.path.join(workdir, name)).read()
          for name in ('config.json', 'config_history.jsonl')}
  damages = {'no step': (lambda: open(metrics, 'ab').write(b'{"loss": 1.0}\n'), 'no integer'),
             'invalid UTF-8': (lambda: open(metrics, 'ab').write(b'\xff\n'), 'UnicodeDecodeError'),
             'a directory': (lambda: (os.remove(metrics), os.mkdir(metrics)), 'IsADirectoryError')}
  for damage, part in damages.values():
    damage()
    with pytest.raises(errors.CheckpointError) as e:
      train.train(config, workdir)
    _one_line_error(e, 'metrics.jsonl', part)
    assert {name: open(os.path.join(workdir, name)).read() for name in kept} == kept
    if os.path.isdir(metrics):
      os.rmdir(metrics)
    open(metrics, 'wb').write(good)
  os.remove(metrics)
  assert train.train(config, workdir)['step'] == 6
  assert 'metrics.jsonl is missing, so the metrics logged before step 3 are lost' in (
      capsys.readouterr().err)
  assert [json.loads(line)['step'] for line in open(metrics)] == [4, 5, 6]


@pytest.mark.parametrize('kind', ['parent is a file', 'read-only', 'hub onto a file'])
def test_export_paths_that_cannot_be_written_are_one_line_before_reading(tmp_path, monkeypatch,
                                                                         kind):
  """Checked before the workdir is read (it does not exist here), so nothing is written."""
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  out, fmt, part = str(blocker / 'enc.safetensors'), 'safetensors', 'is a file, not a directory'
  if kind == 'read-only':  # simulated: tests run as root, for whom chmod does not bite
    readonly = str(tmp_path / 'ro')
    os.mkdir(readonly)
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: p != readonly and real_access(p, mode))
    out, part = os.path.join(readonly, 'sub', 'enc.safetensors'), 'is not writable'
  elif kind == 'hub onto a file':
    out, fmt, part = str(blocker), 'hub', 'writes a folder'
  with pytest.raises(errors.ConfigError) as e:
    export.export_checkpoint(str(tmp_path / 'no-run'), out, fmt=fmt)
  _one_line_error(e, '--out', part)
  assert sorted(os.listdir(tmp_path)) == (['file', 'ro'] if kind == 'read-only' else ['file'])


@pytest.mark.parametrize('split,part', [('train[:0]', 'holds no examples'),
                                        ('train[:abc]', 'cannot be read')])
def test_an_empty_or_unparsable_split_is_one_line(tiny_mae_config, tmp_path, split, part):
  with pytest.raises(errors.DatasetError) as e:
    train.train(_set(tiny_mae_config, **{'data.train_split': split}), str(tmp_path / 'run'))
  _one_line_error(e, repr(split), part)
  assert not (tmp_path / 'run').exists()


def _offline_store(monkeypatch):
  """gs:// as on a machine without network: every request fails the way TensorFlow's GCS client
  fails offline (the error of issue 32), and every write or mkdir on a gs:// path is recorded."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpath = epath.gpath._GPath  # pylint: disable=protected-access

  def offline(self, *args, **kwargs):
    raise tf.errors.FailedPreconditionError(
        None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve "
        f"hostname', error details: Could not resolve host: www.googleapis.com\n\t when reading "
        f'metadata of {self}')

  writes = []
  monkeypatch.setattr(gpath, 'exists', offline)
  for name in ('mkdir', 'write_text', 'write_bytes', 'open'):
    monkeypatch.setattr(gpath, name, lambda self, *a, _name=name, **k: writes.append((_name, self)))
  return writes


def test_an_offline_gs_workdir_is_one_line_naming_the_cause_and_the_fix(tiny_mae_config, tmp_path,
                                                                        monkeypatch, capsys):
  """train (as its command line reports it), and evaluate / export (which read the workdir's
  config first): one `error:` line with the cause and the fix, no traceback, nothing written."""
  writes = _offline_store(monkeypatch)
  with pytest.raises(SystemExit) as e, errors.reported():
    train.train(tiny_mae_config, 'gs://mimjax-offline/run')
  assert e.value.code == 1
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: --workdir gs://mimjax-offline/run '
                                                 'cannot be reached'), err
  assert 'Could not resolve host' in lines[0] and 'gcloud auth' in lines[0]
  assert 'Traceback' not in err
  with pytest.raises(errors.CheckpointError) as e:
    export.export_checkpoint('gs://mimjax-offline/run', str(tmp_path / 'enc.npz'), fmt='npz')
  _one_line_error(e, 'cannot be reached', 'FailedPreconditionError', 'local --workdir')
  assert writes == [] and os.listdir(tmp_path) == []


def _full_disk_from_step_5(monkeypatch, workdir, target):
  """ENOSPC when the 5th record is appended to metrics.jsonl (its file object), or at every flush
  of the TensorBoard writer once metrics.jsonl holds 5 records (TensorFlow reports a C++ ENOSPC as
  ResourceExhaustedError ending in the system message): the log of step 5, checkpoint 3 complete."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mimjax import metrics_writer  # pylint: disable=g-import-not-at-top
  from mimjax import workdir_io  # pylint: disable=g-import-not-at-top
  metrics = os.path.join(workdir, 'metrics.jsonl')
  records = lambda: len(open(metrics).readlines()) if os.path.exists(metrics) else 0
  if target == 'metrics.jsonl':
    def full_open(file, mode='r', *args, **kwargs):
      f = open(file, mode, *args, **kwargs)
      if str(file) != metrics or mode != 'a':
        return f

      def write(text):
        if records() == 4:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f.write(text)
      return types.SimpleNamespace(write=write, flush=f.flush, close=f.close)
    monkeypatch.setattr(workdir_io, 'open', full_open, raising=False)
    return
  create = tf.summary.create_file_writer

  def full_writer(logdir, *args, **kwargs):
    writer = create(logdir, *args, **kwargs)
    flush = writer.flush

    def full_flush():
      if records() >= 5:
        raise tf.errors.ResourceExhaustedError(
            None, None, f'{logdir}/events.out.tfevents.1; {os.strerror(errno.ENOSPC)}')
      flush()
    writer.flush = full_flush
    return writer
  monkeypatch.setattr(metrics_writer.tf.summary, 'create_file_writer', full_writer)


@pytest.mark.parametrize('target', ['metrics.jsonl', 'tensorboard'])
def test_a_full_disk_while_logging_is_one_line_and_the_checkpoint_resumes(trained, monkeypatch,
                                                                          capsys, target):
  """A run extended from 3 to 6 steps meets a full disk while step 5's metrics are written: one
  `error:` line naming the file and "No space left on device", no traceback; checkpoint 3
  verifies, and once space is free the rerun resumes from it and logs every step once."""
  tiny_mae_config, workdir = trained  # 3 steps logged, checkpoint 3
  _set(tiny_mae_config, **{'total_steps': 6, 'resume.accept_changes': 'total_steps'})
  _full_disk_from_step_5(monkeypatch, workdir, target)
  with pytest.raises(SystemExit) as e, errors.reported():
    train.train(tiny_mae_config, workdir)
  assert e.value.code == 1
  err = capsys.readouterr().err
  shown = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(shown) == 1 and 'Traceback' not in err, err
  assert shown[0].startswith(f'error: Writing {os.path.join(workdir, target)} at step 5 failed '
                             '(No space left on device'), shown[0]
  assert _steps(workdir) == [3] and checkpoint_lib.restore(workdir)[1] == 3
  monkeypatch.undo()  # space freed
  assert train.train(tiny_mae_config, workdir)['step'] == 6
  assert 'Resuming from checkpoint 3' in capsys.readouterr().out
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4, 5, 6]


def _damages(target):
  """Ways `target` (a workdir's JSON or JSON-lines file) is found damaged: {name: damage}."""
  def directory():
    os.remove(target)
    os.mkdir(target)
  return {'not JSON': lambda: open(target, 'w').write('{"step": 3, "conf\n{}\n'),
          'a list': lambda: open(target, 'w').write('[1, 2]\n'),
          'invalid UTF-8': lambda: open(target, 'wb').write(b'\xff\xfe{}\n'),
          'a directory': directory}


def _restore(target, good):
  if os.path.isdir(target):
    os.rmdir(target)
  open(target, 'wb').write(good)


def test_a_damaged_config_history_or_eval_record_is_one_error_before_anything_is_rewritten(
    trained, capsys):
  """config_history.jsonl (read by every start) and eval_mae.json (read at each evaluation, so
  checked at start when evaluation is on): each damage is one error naming the file, and
  config.json, config_history.jsonl, metrics.jsonl and the eval record stay as they were (the
  history was rewritten before, the eval record crashed the run at its first evaluation). A torn
  last line of the history (a crash mid-write) is dropped with a warning and the run goes on."""
  config, workdir = trained
  _set(config, **{'total_steps': 6, 'resume.accept_changes': 'total_steps',
                  'eval.every_steps': 3})
  history, record = (os.path.join(workdir, name)
                     for name in ('config_history.jsonl', 'eval_mae.json'))
  open(record, 'w').write(json.dumps(dict(history=[dict(step=3, knn_top1=0.5)])))
  names = ('config.json', 'config_history.jsonl', 'metrics.jsonl', 'eval_mae.json')
  before = {name: open(os.path.join(workdir, name), 'rb').read() for name in names}
  for target in (history, record):
    for name, damage in _damages(target).items():
      damage()
      damaged = open(target, 'rb').read() if os.path.isfile(target) else None
      with pytest.raises(errors.CheckpointError) as e:
        train.train(config, workdir)
      _one_line_error(e, target, 'move it away' if target == record else 'to resume')
      assert (open(target, 'rb').read() if os.path.isfile(target) else None) == damaged, name
      _restore(target, before[os.path.basename(target)])
      assert {n: open(os.path.join(workdir, n), 'rb').read() for n in names} == before, name
  capsys.readouterr()
  open(history, 'ab').write(b'{"start_step": 3, "con')  # torn by a crash mid-write
  assert train.train(config, workdir)['step'] == 6
  assert f'dropped the torn last line of {history}' in capsys.readouterr().out
  entries = [json.loads(line) for line in open(history)]
  assert [e['start_step'] for e in entries] == [0, 3]
  assert [r['step'] for r in json.load(open(record))['history']] == [3, 6]


def test_a_damaged_evaluation_results_file_is_one_error_before_the_protocol_runs(trained,
                                                                                 monkeypatch):
  """eval_knn.json (evaluate's results) damaged: refused naming it before kNN runs, unchanged."""
  from mimjax import evaluate  # pylint: disable=g-import-not-at-top
  _, workdir = trained
  ran = []
  monkeypatch.setitem(evaluate.PROTOCOLS, 'knn', lambda run: ran.append(run) or {})
  target = os.path.join(workdir, 'eval_knn.json')
  for name, damage in _damages(target).items():
    if not os.path.exists(target):
      open(target, 'w').write('{}')
    damage()
    damaged = open(target, 'rb').read() if os.path.isfile(target) else None
    with pytest.raises(errors.CheckpointError) as e:
      evaluate.evaluate(workdir, 'knn')
    _one_line_error(e, target, 'is damaged', 'move it away')
    assert (open(target, 'rb').read() if os.path.isfile(target) else None) == damaged, name
    assert ran == [], name
    _restore(target, b'{"protocol": "knn", "results": []}')


def test_reason_takes_only_system_causes_from_the_chain():
  # A handled FileNotFoundError deep in the chain is not why the outer error happened.
  try:
    try:
      raise FileNotFoundError(errno.ENOENT, 'No such file or directory', 'optional.json')
    except FileNotFoundError:
      raise ValueError('bad value') from None
  except ValueError as e:
    outer = e
  outer.__context__ = FileNotFoundError(errno.ENOENT, 'No such file or directory')
  assert errors.reason(outer) == 'ValueError: bad value'
  # A system cause anywhere in the chain comes first.
  full = OSError(errno.ENOSPC, 'No space left on device')
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = full
  assert errors.reason(wrapped) == 'No space left on device; RuntimeError: save failed'
  # The exception's own strerror stays.
  assert errors.reason(FileNotFoundError(errno.ENOENT, 'No such file or directory')).startswith(
      'No such file or directory')
