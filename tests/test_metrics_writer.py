"""What `mimjax.metrics_writer` writes: a crash while the resume rewrites metrics.jsonl keeps the
history, a torn last line is dropped with a warning, a damaged line inside it is an error, a full
disk while logging (metrics.jsonl or TensorBoard) is one line and the checkpoint resumes; an
offline Weights & Biases run holds the logged metrics and pictures, and a missing wandb is refused
naming the extra to install."""
import errno
import glob
import importlib.util
import json
import os
import struct
import types

import pytest

from conftest import HAS_WANDB
from conftest import checkpoint_steps
from conftest import load_config
from conftest import metrics_records
from conftest import set_fields
from mimjax import checkpoint as checkpoint_lib
from mimjax import errors
from mimjax import metrics_writer
from mimjax import train
from mimjax import validation


def _write_lines(path, lines):
  with open(path, 'w') as f:
    f.write(''.join(lines))


def test_a_crash_between_truncate_and_rewrite_keeps_the_metrics_history(tmp_path, monkeypatch):
  """The resume rewrite dies after writing its temporary file: the history is untouched."""
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in range(1, 9)]
  _write_lines(path, lines)

  def crash(*args):
    raise KeyboardInterrupt('kill -9 stand-in')

  monkeypatch.setattr(os, 'replace', crash)
  with pytest.raises(KeyboardInterrupt):
    metrics_writer.MetricsWriter(str(tmp_path), 10, 4, progress_bar=False)
  monkeypatch.undo()
  assert path.read_text() == ''.join(lines)
  writer = metrics_writer.MetricsWriter(str(tmp_path), 10, 4, progress_bar=False)  # the rerun
  writer.close()
  assert [r['step'] for r in metrics_records(tmp_path)] == [1, 2, 3, 4]


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
  _write_lines(tmp_path / 'metrics.jsonl',
               ['{"step": 1, "loss": 2.0}\n', '{"step": 2, "loss": 1.5}\n', '{"step": 3, "lo'])
  writer = metrics_writer.MetricsWriter(str(tmp_path), 10, 3, progress_bar=False)
  writer.write(3, {'loss': 1.25})
  writer.close()
  assert metrics_records(tmp_path) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5},
                                       {'step': 3, 'loss': 1.25}]
  assert 'torn last line' in capsys.readouterr().out


def test_a_damaged_line_inside_the_history_is_an_error(tmp_path):
  _write_lines(tmp_path / 'metrics.jsonl', ['{"step": 1}\n', 'garbage\n', '{"step": 2}\n'])
  with pytest.raises(errors.CheckpointError, match='Line 2 of'):
    metrics_writer.MetricsWriter(str(tmp_path), 10, 2, progress_bar=False)


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
  set_fields(tiny_mae_config, **{'total_steps': 6, 'resume.accept_changes': 'total_steps'})
  _full_disk_from_step_5(monkeypatch, workdir, target)
  with pytest.raises(SystemExit) as e, errors.reported():
    train.train(tiny_mae_config, workdir)
  assert e.value.code == 1
  err = capsys.readouterr().err
  shown = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(shown) == 1 and 'Traceback' not in err, err
  assert shown[0].startswith(f'error: Writing {os.path.join(workdir, target)} at step 5 failed '
                             '(No space left on device'), shown[0]
  assert checkpoint_steps(workdir) == [3] and checkpoint_lib.restore(workdir)[1] == 3
  monkeypatch.undo()  # space freed
  assert train.train(tiny_mae_config, workdir)['step'] == 6
  assert 'Resuming from checkpoint 3' in capsys.readouterr().out
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4, 5, 6]


def _wandb_records(path):
  """The protobuf records of a W&B .wandb file: the ':W&B' header (7 bytes), then LevelDB log
  records (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
  blocks."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  pos, block, parts = 7, 32768, b''
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    length, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
    parts += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      parts = b''
      yield record


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install '.[wandb]')")
def test_wandb_offline_run_holds_the_logged_metrics_and_pictures(watched):
  (path,) = glob.glob(os.path.join(watched, 'wandb', 'offline-run-*', 'run-*.wandb'))
  history = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json)
              for item in r.history.item}
             for r in _wandb_records(path) if r.WhichOneof('record_type') == 'history']
  for logged, record in zip(history, metrics_records(watched), strict=True):
    assert logged['_step'] == record['step']
    for key, value in record.items():
      if key != 'step':
        assert logged[key] == pytest.approx(value, rel=1e-12)
  assert history[-1]['reconstruction_norm_pix/_type'] == 'image-file'
  config = load_config('configs/mae.py:runlocal', **{'log.wandb': True})
  assert validation.validate(config) is None  # installed: accepted


def test_wandb_missing_is_refused_with_the_extra_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'wandb' else real(name, *a))
  config = load_config('configs/mae.py:runlocal', **{'log.wandb': True})
  with pytest.raises(errors.ConfigError, match=r"pip install 'mimjax\[wandb\]'"):
    validation.validate(config)
