"""Resuming a run (`mimjax.resume` and the read phase of `train`): a change to the trajectory is
refused with the diff and the flag that accepts it, an accepted one is recorded in
config_history.jsonl, observation-only changes pass, and a damaged metrics.jsonl,
config_history.jsonl or evaluation record is one error before anything is rewritten."""
import copy
import json
import os

import pytest

from conftest import TINY_DECODER
from conftest import checkpoint_steps
from conftest import damages
from conftest import load_config
from conftest import one_line_error
from conftest import restore_file
from conftest import set_fields
from conftest import tiny_overrides
from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import errors
from mimjax import resume
from mimjax import train


@pytest.mark.parametrize('key,value', [
    ('batch_size', 32), ('optim.base_lr', 1e-3), ('seed', 1), ('mae.mask_ratio', 0.5),
    ('warmup_steps', 1), ('data.train_split', 'train[:256]')])
def test_trajectory_changing_resume_is_refused_with_the_diff(tiny_mae_config, key, value):
  """resume.check's decision on the checkpoint's stored config, without training."""
  set_fields(tiny_mae_config, total_steps=3)  # the run that wrote the checkpoint
  meta = {'step': 3, 'config': json.loads(config_lib.to_json(tiny_mae_config))}
  config = set_fields(copy.deepcopy(tiny_mae_config), **{key: value, 'total_steps': 6})
  with pytest.raises(errors.ConfigError) as e:
    resume.check(config, meta, '/runs/x/checkpoints')
  message = str(e.value)
  accept = message.split('--config.resume.accept_changes=')[1].split(';')[0]
  assert f'{key}: ' in message and set(accept.split(',')) == {key, 'total_steps'}
  assert 'stretches the warmup + cosine schedule' in message  # total_steps changed too
  set_fields(config, **{'resume.accept_changes': f'total_steps, {key}'})
  resume.check(config, meta, '/runs/x/checkpoints')  # named, the same change is accepted


