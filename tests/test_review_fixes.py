"""Quick tests of review findings: each fails without its fix."""
import errno

from mimjax import errors


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


def test_finetune_workdir_names_the_steps_and_another_recipe():
  # Another length or recipe gets its own folder, so a resume never meets a changed config.
  from mimjax import finetune  # pylint: disable=g-import-not-at-top
  from mimjax.reproduce import study as reproduce  # pylint: disable=g-import-not-at-top
  from mimjax.eval import loading  # pylint: disable=g-import-not-at-top
  pre = reproduce.build_config('mae', reproduce.row_overrides('mae', 0, reproduce.BUDGETS['cpu']))
  run = loading.Run(pre, None, 1500, '/w', False)
  own = finetune.recipe_for(pre)
  assert finetune.workdir_name(run) == 'finetune'
  assert finetune.workdir_name(run, total_steps=100) == 'finetune_steps100'
  assert finetune.workdir_name(run, total_steps=600) == 'finetune_steps600'
  assert finetune.workdir_name(run, 0.01, 600) == 'finetune_labels0.01_step1500_steps600'
  assert finetune.workdir_name(run, finetune_config=f'model=Ti/4,recipe={own}') == 'finetune'
  assert finetune.workdir_name(run, None, None, 'recipe=simmim') == 'finetune_recipesimmim'


def test_each_host_takes_a_disjoint_part_of_the_label_subset():
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  labels = np.repeat(np.arange(10), 50)
  subset = pipeline.stratified_indices(labels, 0.1, seed=0)
  parts = [pipeline.host_part(subset, 0.1, i, 3) for i in range(3)]
  assert all(len(p) for p in parts)
  joined = np.concatenate(parts)
  assert len(set(joined.tolist())) == len(joined)  # disjoint
  assert sorted(joined.tolist()) == subset.tolist()  # together the subset
  with pytest.raises(errors.DatasetError, match='selects 2 images, fewer than the 3 processes'):
    pipeline.host_part(subset[:2], 0.004, 2, 3)


def test_label_subset_refuses_a_large_tfds_split_and_imbalance_is_explained(monkeypatch):
  import types  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  splits = {'train': types.SimpleNamespace(num_bytes=3 << 30)}
  builder = types.SimpleNamespace(info=types.SimpleNamespace(splits=splits))
  monkeypatch.setattr(pipeline.sources, 'get_builder', lambda *a: builder)
  with pytest.raises(errors.DatasetError, match='3.0 GiB.*label subset is for small datasets'):
    pipeline._tfds_records.__wrapped__('big', None, False, 'train')  # pylint: disable=protected-access
  with pytest.raises(errors.DatasetError, match='1.0 works only on balanced data'):
    pipeline.stratified_indices(np.array([0, 0, 0, 1]), 1.0, seed=0)


