"""The reproduction study: aggregation against hand values, and the command end to end."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from conftest import run_module
from mimjax import errors
from mimjax.reproduce import report
from mimjax.reproduce import study as reproduce


def test_mean_spread_is_mean_and_sample_std():
  # values 0.70, 0.74, 0.78: mean 0.74, deviations -0.04, 0, 0.04 -> var (2 * 0.0016) / 2 = 0.0016.
  mean, spread, n = report.mean_spread([0.70, None, 0.74, 0.78])
  assert (n, mean) == (3, pytest.approx(0.74))
  assert spread == pytest.approx(0.04)
  assert report.mean_spread([0.5]) == (0.5, None, 1)
  assert report.mean_spread([None]) == (None, None, 0)


def test_paired_delta_matches_seeds():
  # Seed-wise differences 0.02 and 0.06 (seed 2 has no baseline): mean 0.04, std |0.04| / sqrt 2.
  base = {0: 0.50, 1: 0.60}
  method = {0: 0.52, 1: 0.66, 2: 0.99}
  mean, spread, n = report.paired_delta(base, method)
  assert (n, mean) == (2, pytest.approx(0.04))
  assert spread == pytest.approx(0.04 / math.sqrt(2))


def _curves(seed, base, method):
  return [dict(seed=seed, curve=base)], [dict(seed=seed, curve=method)]


def test_pair_rauc_of_linear_curves_by_hand():
  # S1 rises 0.2 -> 0.4 over [0, 10]: area above S1(E1) = 10 * 0.2 / 2 = 1. S2 rises 0.3 -> 0.5:
  # area above 0.2 = 10 * (0.1 + 0.3) / 2 = 2, so RAUC = 2.
  assert report.pair_rauc(*_curves(0, [[0, .2], [10, .4]], [[0, .3], [10, .5]]))[0] == \
      pytest.approx(2.0)
  # Three points, S1 = S2: 1. Seeds 0 and 1 give 2 and 1: 1.5 ± 1 / sqrt 2.
  b0, m0 = _curves(0, [[0, .2], [10, .4]], [[0, .3], [10, .5]])
  b1, m1 = _curves(1, [[1, .1], [2, .3], [4, .4]], [[1, .1], [2, .3], [4, .4]])
  mean, spread, n = report.pair_rauc(b0 + b1, m0 + m1)
  assert (n, mean, spread) == (2, pytest.approx(1.5), pytest.approx(0.5 ** 0.5))
  # Undefined: a flat baseline, a one-point curve, a missing value.
  assert report.pair_rauc(*_curves(0, [[1, .3], [2, .3]], [[1, .3], [2, .5]]))[2] == 0
  assert report.pair_rauc(*_curves(0, [[5, .3]], [[5, .4]]))[2] == 0
  assert report.pair_rauc(*_curves(0, [[1, .3], [2, None]], [[1, .3], [2, .5]]))[2] == 0


def test_rauc_is_undefined_below_a_one_point_baseline_rise():
  # Baseline 0.60 -> 0.61 -> 0.60 over steps 0, 10, 20: area above 0.60 = 20 * 0.01 / 2 = 0.1,
  # mean rise 0.1 / 20 = 0.005 < 0.01, so the method's RAUC is not reported.
  assert report.baseline_rise([0, 10, 20], [.60, .61, .60]) == pytest.approx(0.005)
  method = [[0, .6], [10, .9], [20, .9]]
  assert report.pair_rauc(*_curves(0, [[0, .60], [10, .61], [20, .60]], method))[2] == 0
  # Baseline rises linearly 0.60 -> 0.64: area 20 * 0.04 / 2 = 0.4; the method's area above 0.60 is
  # 10 * 0.3 / 2 + 10 * 0.3 = 4.5, so RAUC = 11.25.
  assert report.pair_rauc(*_curves(0, [[0, .60], [20, .64]], method))[0] == pytest.approx(11.25)


def test_regenerating_a_report_keeps_its_hand_written_discussion(tmp_path):
  out = tmp_path / 'R.md'
  assert report.discussion(str(out)).count('<!--') == 2  # a new report: empty markers
  out.write_text(f'# old numbers\n{report.discussion(str(out)).replace(report.DISCUSSION_END, "")}'
                 f'LUT loses because of X.\n{report.DISCUSSION_END}\nold table\n')
  kept = report.discussion(str(out))
  assert 'LUT loses because of X.' in kept and 'old' not in kept


def test_summarise_keeps_numbers_and_pictures():
  result = dict(protocol='heterogeneity', step=30, images=256, plot='/w/eval_heterogeneity.png',
                heterogeneity={'decoder': [0.5, 0.25]}, aad=[[1, 2], [3, 4]], feature='gap',
                pictures={'a': '/w/a.png'})
  assert reproduce.summarise(result) == dict(
      numbers={'images': 256.0, 'heterogeneity.decoder': [0.5, 0.25], 'aad': [[1.0, 2.0],
                                                                              [3.0, 4.0]]},
      figures=['/w/a.png', '/w/eval_heterogeneity.png'])


def test_verdict_reads_the_sign_on_every_seed():
  assert report.verdict([0.03, 0.001]) == (
      'above the baseline on every seed (Δ per seed +3.0, +0.1 pp)')
  assert report.verdict([-0.03, -0.02]).startswith('below the baseline on every seed')
  assert report.verdict([0.05, -0.001]) == ('no consistent direction over seeds '
                                            '(Δ per seed +5.0, -0.1 pp)')
  assert report.verdict([0.0, 0.02]).startswith('no consistent direction')
  assert 'one seed only' in report.verdict([0.02])
  assert report.verdict([]) == 'not measured'


def test_seed_deltas_follow_seed_order():
  assert report.seed_deltas({0: .5, 1: .6, 2: None}, {1: .7, 0: .4, 2: .9}) == \
      [pytest.approx(-.1), pytest.approx(.1)]


def test_rauc_starts_at_the_random_init_floor():
  # Floor 0.1 at step 0; S1 0.2 -> 0.4 and S2 0.3 -> 0.5 at steps 1, 3. Area of S1 above 0.1:
  # [0, 1] 0.1 / 2 = 0.05, [1, 3] (0.1 + 0.3) = 0.4 -> 0.45; of S2: 0.2 / 2 + (0.2 + 0.4) = 0.7.
  # RAUC 0.7 / 0.45 = 1.556 (without the floor it is 2, as in test_pair_rauc_of_linear_curves).
  base, method = _curves(0, [[1, .2], [3, .4]], [[1, .3], [3, .5]])
  floor = [dict(seed=0, knn=.1)]
  assert report.pair_rauc(base, method, floor)[0] == pytest.approx(0.7 / 0.45)
  assert report.pair_rauc(base, method, [dict(seed=1, knn=.1)])[0] == pytest.approx(2.0)
  assert report.with_start([[0, .3], [5, .4]], .1) == [[0, .3], [5, .4]]
  assert report.with_start([[5, .4]], None) == [[5, .4]]


def test_fmt_percent_and_single_seed():
  assert report.fmt(0.7412, 0.0123, 2) == '74.1 ± 1.2'
  assert report.fmt(0.5, None, 1) == '50.0 (n=1)'
  assert report.fmt(None, None, 0) == 'n/a'


def test_main_metric_is_the_first_all_runs_have():
  base = [dict(knn=0.4, linear=None)]
  method = [dict(knn=0.5, linear=0.6)]
  assert report.main_metric(base, method) == 'knn'  # the probe is missing for the baseline
  assert report.main_metric([dict(test_top1=0.8)], [dict(test_top1=0.9)]) == 'test_top1'


def _record(row, seed, linear, curve, label):
  return dict(row=row, label=label, seed=seed, framework='mae', final_loss=0.5, knn=curve[-1][1],
              linear=linear, curve=curve, images_per_sec=100.0 + seed, notes={})


def test_table_and_findings_on_hand_made_records():
  # Linear top-1, baseline 0.70 / 0.72, method 0.75 / 0.76: paired deltas 5 and 4 pp, so
  # Δ = 4.5 ± 0.7 pp (std of (5, 4) = 1 / sqrt 2); baseline mean 71.0 ± 1.4, method 75.5 ± 0.7.
  # kNN curves at steps 1, 3: baseline 0.2 -> 0.4 (kNN 40.0), method 0.3 -> 0.5 on both seeds:
  # RAUC 2 (worked out in test_pair_rauc_of_linear_curves_by_hand) without the floors.
  records = {
      'mae': [_record('mae', s, v, [[1, 0.2], [3, 0.4]], 'MAE') for s, v in ((0, .70), (1, .72))],
      'mae_lut': [_record('mae_lut', s, v, [[1, 0.3], [3, 0.5]], 'MAE + LUT')
                  for s, v in ((0, .75), (1, .76))],
  }
  # The baseline's random-init encoder: kNN 0.10 / 0.12 (11.0 ± 1.4), linear 0.60 / 0.64
  # (62.0 ± 2.8); the baseline over it: kNN 0.4 - (0.10, 0.12) = 30, 28 pp -> 29.0 ± 1.4, linear
  # (0.70 - 0.60, 0.72 - 0.64) = 10, 8 pp -> 9.0 ± 1.4. With the floors starting the curves at
  # step 0, RAUC is 0.7 / 0.45 = 1.556 on seed 0 (test_rauc_starts_at_the_random_init_floor) and
  # on seed 1 (floor 0.12) (0.18 / 2 + 0.56) / (0.08 / 2 + 0.36) = 0.65 / 0.40 = 1.625:
  # 1.59 ± 0.05.
  floors = {'mae': [dict(row='mae', label='random init', seed=s, knn=k, linear=v, notes={})
                    for s, k, v in ((0, .10, .60), (1, .12, .64))]}
  # Throughput 100 and 101 images/s at batch 128: steps of 1280 and 1267.3 ms, 1274 ± 9.
  rows = _table_rows(report.table(records, [('mae_lut', 'mae')], floors, batch_size=128))
  assert rows[2] == ['mae_lut', 'MAE', '2', '0.5000 ± 0.0000', '40.0 ± 0.0', '71.0 ± 1.4', '—',
                     '—', '—', '100 ± 1', '1274 ± 9']
  assert rows[3] == ['mae_lut', '(random init)', '2', '—', '11.0 ± 1.4', '62.0 ± 2.8', '—', '—',
                     '—', '—', '—']
  assert rows[4][5:9] == ['75.5 ± 0.7', '—', '4.5 ± 0.7 (linear-probe top-1)', '1.59 ± 0.05']
  assert _table_rows(report.table(records, [('mae_lut', 'mae')]))[3][8] == '2.00 ± 0.00'
  text = report.findings(records, [('mae_lut', 'mae')], floors)
  assert ('paired Δ 4.5 ± 0.7 pp over 2 seed(s): above the baseline on every seed '
          '(Δ per seed +5.0, +4.0 pp); RAUC 1.59') in text
  assert ('the baseline over its randomly initialised encoder: kNN top-1 Δ 29.0 ± 1.4 pp, '
          'linear-probe top-1 Δ 9.0 ± 1.4 pp') in text
  without_floors = report.findings(records, [('mae_lut', 'mae')])
  assert 'randomly initialised' not in without_floors and 'RAUC 2.00' in without_floors


def test_budgets_end_curves_at_the_last_step_and_commands_quote_splits():
  for budget in reproduce.BUDGETS.values():
    assert budget.steps % budget.curve_points == 0
  with pytest.raises(ValueError, match='multiple of curve_points'):
    reproduce.Budget(10, 1, 3, {})
  command = reproduce.train_command('mae', '/w', {'data.train_split': 'train[:5]', 'seed': 1})
  assert command == ("python -m mimjax.train --config configs/mae.py:runlocal --workdir /w "
                     "'--config.data.train_split=train[:5]' --config.seed=1")


def test_runs_of_a_pair_differ_only_by_method():
  budget = reproduce.BUDGETS['cpu']
  base = reproduce.build_config('mae', reproduce.row_overrides('mae', 1, budget))
  lut = reproduce.build_config('mae_lut', reproduce.row_overrides('mae_lut', 1, budget))
  for key in ('seed', 'total_steps', 'batch_size', 'model.variant', 'data.train_split',
              'data.eval_split', 'optim.base_lr', 'mae.mask_ratio', 'mae.decoder_width'):
    a, b = base, lut
    for part in key.split('.'):
      a, b = a[part], b[part]
    assert a == b, key
  assert (base.seed, base.total_steps, lut.lut.enabled) == (1, budget.steps, True)
  teacher = '/runs/supervised/seed1'
  distill = reproduce.build_config('distill_dtm', reproduce.row_overrides(
      'distill_dtm', 1, budget, teacher))
  assert (distill.distill.teacher, distill.distill.teacher_workdir) == ('checkpoint', teacher)
  sup = reproduce.build_config('supervised', reproduce.row_overrides('supervised', 0, budget))
  assert sup.eval.every_steps == budget.steps // budget.curve_points
  # simmim.py defaults to SimMIM's multi-step schedule, simmim_mto.py to MTO's cosine: the study
  # pair must share one.
  simmim, simmim_mto = (reproduce.build_config(r, reproduce.row_overrides(r, 1, budget))
                        for r in ('simmim', 'simmim_mto'))
  assert simmim.optim.schedule == simmim_mto.optim.schedule == 'cosine'


def test_plan_adds_baselines_and_the_teacher():
  assert reproduce.plan(['mae_lut'], None) == ['mae', 'mae_lut']
  assert reproduce.plan(['distill_dtm'], None) == ['supervised', 'distill', 'distill_dtm']
  assert reproduce.plan(['distill_dtm'], '/clip.pt') == ['distill', 'distill_dtm']


def test_launcher_is_shellcheck_clean():
  result = subprocess.run(['shellcheck', '--severity=style', 'launch/reproduce_small.sh'],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_launcher_dry_run_prints_the_study_command():
  result = subprocess.run(['bash', 'launch/reproduce_small.sh', '--quick', '--dry-run', '--rows',
                           'mae_lut'], cwd=ROOT, capture_output=True, text=True, check=True)
  assert result.stdout.split() == [
      'python3', '-m', 'mimjax.reproduce', '--workdir_root', 'workdirs/repro', '--quick',
      '--rows', 'mae_lut']


def _table_rows(text):
  lines = [l for l in text.splitlines() if l.startswith('|')]
  return [[c.strip() for c in l.strip('|').split('|')] for l in lines]


def _tables(text):
  """Every markdown table of a report, each as its rows of cells (header and rule included)."""
  tables, current = [], []
  for line in text.splitlines() + ['']:
    if line.startswith('|'):
      current.append([c.strip() for c in line.strip('|').split('|')])
    elif current:
      tables.append(current)
      current = []
  return tables


def _parts(root):
  """{path: mtime} of every cached part and record of a study's runs."""
  return {str(p): p.stat().st_mtime_ns for p in root.rglob('repro*.json')}


