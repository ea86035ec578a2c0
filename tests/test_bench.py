"""The benchmark's FLOP counter (hand counts, XLA's cost analysis) and its output schema.

Timings are never asserted: they belong to the benchmark's written results.
"""
import json
import os
import subprocess
import sys

from absl import flags
import jax
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from mimjax.bench import cli
from mimjax.bench import runner as bench
from mimjax.models import flops
from mimjax.models import vit


def test_transformer_flops_by_hand():
  # width 8, mlp 32, 4 tokens, one block; a multiply-add is 2 FLOPs:
  # q,k,v 2*4*8*24 = 1536; q k^T and a v 2 * (2*4*4*8) = 512; out 2*4*8*8 = 512;
  # MLP 2*4*8*32 + 2*4*32*8 = 4096. Total 6656.
  assert flops.transformer(4, 8, 1, 32) == 6656
  assert flops.transformer(4, 8, 3, 32) == 3 * 6656


def test_encoder_and_decoder_flops_by_hand():
  # 8 px image, patch 4 -> 4 patches of 4*4*3 = 48 values; cls token -> 5 tokens in the blocks.
  kw = dict(image_size=8, patch_size=4, width=8, depth=1, mlp_dim=32, cls_token=True)
  patch_embed = 2 * 4 * 48 * 8  # 3072
  # 5 tokens: qkv 1920, attention 4*25*8 = 800, out 640, MLP 5120 -> 8480.
  assert flops.encoder(kw, 3, 4) == patch_embed + 8480
  # MAE keeps 1 of 4 patches: the patch embedding still runs on all 4, the blocks on 1 + cls.
  # 2 tokens: qkv 768, attention 4*4*8 = 128, out 256, MLP 2048 -> 3200.
  assert flops.encoder(kw, 3, 1) == patch_embed + 3200
  mae = ml_collections.ConfigDict(dict(decoder_width=8, decoder_depth=1, decoder_mlp_ratio=4))
  # Decoder: embedding 2*5*8*8 = 640, blocks on 5 tokens 8480, prediction 2*4*8*48 = 3072.
  assert flops.mae_decoder(mae, 8, 4, 48, 1) == 640 + 8480 + 3072


