"""The kNN evaluator (`mimjax.eval.knn.Knn`) as the online monitor and as the offline protocol: the
monitor logs the kNN top-1 of its held-out subset and the protocol that of the whole splits (both
against DINO's weighted kNN in float64 numpy on the checkpoint's features), it compiles once, the
in-loop evaluators a config declares (`eval.in_loop`) and the monitor's settings and data are
checked before anything is written, and (slow) the README's commands run it on two devices."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import BANK, K, QUERIES, ROOT, WATCHED, config_flags, load_config, metrics_records
from conftest import tiny_overrides
from mimjax import checkpoint
from mimjax import errors
from mimjax import evaluate
from mimjax import registry
from mimjax import sharding
from mimjax import train
from mimjax import validation
from mimjax.data import fit
from mimjax.eval import evaluator
from mimjax.eval import features as features_lib
from mimjax.eval import knn
from mimjax.eval import loading


def _reference_knn_top1(bank_x, bank_y, query_x, query_y, k, temperature, num_classes=10):
  """DINO's weighted kNN written out in float64 numpy: cosine similarity, the k most similar bank
  images vote exp(sim / T) for their class."""
  bank = bank_x / np.linalg.norm(bank_x, axis=1, keepdims=True)
  query = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
  sims = query.astype(np.float64) @ bank.astype(np.float64).T
  votes = np.zeros((len(query), num_classes))
  for i, row in enumerate(sims):
    nearest = np.argsort(-row)[:k]
    np.add.at(votes[i], bank_y[nearest], np.exp(row[nearest] / temperature))
  return float(np.mean(votes.argmax(axis=1) == query_y))


def _reference_for_checkpoint(workdir, step):
  """kNN top-1 of the checkpoint's encoder: the first BANK train and QUERIES test images."""
  run = loading.load_run(workdir, step)
  bank_x, bank_y = features_lib.extract(run, run.config.data.train_split, 'pooled')
  query_x, query_y = features_lib.extract(run, run.config.data.eval_split, 'pooled')
  return _reference_knn_top1(bank_x[:BANK], bank_y[:BANK], query_x[:QUERIES], query_y[:QUERIES],
                             K, run.config.eval.knn_temperature)


def test_knn_monitor_logs_the_knn_of_the_held_out_subset(watched):
  records = metrics_records(watched)
  assert [r['step'] for r in records if 'eval_knn_top1' in r] == [3, 6]
  logged = {r['step']: r['eval_knn_top1'] for r in records if 'eval_knn_top1' in r}
  # Float32 on device against float64 here: a near-tie may flip one query at most.
  assert logged[6] == pytest.approx(_reference_for_checkpoint(watched, 6), abs=1 / QUERIES + 1e-9)
  with open(os.path.join(watched, 'eval_mae.json')) as f:
    history = json.load(f)
  assert [r['step'] for r in history['history']] == [3, 6]
  assert history['final']['knn_top1'] == logged[6]
  assert history['best']['knn_top1'] == max(logged.values())


def test_knn_monitor_compiles_once_and_repeats_the_logged_values(watched):
  config = load_config('configs/mae.py:runlocal', **WATCHED)
  knn_monitor = knn.Knn.monitor(config, sharding.make_mesh(config.mesh))
  logged = {r['step']: r['eval_knn_top1'] for r in metrics_records(watched) if 'eval_knn_top1' in r}
  sizes = []
  for step in (3, 6):
    params, model_state = checkpoint.restore(watched, step)
    assert knn_monitor.run(params, model_state) == {'knn_top1': logged[step]}
    sizes.append({name: getattr(knn_monitor, name)._cache_size()
                  for name in ('_embed', '_bank', '_hits')})
  # The second evaluation compiles nothing (static shapes, fixed batch count). Counted as growth:
  # jit of the module-level `_bank` shares its cache with other Knn instances of this process.
  assert sizes[1] == sizes[0] and all(sizes[0].values()), sizes


def test_offline_knn_protocol_is_dinos_knn_over_the_whole_splits(watched):
  """`mimjax.evaluate --protocol knn` runs the monitor's evaluator on every image of both splits,
  for each k."""
  run = loading.load_run(watched, 6)
  bank_x, bank_y = features_lib.extract(run, run.config.data.train_split, 'pooled')
  query_x, query_y = features_lib.extract(run, run.config.data.eval_split, 'pooled')
  result = knn.protocol(run, k=[K, 20])
  assert (result['train_examples'], result['test_examples']) == (len(bank_y), len(query_y))
  for k in (K, 20):
    expected = _reference_knn_top1(bank_x, bank_y, query_x, query_y, k,
                                   run.config.eval.knn_temperature)
    # Float32 on device against float64 here: a near-tie may flip one query at most.
    assert result['top1_by_k'][str(k)] == pytest.approx(expected, abs=1 / len(query_y) + 1e-9)
  assert result['top1'] == result['top1_by_k'][str(K)]


@pytest.mark.parametrize('framework, in_loop, expected', [
    ('mae', (), ('knn_monitor',)), ('supervised', (), ('held_out',)),
    ('supervised', ('held_out', 'knn_monitor'), ('held_out', 'knn_monitor')),
    ('simmim', ('knn_monitor',), ('knn_monitor',))])
def test_in_loop_evaluators_are_the_configs_or_the_frameworks_own(framework, in_loop, expected):
  config = load_config(f'configs/{framework}.py:runlocal', **{
      'eval.every_steps': 3, 'eval.in_loop': in_loop})
  validation.validate(config)
  assert evaluator.in_loop(config, registry.FRAMEWORKS[framework]) == expected
  with config.unlocked():
    config.eval.every_steps = 0
  assert evaluator.in_loop(config, registry.FRAMEWORKS[framework]) == ()