def test_a_cached_study_part_of_another_budget_is_refused(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax.reproduce import study  # pylint: disable=g-import-not-at-top
  budget = study.BUDGETS['smoke']
  key = study.budget_key(budget)
  assert study.cached(str(tmp_path), 'linear', lambda: dict(top1=0.5), key)['top1'] == 0.5
  assert study.cached(str(tmp_path), 'linear', lambda: dict(top1=0.1), key)['top1'] == 0.5
  others = [dataclasses.replace(budget, overrides={**budget.overrides, 'batch_size': 8}),
            dataclasses.replace(budget, finetune_steps=budget.finetune_steps + 1),
            dataclasses.replace(budget, label_fractions=(0.5,))]
  other_keys = [study.budget_key(b) for b in others] + [study.budget_key(budget, '/clip.npz')]
  assert len({key, *other_keys}) == 5
  for other in other_keys:
    with pytest.raises(errors.ConfigError, match=r'repro_linear.json .*own --workdir_root'):
      study.cached(str(tmp_path), 'linear', lambda: dict(top1=0.1), other)


def test_only_the_final_checkpoints_finetunes_count_as_compute(tmp_path):
  from mimjax.reproduce import study  # pylint: disable=g-import-not-at-top
  parts = {'pretrain': dict(seconds=1, images=32),
           'finetune_labels0.01_step1': dict(seconds=1, images=100),  # MAE's curve
           'finetune_labels0.01_step2': dict(seconds=1, images=10),
           'finetune_labels0.1_step2': dict(seconds=1, images=1)}
  record = study._finish(dict(steps=2, notes={}), parts, str(tmp_path / 'r.json'))  # pylint: disable=protected-access
  assert record['finetune_images'] == 11
  floor = {'finetune_random_init_labels0.01': dict(seconds=1, images=7)}
  assert study._finish(dict(notes={}), floor, str(tmp_path / 'f.json'))['finetune_images'] == 7  # pylint: disable=protected-access


def test_a_refused_study_budget_is_one_error_line():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, '-m', 'mimjax.reproduce', '--pretrain_steps', '1000'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error: steps 1000 must be a multiple')
  assert 'Traceback' not in proc.stderr


def test_the_start_up_signal_handler_ends_where_training_takes_over(monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mimjax import train  # pylint: disable=g-import-not-at-top
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for hosts in (1, 2):
      monkeypatch.setattr(jax, 'process_count', lambda h=hosts: h)
      for signum in saved:
        signal.signal(signum, train._stop_during_start_up)  # pylint: disable=protected-access
      with train._StopRequest():  # pylint: disable=protected-access
        pass
      assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
      if hosts == 1:  # several hosts leave SIGTERM to JAX's preemption service
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  finally:
    for signum, handler in saved.items():
      signal.signal(signum, handler)


def _folder(path):
  """{name: text} of a folder's files."""
  import os  # pylint: disable=g-import-not-at-top
  return {n: open(os.path.join(path, n)).read() for n in sorted(os.listdir(path))}


def test_a_hub_export_over_an_earlier_one_is_swapped_whole(tmp_path, monkeypatch):
  import os  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'hub'
  out.mkdir()
  earlier = {'config.json': 'old', 'model.safetensors': 'old', 'notes.txt': 'mine'}
  for name, text in earlier.items():
    (out / name).write_text(text)

  def export_new(staging):
    for name in ('config.json', 'model.safetensors'):
      with open(os.path.join(staging, name), 'w') as f:
        f.write('new')

  real_rename, real_replace = os.rename, os.replace
  calls = []

  def failing_rename(src, dst):
    calls.append(src)
    if len(calls) == 3:  # staging -> out, after out -> .old
      raise OSError(28, 'No space left on device')
    return real_rename(src, dst)

  monkeypatch.setattr(os, 'rename', failing_rename)
  with pytest.raises(OSError):
    with export.staged_folder(str(out), ('config.json', 'model.safetensors')) as staging:
      export_new(staging)
  assert _folder(out) == earlier and os.listdir(tmp_path) == ['hub']  # the earlier one intact
  monkeypatch.setattr(os, 'rename', real_rename)
  monkeypatch.setattr(os, 'replace', lambda *a: (_ for _ in ()).throw(OSError(5, 'I/O error')))
  with pytest.raises(OSError, match='not moved back are in'):
    with export.staged_folder(str(out), ('config.json', 'model.safetensors')) as staging:
      export_new(staging)
  assert _folder(out) == {'config.json': 'new', 'model.safetensors': 'new'}  # the new one whole
  old = [n for n in os.listdir(tmp_path) if n.endswith('.old')]
  assert len(old) == 1 and _folder(tmp_path / old[0])['notes.txt'] == 'mine'
  monkeypatch.setattr(os, 'replace', real_replace)
  (tmp_path / old[0] / 'notes.txt').rename(out / 'notes.txt')
  with export.staged_folder(str(out), ('config.json', 'model.safetensors')) as staging:
    for name in ('config.json', 'model.safetensors'):
      (tmp_path / os.path.basename(staging) / name).write_text('newer')
  assert _folder(out) == {'config.json': 'newer', 'model.safetensors': 'newer', 'notes.txt': 'mine'}
  assert sorted(os.listdir(tmp_path)) == sorted(['hub', old[0]])