def test_xla_cost_analysis_matches_analytic_vit_forward():
  model = vit.ViT(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=8, image_size=32)
  images = np.zeros((2, 32, 32, 3), np.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  compiled = jax.jit(model.apply).lower(params, images).compile()
  xla = bench._xla_flops(compiled)  # pylint: disable=protected-access
  analytic = 2 * flops.encoder(dict(image_size=32, patch_size=8, width=64, depth=2, mlp_dim=256,
                                    cls_token=True), 3, 16)
  # XLA also counts norms, softmax, GELU and additions (about 1 FLOP per element), a few percent
  # at this width; the matrix products must account for nearly all of it.
  assert 1.0 <= xla / analytic < 1.25, (xla, analytic)


def test_flags_parse_privately_into_the_commands_own_names():
  argv = ['--model', 'mu/4', '--peer=', '--batch_scales', '0.25,4', '--grid_scales', '']
  first = cli.parse(bench.define_flags, argv)
  again = cli.parse(bench.define_flags, argv)  # a second parse in one process: no clash
  assert vars(first) == vars(again)
  assert set(vars(first)) == set(cli.flag_names(bench.define_flags))
  assert 'verbosity' not in vars(first)  # absl's own flags stay out of the results' settings
  assert (first.model, first.peer, first.batch_scales, first.grid_scales) == (
      'mu/4', [], [0.25, 4.0], [])
  assert cli.parse(bench.define_flags, []).peer == list(bench.PEER_MODES)
  with pytest.raises(flags.IllegalFlagValueError, match=r"--peer \['jit'\]: choose from"):
    cli.parse(bench.define_flags, ['--peer', 'eager,jit'])
  with pytest.raises(flags.IllegalFlagValueError, match='batch_scales'):
    cli.parse(bench.define_flags, ['--batch_scales', 'half'])


def test_report_only_command_rerenders_a_results_file(tmp_path):
  """`python -m mimjax.bench --report` end to end through absl, on committed results."""
  md, results = tmp_path / 'r.md', os.path.join(ROOT, 'benchmarks', 'cpu_b16_224px_mto.json')
  result = subprocess.run([sys.executable, '-m', 'mimjax.bench', '--report', results,
                           '--markdown', str(md)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  text = md.read_text()
  assert text.strip() == result.stdout.strip()
  with open(results) as f:
    names = [c['name'] for c in json.load(f)['cases']]
  assert all(f'| {name} |' in text for name in names)


@pytest.mark.slow  # the benchmark command end to end: compiles 3 cases and a torch peer
def test_command_output_schema(tmp_path):
  out, md = tmp_path / 'r.json', tmp_path / 'r.md'
  bench.main(cli.parse(bench.define_flags, [
      '--model', 'mu/4', '--image_size', '28', '--batch', '8', '--steps', '2', '--rounds', '1',
      '--warmup', '0', '--cases', 'mae,mae+lut,mae+mto', '--peer', 'eager', '--batch_scales', '2',
      '--grid_scales', '', '--matmul_size', '256', '--out', str(out), '--markdown', str(md)]))
  results = json.loads(out.read_text())
  machine = results['machine']
  assert machine['cores'] >= 1 and machine['platform'] == jax.default_backend()
  assert {'jax', 'jaxlib', 'flax', 'torch'} <= set(machine['versions'])
  cases = {c['name']: c for c in results['cases']}
  assert set(cases) == {'mae', 'mae+lut', 'mae+mto'}
  for name in ('mae', 'mae+lut', 'mae+mto'):
    c = cases[name]
    assert c['status'] == 'ok'
    assert c['step_s']['n'] == 2  # 1 round x 2 steps
    assert c['step_s']['min'] <= c['step_s']['median'] <= c['step_s']['max']
    assert c['compile_s'] > 0 and c['images_per_s'] > 0
    assert c['flops']['xla'] > 0 and c['flops']['analytic'] > 0
    assert c['memory']['xla']['peak_estimate'] > 0
    assert c['mfu'] is None or jax.default_backend() != 'cpu'
  # LUT encodes a second view and runs the context encoder on both images: more FLOPs than MAE.
  lut = cases['mae+lut']
  assert lut['overhead']['host'] == 'mae' and lut['overhead']['flops'] > 0
  assert set(lut['flops']['analytic_terms_per_example']) == {
      'encoder', 'decoder', 'lut_view2', 'lut_context'}
  assert 'overhead' not in cases['mae']
  [peer] = results['peer']
  assert peer['name'] == 'torch_eager' and peer['status'] == 'ok' and peer['step_s']['n'] == 2
  assert [s['name'] for s in results['scaling']] == ['mae@batch=8,image=28',
                                                     'mae@batch=16,image=28']
  # Doubling the batch doubles XLA's FLOPs of the step up to the batch-independent optimizer.
  f8, f16 = (s['flops']['xla'] for s in results['scaling'])
  assert 1.8 < f16 / f8 <= 2.0
  assert results['matmul'][0]['flops_per_s'] > 0
  text = md.read_text()
  assert 'mae+lut' in text and 'torch_eager' in text and 'Scaling' in text


@pytest.mark.slow  # ~3 min on the 2 shared cores: four augmentations, two thread settings
def test_input_benchmark_writes_jpegs_and_reports_every_augmentation(tmp_path):
  from mimjax.bench import input as input_bench  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'images')
  results = input_bench.main(cli.parse(input_bench.define_flags, [
      '--root', root, '--images', '20', '--batch', '4', '--batches', '1', '--image_size', '32',
      '--out', str(tmp_path / 'input.json')]))
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  assert len(files) == 20 and all(f.endswith('.jpg') for f in files)
  sizes = np.array([Image.open(f).size for f in files])
  assert 300 < sizes[:, 0].mean() < 700 and 200 < sizes[:, 1].mean() < 550  # around 500 x 375
  assert set(results['throughput']) == {'rrc_flip', 'deit', 'lut_two_view', 'center'}
  assert all(v[f'{measure}_{threads}'] > 0 for v in results['throughput'].values()
             for measure in ('img_per_cpu_s', 'wall_img_s')
             for threads in ('1_thread', 'all_cores'))
  assert results['load_average_1min_at_start'] >= 0
  assert sorted(results['resume_first_batch_s']) == [0, 10_000, 100_000]
  assert json.loads((tmp_path / 'input.json').read_text())['images'] == 20


@pytest.mark.slow  # starts the torch worker and compiles a tiny MAE step (~40 s)
def test_torch_worker_is_idle_while_mimjax_is_timed():
  """The two sides take turns: the worker's CPU time barely moves during mimjax's timed steps,
  while it does grow during its own (so the measurement is live, not always zero)."""
  config = bench.load_config('mae', 'mu/4', 28, 8, 'recipe', 'float32')
  mimjax_side = bench.JaxStep('mae', config, warmup=1)
  peer = bench.TorchPeer('eager', config, warmup=1, device='cpu')
  try:
    busy_before = bench.process_cpu_s(peer.pid)
    bench.run_rounds([mimjax_side, peer], rounds=3, steps=2)
    peer_busy = bench.process_cpu_s(peer.pid) - busy_before - mimjax_side.others_cpu_s
  finally:
    peer.close()
  assert mimjax_side.timed_wall_s > 0.1
  assert mimjax_side.others_cpu_s / mimjax_side.timed_wall_s < 0.05
  assert peer_busy > 0.5 * peer.timed_wall_s  # at least half a core while its own steps ran


@pytest.mark.slow  # a traced benchmark run, like the other benchmark commands' tests
def test_profile_mode_writes_the_step_by_op_class(tmp_path):
  """`--profile` writes, beside the JSON, each case's traced step time by op class; the classes
  (kernel time, plus the wall time no kernel covered) add up to about the traced step."""
  out = tmp_path / 'r.json'
  bench.main(cli.parse(bench.define_flags, [
      '--model', 'mu/4', '--image_size', '16', '--batch', '4', '--steps', '1', '--rounds', '1',
      '--warmup', '0', '--cases', 'mae', '--peer', '', '--scaling_case', '', '--matmul_size', '64',
      '--profile', '--profile_steps', '1', '--out', str(out)]))
  assert 'profile' not in json.loads(out.read_text())
  profile = json.loads((tmp_path / 'r.profile.json').read_text())['cases']['mae']
  classes = {r['class']: r for r in profile['classes']}
  assert 'optimizer' in classes and 'outside kernels' in classes
  assert any(c.startswith('matmul encoder q/k/v backward') for c in classes), sorted(classes)
  assert any(c.startswith('matmul decoder mlp fc1 forward') for c in classes), sorted(classes)
  total = sum(r['s'] for r in profile['classes'])
  assert abs(sum(r['share'] for r in profile['classes']) - 1) < 1e-6
  # Kernels run on 2 threads at most here, so their sum is at most ~2x the wall time.
  assert 0.999 * profile['step_s'] <= total <= 2.5 * profile['step_s'], profile