def test_a_supervised_run_with_both_in_loop_evaluators_logs_and_records_both(tmp_path):
  """eval.in_loop=('held_out', 'knn_monitor'): one evaluation holds the held-out top-1 / top-5 and
  the monitor's kNN top-1 (DINO's kNN of the checkpoint's features), ranked by top-1."""
  workdir = str(tmp_path / 'run')
  config = load_config('configs/supervised.py:runlocal', **tiny_overrides(**{
      'total_steps': 3, 'eval.every_steps': 3, 'eval.in_loop': ('held_out', 'knn_monitor'),
      'eval.knn_monitor.bank_examples': BANK, 'eval.knn_monitor.query_examples': QUERIES,
      'eval.knn_monitor.k': K}))
  train.train(config, workdir)
  [logged] = [r for r in metrics_records(workdir) if 'eval_top1' in r]
  assert {'eval_top1', 'eval_top5', 'eval_knn_top1'} <= set(logged) and logged['step'] == 3
  assert logged['eval_knn_top1'] == pytest.approx(_reference_for_checkpoint(workdir, 3),
                                                  abs=1 / QUERIES + 1e-9)
  with open(os.path.join(workdir, 'eval_supervised.json')) as f:
    record = json.load(f)
  assert record['best'] == record['final'] == dict(
      step=3, **{k.removeprefix('eval_'): v for k, v in logged.items() if k.startswith('eval_')})


@pytest.mark.parametrize('in_loop, match', [
    (('bogus',), r"eval.in_loop=\('bogus',\): name each of \['held_out', 'knn_monitor'\]"),
    (('knn_monitor', 'knn_monitor'), r'eval.in_loop=.*at most once'),
    (('held_out',), r"framework 'mae' has no held-out metrics .* use \('knn_monitor',\)")])
def test_bad_in_loop_evaluators_are_refused_naming_the_fix(in_loop, match):
  config = load_config('configs/mae.py:runlocal', **{'eval.every_steps': 3,
                                                      'eval.in_loop': in_loop})
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(config)


def test_monitor_settings_and_data_are_checked_before_anything_is_written(tmp_path):
  config = load_config('configs/simmim.py:runlocal', **tiny_overrides(**{
      'eval.every_steps': 3, 'eval.knn_monitor.bank_examples': 4, 'eval.knn_monitor.k': 5}))
  with pytest.raises(errors.ConfigError, match='knn_monitor.k=5 .* bank_examples=4'):
    validation.validate(config)
  config = load_config('configs/mae.py:runlocal', **WATCHED)
  with config.unlocked():
    config.eval.knn_monitor.query_examples = 257  # 'test[:256]' holds 256: lowered, not refused
  assert fit.fit(config, knn_monitor=True) == ['eval.knn_monitor.query_examples 257 -> 256']
  folder = tmp_path / 'flat'
  folder.mkdir()
  for i in range(6):
    Image.fromarray(np.full((28, 28, 3), 40 * i, np.uint8)).save(folder / f'{i}.png')
  config = load_config('configs/mae.py:runlocal', **{
      **WATCHED, 'data.name': str(folder), 'data.train_split': 'train', 'data.eval_split': 'val',
      'data.folder_holdout': 0.5, 'eval.knn_monitor.bank_examples': 1,
      'eval.knn_monitor.query_examples': 1, 'eval.knn_monitor.k': 1})
  with pytest.raises(errors.DatasetError, match='no class labels.*eval.every_steps=0'):
    train.train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  with pytest.raises(errors.DatasetError, match='no class labels.*kNN evaluation needs them'):
    knn.Knn(config, sharding.make_mesh(config.mesh), (1,), 'pooled')  # the offline protocol's


@pytest.mark.slow  # a training and two evaluations as subprocesses on 2 simulated devices: ~2 min
def test_user_watches_mae_runlocal_on_two_devices(tmp_path):
  """The README's commands: train with the monitor on, then two kNN evaluations that both stay."""
  workdir = tmp_path / 'mae'
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  overrides = {k: v for k, v in WATCHED.items() if k != 'log.images_every_steps'}
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=tmp_path, env=env,  # noqa
                                     capture_output=True, text=True, timeout=900)
  trained = run('mimjax.train', '--config', 'mae:runlocal', *config_flags(overrides),
                f'--workdir={workdir}')
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'devices: 2 x cpu' in trained.stdout
  records = metrics_records(workdir)
  console = [line for line in trained.stdout.splitlines() if 'eval_knn_top1' in line]
  assert len(console) == 2 and f"eval_knn_top1 {records[-1]['eval_knn_top1']:.4f}" in console[1]
  assert records[-1]['eval_knn_top1'] == pytest.approx(_reference_for_checkpoint(str(workdir), 6),
                                                       abs=1 / QUERIES + 1e-9)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = {v.tag for path in glob.glob(str(workdir / 'tensorboard' / '*'))
          for event in tf.compat.v1.train.summary_iterator(path) for v in event.summary.value}
  assert 'eval_knn_top1' in tags
  for feature in ('gap', 'cls'):
    done = run('mimjax.evaluate', f'--workdir={workdir}', '--protocol=knn', f'--feature={feature}')
    assert done.returncode == 0, done.stderr[-3000:]
  entries = evaluate.read_results(str(workdir), 'knn')
  assert [(e['options'], e['step']) for e in entries] == [
      ({'feature': 'gap'}, 6), ({'feature': 'cls'}, 6)]