@pytest.mark.slow  # trains, evaluates and fine-tunes the MAE / MAE + MTO pair and its floors
def test_smoke_study_end_to_end_writes_the_table(tmp_path):
  out = tmp_path / 'RESULTS.md'
  root = tmp_path / 'runs'
  records = tmp_path / 'records'
  args = ['mimjax.reproduce', '--smoke', '--rows', 'mae_mto', '--out', str(out),
          '--workdir_root', str(root), '--records', str(records)]
  # Killed once MAE's pre-training has finished (its part is cached), then rerun: the rerun
  # does not train MAE again and finishes the study.
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  first = subprocess.Popen([sys.executable, '-m', *args], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  pretrained = root / 'smoke' / 'mae' / 'seed0' / 'repro_pretrain.json'
  deadline = time.time() + 600
  while not pretrained.exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  first.kill()
  first.wait()
  assert pretrained.exists() and not out.exists()
  stamp = pretrained.stat().st_mtime_ns
  proc = run_module(args, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert pretrained.stat().st_mtime_ns == stamp
  text = out.read_text()
  headline, secondary = _tables(text)
  assert headline[0][3:5] == ['top-1, 10% labels (%)', 'Δ, 10% labels (pp; per seed)']
  assert [r[:3] for r in headline[2:]] == [
      ['mae_mto', 'scratch (random init, fine-tuned)', '1'], ['mae_mto', 'MAE', '1'],
      ['mae_mto', 'MAE + MTO (decoder)', '1']]
  for r in headline[2:]:
    assert re.fullmatch(r'\d+\.\d \(n=1\)', r[3]), r  # fine-tuning top-1 on 128 test images
  assert [r[5] for r in headline[2:]] == ['0', '2', '2']  # pre-training steps
  # Images: 2 steps of batch 16 pre-training; the final checkpoint's fine-tune of 2 steps at
  # batch 128 (MAE's curve fine-tunes of earlier checkpoints are not counted).
  assert [r[6] for r in headline[2:]] == ['0 + 256', '32 + 256', '32 + 256']
  assert re.fullmatch(r'-?\d+\.\d \(n=1\) \([+-]\d+\.\d\)', headline[3][4]), headline[3]
  assert 'MAE, fine-tune top-1 (10% labels) by pre-training step (step 0: scratch): 0: ' in text
  assert secondary[0][:3] == ['pair', 'run', 'seeds'] and len(secondary[0]) == 11
  body = secondary[2:]
  assert [r[:3] for r in body] == [['mae_mto', 'MAE', '1'], ['mae_mto', '(random init)', '1'],
                                   ['mae_mto', 'MAE + MTO (decoder)', '1']]
  floor, body = body[1], body[::2]
  assert all(re.fullmatch(r'\d+\.\d \(n=1\)', c) for c in floor[4:6]), floor  # kNN, linear
  for r in body:
    assert re.fullmatch(r'\d+\.\d{4} \(n=1\)', r[3]), r  # final loss
    assert re.fullmatch(r'\d+\.\d \(n=1\)', r[4]), r  # kNN top-1 on 128 test images
    assert re.fullmatch(r'\d+\.\d \(n=1\)', r[5]), r  # linear probe
    assert r[6] == '—'  # no supervised test top-1 for pre-training runs
    assert re.fullmatch(r'\d+ \(n=1\)', r[10]), r  # step time in ms
  assert re.fullmatch(r'-?\d+\.\d \(n=1\) \(fine-tune top-1 \(10% labels\)\)', body[1][7])
  for name in ('mae_mto.png', 'mae_eval_heterogeneity.png', 'mae_mto_eval_heterogeneity.png',
               'mae_eval_attention_distance.png', 'finetune_vs_pretraining.png'):
    assert os.path.exists(tmp_path / 'RESULTS_figures' / name), name
  for heading in ('## What this shows', '## What this does not show', '## Commands',
                  '## Versions'):
    assert heading in text
  assert 'python -m mimjax.train --config configs/mae_mto.py:runlocal' in text
  assert 'Device: cpu (cpu, 1 device)' in text and 'jax 0.' in text

  # A rerun of the finished study measures nothing again; one whose fine-tune record is lost
  # measures that fine-tune only (resuming its finished training: no step is trained again).
  parts = _parts(root)
  assert json.loads(
      (root / 'smoke' / 'mae_mto' / 'seed0' / 'repro.json').read_text())['steps'] == 2
  proc = run_module(args, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _parts(root) == parts
  lost = root / 'smoke' / 'mae_mto' / 'seed0' / 'repro_finetune_labels0.1_step2.json'
  kept = records / 'smoke' / 'mae_mto' / 'seed0'  # the copies kept with the records
  for run in (root / 'smoke' / 'mae_mto' / 'seed0', kept):
    (run / lost.name).unlink()
    (run / 'repro.json').unlink()
  proc = run_module(args, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  changed = {p for p, t in _parts(root).items() if parts.get(p) != t}
  assert changed == {str(lost), str(root / 'smoke' / 'mae_mto' / 'seed0' / 'repro.json')}

  # A stopped study: --report_only reports the finished runs and names the missing ones.
  partial = tmp_path / 'PARTIAL.md'
  reproduce.run_study('smoke', seeds=2, out=str(partial), workdir_root=str(root),
                      methods=['mae_mto'], report_only=True, argv=['--smoke', '--report_only'])
  text = partial.read_text()
  assert 'the study was stopped before these runs finished: mae seed 1, mae_mto seed 1.' in text
  assert [r[:3] for r in _tables(text)[1][2:]] == [
      ['mae_mto', 'MAE', '1'], ['mae_mto', '(random init)', '1'],
      ['mae_mto', 'MAE + MTO (decoder)', '1']]
  assert 'by `python -m mimjax.reproduce --smoke`' in text  # the study's command, not this one
  (root / 'smoke' / 'mae_mto' / 'seed0' / 'repro.json').unlink()
  with pytest.raises(ValueError, match='No pair has a finished run'):
    reproduce.run_study('smoke', out=str(partial), workdir_root=str(root), methods=['mae_mto'],
                        report_only=True)

  # Another machine: the committed records without the workdirs. The report is written from them
  # alone; a part they lack trains its run again (same config and seed) and measures the same.
  assert {'config.json', 'metrics.jsonl', 'repro.json'} <= {p.name for p in kept.iterdir()}
  tuned = json.loads((kept / lost.name).read_text())['top1']
  tables = _tables(out.read_text())
  shutil.rmtree(root)
  out.unlink()
  proc = run_module(args, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _tables(out.read_text()) == tables and not root.exists()
  (kept / lost.name).unlink()
  (kept / 'repro.json').unlink()
  proc = run_module(args, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((kept / lost.name).read_text())['top1'] == tuned
  assert (root / 'smoke' / 'mae_mto' / 'seed0' / 'checkpoints' / '2').is_dir()


@pytest.mark.slow  # trains 4 tiny runs: supervised (the teacher), MoTo, distillation, DTM
def test_smoke_study_supervised_and_distillation_rows(tmp_path):
  out = tmp_path / 'RESULTS.md'
  proc = run_module(['mimjax.reproduce', '--smoke', '--rows', 'supervised_moto,distill_dtm',
                     '--out', str(out), '--workdir_root', str(tmp_path / 'runs'),
                     '--records', str(tmp_path / 'records')], timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  headline, secondary = _tables(out.read_text())
  assert [r[1] for r in headline[2:]] == ['scratch (random init, fine-tuned)',
                                          'feature distillation', 'distillation + DTM']
  body = secondary[2:]
  assert [r[1] for r in body] == ['feature distillation', '(random init)', 'distillation + DTM',
                                  'supervised ViT', 'supervised + MoTo']
  body = body[:1] + body[2:]
  for r in body[2:]:  # supervised rows: test top-1 only
    assert r[4:6] == ['—', '—'] and re.fullmatch(r'\d+\.\d \(n=1\)', r[6]), r
  assert re.fullmatch(r'\d+\.\d \(n=1\)', body[0][4]), body[0]  # the student's kNN
  figures = tmp_path / 'RESULTS_figures'
  for name in ('supervised_moto_eval_moto_layout.png', 'distill_dtm_eval_morphing.png'):
    assert os.path.exists(figures / name), name
  assert '## Evaluations that could not run\n\n- none.' in out.read_text()


def _random_encoder(row, tmp_path):
  """The encoder params a study run of `row` starts from (smoke budget, seed 3)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mimjax import registry  # pylint: disable=g-import-not-at-top
  from mimjax import train_step  # pylint: disable=g-import-not-at-top
  from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  budget = reproduce.BUDGETS['smoke']
  config = reproduce.build_config(row, reproduce.row_overrides(
      row, 3, budget, str(tmp_path / 'teacher')))
  sample = jax.tree_util.tree_map(lambda x: x[:2], next(pipeline.train_batches(config, 0)))
  init_fn, _, _, _ = train_step.build(registry.build(config), config, sample)
  return jax.jit(init_fn)().params['encoder']


@pytest.mark.parametrize('method', ['mae_lut', 'mae_mto', 'simmim_mto'])
def test_method_starts_from_its_baselines_random_encoder(method, tmp_path):
  # The report starts both curves of a pre-training pair at step 0 from the baseline's random-init
  # evaluation; that is only right if the method's step-0 encoder is the baseline's, bit for bit.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  base = _random_encoder(reproduce.PAIRS[method], tmp_path)
  other = _random_encoder(method, tmp_path)
  assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(other)
  for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(other)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))



def _ft_record(row, seed, label, values, steps=100, seconds=3600.0):
  """A hand-made record with fine-tuning top-1 per labelled fraction ({fraction: value})."""
  return dict(row=row, label=label, seed=seed, steps=steps, images=steps * 10,
              finetune_images=1000, seconds=seconds, notes={},
              **{report.finetune_key(f): v for f, v in values.items()})


def test_finetune_table_pairs_scratch_baseline_and_method_by_seed():
  # 1% labels, seeds 0, 1. Scratch 0.50 / 0.54 (52.0 ± 2.8); MAE 0.60 / 0.62 (61.0 ± 1.4), Δ vs
  # scratch 10 and 8 pp -> 9.0 ± 1.4; LUT 0.61 / 0.60 (60.5 ± 0.7), Δ vs MAE +1.0, -2.0 pp ->
  # -0.5 ± 2.1.
  # 10% labels only on seed 0: MAE 0.80 vs scratch 0.70 -> 10.0 (n=1).
  floors = {'mae': [_ft_record('mae', 0, 'random init', {0.01: .50, 0.1: .70}, seconds=1800),
                    _ft_record('mae', 1, 'random init', {0.01: .54}, seconds=1800)]}
  records = {'mae': [_ft_record('mae', 0, 'MAE', {0.01: .60, 0.1: .80}),
                     _ft_record('mae', 1, 'MAE', {0.01: .62})],
             'mae_lut': [_ft_record('mae_lut', s, 'MAE + LUT', {0.01: v})
                         for s, v in ((0, .61), (1, .60))]}
  rows = _table_rows(report.finetune_table(records, [('mae_lut', 'mae')], floors))
  assert rows[0][3:5] == ['top-1, 1% labels (%)', 'Δ, 1% labels (pp; per seed)']
  assert rows[0][5] == 'top-1, 10% labels (%)'
  assert rows[2] == ['mae_lut', 'scratch (random init, fine-tuned)', '2', '52.0 ± 2.8', '—',
                     '70.0 (n=1)', '—', '0', '1,000 + 1,000', '1.00']
  assert rows[3][1:7] == ['MAE', '2', '61.0 ± 1.4', '9.0 ± 1.4 (+10.0, +8.0)', '80.0 (n=1)',
                          '10.0 (n=1) (+10.0)']
  assert rows[3][7:] == ['100', '1,000 + 1,000', '2.00']
  assert rows[4][3:5] == ['60.5 ± 0.7', '-0.5 ± 2.1 (+1.0, -2.0)']
  # The pair's headline metric is fine-tuning on the smallest subset.
  assert report.main_metric(records['mae'], records['mae_lut']) == report.finetune_key(0.01)
  text = report.floor_findings(records, [('mae_lut', 'mae')], floors)
  assert ('**MAE** vs scratch, fine-tune top-1 (1% labels): 61.0 ± 1.4 vs 52.0 ± 2.8, paired Δ '
          '9.0 ± 1.4 pp: above the baseline on every seed (Δ per seed +10.0, +8.0 pp); beyond '
          "the seeds' spread.") in text


def test_beyond_spread_needs_every_seed_and_a_gain_above_both_spreads():
  # Gains 3, 3, 3 pp over scratch 50, 60, 70 (std 10 pp): every seed above, but not beyond.
  assert not report.beyond_spread({0: .5, 1: .6, 2: .7}, {0: .53, 1: .63, 2: .73})
  # Scratch 50, 51, 52 (std 1), MAE 55, 55, 57 (std 1.15): gains 5, 4, 5 -> beyond.
  assert report.beyond_spread({0: .50, 1: .51, 2: .52}, {0: .55, 1: .55, 2: .57})
  # One seed below: not beyond, however large the mean.
  assert not report.beyond_spread({0: .50, 1: .50, 2: .50}, {0: .90, 1: .90, 2: .49})
  assert not report.beyond_spread({0: .5}, {0: .9})  # one seed: no spread to clear


def test_finetune_curve_starts_at_scratch_and_averages_seeds():
  # Scratch 0.50 / 0.52 at step 0; step 10: 0.60 / 0.64; step 20: 0.70 (seed 1 not there yet).
  records = {'mae': [dict(seed=0, finetune_curve=[[10, .60], [20, .70]],
                          **{report.finetune_key(.01): .70}),
                     dict(seed=1, finetune_curve=[[10, .64], [20, None]],
                          **{report.finetune_key(.01): None})]}
  floors = {'mae': [{'seed': s, report.finetune_key(.01): v} for s, v in ((0, .50), (1, .52))]}
  key, points = report.finetune_curve(records, floors, 'mae')
  assert key == report.finetune_key(.01)
  assert [(s, n) for s, _, _, n in points] == [(0, 2), (10, 2), (20, 1)]
  assert [m for _, m, _, _ in points] == [pytest.approx(.51), pytest.approx(.62), .70]
  assert report.finetune_curve({'mae_lut': records['mae']}, floors, 'mae') is None


def test_presets_and_the_floor_search_budget():
  full, gpu = reproduce.BUDGETS['cpu'], reproduce.BUDGETS['gpu']
  assert full.overrides['data.train_split'] == 'train'  # pre-training on all 60k images
  assert full.seeds == gpu.seeds == 3 and full.label_fractions == (0.01, 0.1)
  assert gpu.steps > full.steps and gpu.finetune_steps > full.finetune_steps
  config = reproduce.build_config('mae', reproduce.row_overrides('mae', 0, gpu))
  assert (config.model.variant, config.batch_size) == ('Ti/4', 256)
  assert reproduce.resolve_budget('cpu') == ('cpu', full)
  name, budget = reproduce.resolve_budget('cpu', pretrain_steps=3000, finetune_steps=600)
  assert name == 'cpu_p3000_f600' and (budget.steps, budget.finetune_steps) == (3000, 600)
  assert budget.label_fractions == full.label_fractions
  with pytest.raises(ValueError, match='multiple of curve_points'):
    reproduce.resolve_budget('cpu', pretrain_steps=1000)


def test_scratch_floor_is_the_random_init_finetune():
  # The scratch floor is the fine-tune protocol on the random-init run: the same config as the
  # pre-trained encoder's fine-tune (recipe, model, labels, steps), only without a checkpoint.
  from mimjax import finetune  # pylint: disable=g-import-not-at-top
  from mimjax.eval import loading  # pylint: disable=g-import-not-at-top
  budget = reproduce.BUDGETS['cpu']
  pre = reproduce.build_config('mae', reproduce.row_overrides('mae', 2, budget))
  tuned, scratch = (finetune.derive_config(loading.Run(pre, None, step, '/w/mae', random),
                                           total_steps=600, label_fraction=0.01)
                    for step, random in ((1500, False), (0, True)))
  flat = [dict(c.to_dict()) for c in (tuned, scratch)]
  assert (flat[0].pop('init'), flat[1].pop('init')) == (
      dict(tuned.init.to_dict()), dict(scratch.init.to_dict()))
  assert flat[0] == flat[1]
  assert (tuned.init.checkpoint, scratch.init.checkpoint) == ('/w/mae', '')
  assert (scratch.data.label_fraction, scratch.total_steps, scratch.seed) == (0.01, 600, 2)
  assert scratch.optim.layer_decay == 0.65  # MAE's own recipe, as its pre-trained fine-tune
  assert finetune.workdir_name(loading.Run(pre, None, 0, '/w', True), 0.01) == \
      'finetune_random_init_labels0.01_step0'


class _Stop(Exception):
  """Stands for the study being killed mid-run."""


def test_rerun_after_an_interruption_skips_every_finished_part(tmp_path, monkeypatch):
  # The study's compute (training, evaluations, fine-tunes) replaced by fakes that log each call;
  # the first run is "killed" in the scratch fine-tune, after MAE's pre-training, kNN curve,
  # probe, fine-tunes and diagnostics finished, and its probe failed (not cached: retried).
  # Then a sitting on another machine, with the committed records and no workdir.
  calls, stop, failing = [], [], ['linear_cached']

  def log(*call):
    calls.append(call)
    if call in stop:
      raise _Stop(call)

  def pretrain(config, workdir):
    log('pretrain', config.mto.enabled)
    os.makedirs(os.path.join(workdir, 'checkpoints', str(config.total_steps)), exist_ok=True)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write('{"step": 2}\n')
    return dict(images_per_sec=10.0, final_loss=0.5, images=32, device='cpu')

  def top1(workdir, protocol, run=None, step=None):
    log(protocol, 'mae_mto' in workdir, step)
    return dict(error='failed') if protocol in failing else dict(top1=0.5)

  def finetune(workdir, fraction, total_steps, step=None, random_init=None):
    scratch = random_init is not None  # the run's config: the random-init encoder's fine-tune
    log('finetune', 'mae_mto' in workdir, fraction, step, scratch)
    return dict(top1=0.6 - 0.1 * scratch, images=total_steps * 128)

  monkeypatch.setattr(reproduce, 'pretrain', pretrain)
  monkeypatch.setattr(reproduce, 'top1', top1)
  monkeypatch.setattr(reproduce, 'finetune', finetune)
  monkeypatch.setattr(reproduce, 'diagnostic', lambda w, n: log(n) or dict(numbers={}, figures=[]))
  monkeypatch.setattr(reproduce, '_random_init_probes', lambda w, c: log('probes') or dict(knn=.4))
  monkeypatch.setattr(reproduce, '_load_final', lambda w: None)
  written = []
  monkeypatch.setattr(reproduce.report, 'write', lambda *a: written.append(a))
  records_root = tmp_path / 'results'
  study = lambda: reproduce.run_study('smoke', workdir_root=str(tmp_path / 'runs'),  # noqa: E731
                                      methods=['mae_mto'], out=str(tmp_path / 'R.md'),
                                      records_root=str(records_root))
  stop.append(('finetune', False, 0.1, None, True))
  with pytest.raises(_Stop):
    study()
  assert calls == [('pretrain', False), ('knn', False, 1), ('knn', False, 2),
                   ('linear_cached', False, None), ('finetune', False, 0.1, 1, False),
                   ('finetune', False, 0.1, 2, False), ('attention_distance',),
                   ('heterogeneity',), ('probes',), ('finetune', False, 0.1, None, True)]
  assert not os.path.exists(tmp_path / 'runs' / 'smoke' / 'mae' / 'seed0' / 'repro.json')
  calls.clear(), stop.clear(), failing.clear()
  study()
  assert calls == [('linear_cached', False, None), ('finetune', False, 0.1, None, True),
                   ('pretrain', True), ('knn', True, 1), ('knn', True, 2),
                   ('linear_cached', True, None), ('finetune', True, 0.1, 2, False),
                   ('heterogeneity',)]
  records, floors = written[-1][1], written[-1][7]
  assert records['mae'][0]['finetune_curve'] == [[1, 0.6], [2, 0.6]]
  assert records['mae_mto'][0][report.finetune_key(0.1)] == 0.6
  assert floors['mae'][0][report.finetune_key(0.1)] == pytest.approx(0.5)
  assert floors['mae'][0]['finetune_images'] == 2 * 128
  calls.clear()
  study()
  assert calls == [] and len(written) == 2  # everything finished: nothing runs again

  kept = records_root / 'smoke' / 'mae_mto' / 'seed0'
  assert sorted(p.name for p in kept.iterdir()) == [
      'metrics.jsonl', 'repro.json', 'repro_diagnostic_heterogeneity.json',
      'repro_finetune_labels0.1_step2.json', 'repro_knn_step1.json', 'repro_knn_step2.json',
      'repro_linear.json', 'repro_pretrain.json']  # config.json: written by training, faked here
  shutil.rmtree(tmp_path / 'runs')  # another machine: the committed records, no workdir
  study()
  assert calls == [] and written[-1][1] == written[-2][1]  # the same records, nothing measured
  assert not os.path.exists(tmp_path / 'runs')
  (kept / 'repro_finetune_labels0.1_step2.json').unlink()
  (kept / 'repro.json').unlink()
  study()  # a part the records lack: the run is trained again first, then only that part runs
  assert calls == [('pretrain', True), ('finetune', True, 0.1, 2, False)]
  assert written[-1][1]['mae_mto'][0][report.finetune_key(0.1)] == 0.6


def test_supervised_pairs_stay_out_of_the_finetuning_table():
  records = {'supervised': [dict(seed=0, label='supervised ViT', test_top1=.4, steps=2)],
             'supervised_moto': [dict(seed=0, label='supervised + MoTo', test_top1=.5, steps=2)]}
  rows = _table_rows(report.finetune_table(records, [('supervised_moto', 'supervised')], {}))
  assert rows[0][:3] == ['pair', 'run', 'seeds'] and len(rows) == 2  # header and rule only


def test_a_cached_study_part_of_another_budget_is_refused(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from mimjax.reproduce import study  # pylint: disable=g-import-not-at-top
  budget = study.BUDGETS['smoke']
  key = study.budget_key(budget)
  store = study.Store(str(tmp_path / 'run'), key, str(tmp_path / 'records'))
  assert study.cached(store, 'linear', lambda: dict(top1=0.5))['top1'] == 0.5
  assert study.cached(store, 'linear', lambda: dict(top1=0.1))['top1'] == 0.5
  others = [dataclasses.replace(budget, overrides={**budget.overrides, 'batch_size': 8}),
            dataclasses.replace(budget, finetune_steps=budget.finetune_steps + 1),
            dataclasses.replace(budget, label_fractions=(0.5,))]
  other_keys = [study.budget_key(b) for b in others] + [study.budget_key(budget, '/clip.npz')]
  assert len({key, *other_keys}) == 5
  for other in other_keys:  # in the workdir, or only in the records (another machine)
    for where in (store, study.Store(str(tmp_path / 'elsewhere'), key, store.mirror)):
      with pytest.raises(errors.ConfigError, match=r'repro_linear.json .*own --workdir_root'):
        study.cached(dataclasses.replace(where, key=other), 'linear', lambda: dict(top1=0.1))


def test_only_the_final_checkpoints_finetunes_count_as_compute(tmp_path):
  from mimjax.reproduce import study  # pylint: disable=g-import-not-at-top
  parts = {'pretrain': dict(seconds=1, images=32),
           'finetune_labels0.01_step1': dict(seconds=1, images=100),  # MAE's curve
           'finetune_labels0.01_step2': dict(seconds=1, images=10),
           'finetune_labels0.1_step2': dict(seconds=1, images=1)}
  store = study.Store(str(tmp_path), 'key')
  record = study._finish(dict(steps=2, notes={}), parts, store, 'r.json')  # pylint: disable=protected-access
  assert record['finetune_images'] == 11
  floor = {'finetune_random_init_labels0.01': dict(seconds=1, images=7)}
  assert study._finish(dict(notes={}), floor, store, 'f.json')['finetune_images'] == 7  # pylint: disable=protected-access


def test_a_refused_study_budget_is_one_error_line():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, '-m', 'mimjax.reproduce', '--pretrain_steps', '1000'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error: steps 1000 must be a multiple')
  assert 'Traceback' not in proc.stderr
