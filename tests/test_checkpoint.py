"""Checkpoints (`mimjax.checkpoint`): every finalised one has checksums, a damaged one (a
flipped byte, a damaged or missing checksums.json) is refused naming the newest one that verifies,
a failed save (ENOSPC injected into Orbax's background write; slow: a real full disk) stops the run
at once with one line, and a missing step or a truncated file is one short message."""
import errno
import json
import os
import shutil
import subprocess

import orbax.checkpoint as ocp
import pytest
from etils import epath

from conftest import checkpoint_steps
from conftest import config_flags
from conftest import damages
from conftest import one_line_error
from conftest import restore_file
from conftest import run_module
from conftest import set_fields
from conftest import tiny_overrides
from mimjax import checkpoint as checkpoint_lib
from mimjax import errors
from mimjax import train
from mimjax.eval import loading


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
  train.train(set_fields(tiny_mae_config, **{'total_steps': 6}), workdir)  # checkpoints 3 and 6
  _flip_a_byte_in_state(os.path.join(workdir, 'checkpoints', '6'))
  set_fields(tiny_mae_config, **{'total_steps': 9, 'resume.accept_changes': 'total_steps'})
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
  set_fields(tiny_mae_config, **{'total_steps': 30})
  with pytest.raises(errors.CheckpointError) as e:
    train.train(tiny_mae_config, workdir)
  message = str(e.value)
  assert 'Saving checkpoint 6' in message and 'No space left on device' in message
  assert 'last complete checkpoint is step 3' in message and '\n' not in message
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert max(steps) <= 8  # stopped within the async window, far from 30
  assert calls == [3, 6]
  assert checkpoint_steps(workdir) == [3]
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


def test_missing_step_lists_the_steps_that_exist(trained):
  _, workdir = trained
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint_lib.restore_params(workdir, 999)
  one_line_error(e, 'no checkpoint 999', 'holds steps 3.')
  with pytest.raises(errors.CheckpointError) as e:
    loading.load_run(workdir, 999)  # `evaluate --step 999`
  one_line_error(e, 'no checkpoint 999', 'holds steps 3.')


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
  one_line_error(e, 'cannot be read')
  assert '{"' not in str(e.value) and len(str(e.value)) < 600


def test_a_damaged_or_missing_checksum_file_is_refused_like_a_damaged_checkpoint(tiny_mae_config,
                                                                                 tmp_path):
  """Not JSON, not a record, invalid UTF-8, a directory or deleted: checkpoint 6 cannot be
  verified, so it is never read (a deleted file once turned verification off silently); the
  message offers checkpoint 3, which verifies, as for a damaged checkpoint."""
  workdir = str(tmp_path)
  train.train(set_fields(tiny_mae_config, **{'total_steps': 6}), workdir)  # checkpoints 3 and 6
  sums = os.path.join(workdir, 'checkpoints', '6', checkpoint_lib.CHECKSUMS)
  good = open(sums, 'rb').read()
  for damage in {**damages(sums), 'deleted': lambda: os.remove(sums)}.values():
    damage()
    with pytest.raises(errors.CheckpointError) as e:
      checkpoint_lib.restore_params(workdir)  # export / evaluate / init from the workdir
    one_line_error(e, 'Checkpoint 6', checkpoint_lib.CHECKSUMS, 'cannot be verified',
                   'Checkpoint 3 verifies: move')
    restore_file(sums, good)
    checkpoint_lib.restore_params(workdir)  # the restored file verifies again: it was the cause
  os.remove(sums)
  config_json = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(errors.CheckpointError, match='checksums.json is missing'):
    train.train(set_fields(tiny_mae_config, **{'total_steps': 9,
                                               'resume.accept_changes': 'total_steps'}), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == config_json