def test_refused_resume_of_a_real_run_changes_nothing(trained):
  config, workdir = trained
  config = set_fields(config, **{'batch_size': 32, 'total_steps': 6})
  config_before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(errors.ConfigError, match='batch_size: 16 -> 32'):
    train.train(config, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == config_before
  assert checkpoint_steps(workdir) == [3]


def test_total_steps_below_the_checkpoint_is_an_error(tiny_mae_config):
  meta = {'step': 3, 'config': json.loads(config_lib.to_json(tiny_mae_config))}
  with pytest.raises(errors.ConfigError, match=r'total_steps=2 is below .* checkpoint \(3\)'):
    resume.check(set_fields(tiny_mae_config, **{'total_steps': 2}), meta, '/runs/x/checkpoints')


def test_accepted_change_resumes_keeps_history_and_counts_examples(trained):
  config, workdir = trained
  changed = set_fields(copy.deepcopy(config), **{
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
  changed = set_fields(copy.deepcopy(config), **{'log.every_steps': 2, 'checkpoint.every_steps': 6,
                                                 'eval.batch_size': 32})
  train.train(changed, workdir)  # total_steps unchanged: nothing to do, no error
  assert checkpoint_steps(workdir) == [3]


def test_a_damaged_metrics_file_is_one_error_before_anything_is_rewritten(trained, capsys):
  """A last line without "step", invalid UTF-8, a directory: one error, and config.json /
  config_history.jsonl stay as they were (they were rewritten before the error). A deleted
  metrics.jsonl warns that the history is lost, and the run goes on."""
  config, workdir = trained
  set_fields(config, **{'total_steps': 6, 'resume.accept_changes': 'total_steps'})
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
    one_line_error(e, 'metrics.jsonl', part)
    assert {name: open(os.path.join(workdir, name)).read() for name in kept} == kept
    if os.path.isdir(metrics):
      os.rmdir(metrics)
    open(metrics, 'wb').write(good)
  os.remove(metrics)
  assert train.train(config, workdir)['step'] == 6
  assert 'metrics.jsonl is missing, so the metrics logged before step 3 are lost' in (
      capsys.readouterr().err)
  assert [json.loads(line)['step'] for line in open(metrics)] == [4, 5, 6]


def test_a_damaged_config_history_or_eval_record_is_one_error_before_anything_is_rewritten(
    trained, capsys):
  """config_history.jsonl (read by every start) and eval_mae.json (read at each evaluation, so
  checked at start when evaluation is on): each damage is one error naming the file, and
  config.json, config_history.jsonl, metrics.jsonl and the eval record stay as they were (the
  history was rewritten before, the eval record crashed the run at its first evaluation). A torn
  last line of the history (a crash mid-write) is dropped with a warning and the run goes on."""
  config, workdir = trained
  set_fields(config, **{'total_steps': 6, 'resume.accept_changes': 'total_steps',
                        'eval.every_steps': 3})
  history, record = (os.path.join(workdir, name)
                     for name in ('config_history.jsonl', 'eval_mae.json'))
  open(record, 'w').write(json.dumps(dict(history=[dict(step=3, knn_top1=0.5)])))
  names = ('config.json', 'config_history.jsonl', 'metrics.jsonl', 'eval_mae.json')
  before = {name: open(os.path.join(workdir, name), 'rb').read() for name in names}
  for target in (history, record):
    for name, damage in damages(target).items():
      damage()
      damaged = open(target, 'rb').read() if os.path.isfile(target) else None
      with pytest.raises(errors.CheckpointError) as e:
        train.train(config, workdir)
      one_line_error(e, target, 'move it away' if target == record else 'to resume')
      assert (open(target, 'rb').read() if os.path.isfile(target) else None) == damaged, name
      restore_file(target, before[os.path.basename(target)])
      assert {n: open(os.path.join(workdir, n), 'rb').read() for n in names} == before, name
  capsys.readouterr()
  open(history, 'ab').write(b'{"start_step": 3, "con')  # torn by a crash mid-write
  assert train.train(config, workdir)['step'] == 6
  assert f'dropped the torn last line of {history}' in capsys.readouterr().out
  entries = [json.loads(line) for line in open(history)]
  assert [e['start_step'] for e in entries] == [0, 3]
  assert [r['step'] for r in json.load(open(record))['history']] == [3, 6]


def test_a_workdir_from_before_eval_in_loop_resumes_with_its_own_evaluators(tmp_path, monkeypatch):
  """A workdir whose checkpoint, config.json and config_history.jsonl have no `eval.in_loop` (as
  mimjax wrote them before the field existed) resumes without a "config changed" refusal, and its
  evaluation is the framework's own (the kNN monitor for MAE)."""
  config = load_config('configs/mae.py:runlocal', **tiny_overrides(**TINY_DECODER, total_steps=3))
  workdir = str(tmp_path / 'run')

  def without_in_loop(saved):
    del saved['eval']['in_loop']
    return saved
  to_json, meta = config_lib.to_json, train._meta  # pylint: disable=protected-access
  with monkeypatch.context() as m:
    m.setattr(config_lib, 'to_json', lambda c: json.dumps(
        without_in_loop(json.loads(to_json(c))), indent=2, sort_keys=True))
    m.setattr(train, '_meta', lambda c, *a: dict(meta(c, *a), config=without_in_loop(
        c.to_dict())))
    train.train(config, workdir)
  saved = [json.load(open(os.path.join(workdir, 'config.json')))['eval'],
           *(json.loads(line)['config']['eval']
             for line in open(os.path.join(workdir, 'config_history.jsonl')))]
  ckpt = checkpoint_lib.Checkpointer(workdir)
  saved.append(ckpt.read_meta(3)['config']['eval'])
  ckpt.close()
  assert all('in_loop' not in s and 'knn_monitor' in s for s in saved)
  set_fields(config, **{'total_steps': 6, 'resume.accept_changes': 'total_steps',
                        'eval.every_steps': 3, 'eval.knn_monitor.bank_examples': 64,
                        'eval.knn_monitor.query_examples': 64})
  assert 'eval_knn_top1' in train.train(config, workdir)
  assert [r['step'] for r in json.load(open(os.path.join(workdir, 'eval_mae.json')))['history']
          ] == [6]
