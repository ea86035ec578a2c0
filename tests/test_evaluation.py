"""Evaluation protocols and analyses against values worked out by hand or with numpy; results are
kept per options and step, and a damaged results file is refused before a protocol runs."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import damages
from conftest import free_port
from conftest import load_config
from conftest import one_line_error
from conftest import restore_file
from conftest import tiny_overrides
from mimjax import config_lib
from mimjax import errors
from mimjax import evaluate
from mimjax import optim
from mimjax import train
from mimjax.data import pipeline
from mimjax.eval import attention
from mimjax.eval import features as features_lib
from mimjax.eval import knn
from mimjax.eval import linear
from mimjax.eval import pictures
from mimjax.eval import rauc
from mimjax.eval import spectrum
from mimjax.plugins import dtm


def test_knn_vote_weights_follow_the_temperature():
  # Test point e1. Neighbours: one of class 0 at cosine 1, two of class 1 at cosine 0.9, and one of
  # class 0 at cosine -1 that k = 3 leaves out. Class 0 wins when exp(1/T) > 2 exp(0.9/T), i.e.
  # T < 0.1 / ln 2 = 0.144: so at T = 0.07 (one vote beats two), not at T = 1 (majority wins).
  s = math.sqrt(0.19)
  train_x = np.array([[2, 0, 0], [0.9, s, 0], [0.9, 0, s], [-1, 0, 0]], np.float32)
  train_y = np.array([0, 1, 1, 0])
  test_x, test_y = np.array([[1, 0, 0]], np.float32), np.array([0])
  votes = lambda t: knn.class_votes(  # noqa: E731
      knn.l2_normalize(test_x), knn.l2_normalize(train_x), jnp.asarray(train_y), 3, 2, t)[0]
  assert votes(0.07).argmax() == test_y[0] and votes(1.0).argmax() != test_y[0]
  np.testing.assert_allclose(votes(1.0), [math.e, 2 * math.exp(0.9)], rtol=1e-5)


def test_attention_distance_of_hand_built_maps():
  # 2 x 2 grid: centres (.25, .25), (.25, .75), (.75, .25), (.75, .75); from any patch the others
  # lie at 0.5, 0.5 and 0.5 * sqrt(2).
  uniform = np.full((4, 4), 0.25, np.float32)
  np.testing.assert_allclose(attention.attention_distance(uniform, 2),
                             (1 + 0.5 * math.sqrt(2)) / 4, rtol=1e-6)
  np.testing.assert_allclose(attention.attention_distance(np.eye(4, dtype=np.float32), 2), 0.0)
  # With a cls token: each patch puts half its attention on cls and half on the patch beside it
  # in its row (distance 0.5). Renormalised over the patches (cl-vs-mim), all of a query's patch
  # attention is on that neighbour: 0.5 for every query, not 0.25.
  attn = np.zeros((5, 5), np.float32)
  attn[1:, 0] = 0.5
  for q, neighbour in enumerate([1, 0, 3, 2]):
    attn[q + 1, neighbour + 1] = 0.5
  np.testing.assert_allclose(attention.attention_distance(attn[None, None], 2, num_prefix=1),
                             [[0.5]], rtol=1e-6)
  # 0.8 on cls, 0.1 on itself (distance 0) and 0.1 on the neighbour: (0.1 * 0.5) / 0.2 = 0.25.
  attn[1:, 0] = 0.8
  attn[1:, 1:] = np.where(attn[1:, 1:] > 0, 0.1, 0) + 0.1 * np.eye(4)
  np.testing.assert_allclose(attention.attention_distance(attn, 2, num_prefix=1), 0.25,
                             rtol=1e-6)


def test_rauc_of_two_linear_curves():
  # S1(E) = E / 100, S2(E) = 0.5 + E / 50 on [100, 300]; S1(100) = 1. Numerator
  # int (E/50 - 0.5) dE = [E^2/100 - E/2] = 750 - 50 = 700; denominator int (E/100 - 1) dE
  # = [E^2/200 - E] = 150 + 50 = 200. RAUC = 3.5. The curves are sampled at different steps.
  s1 = np.array([0, 100, 200, 400])
  s2 = np.array([0, 150, 400])
  assert rauc.rauc(s1, s1 / 100, s2, 0.5 + s2 / 50, 100, 300) == pytest.approx(3.5)
  assert rauc.rauc(s1, s1 / 100, s1, s1 / 100, 100, 300) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='does not contain'):
    rauc.rauc(s1, s1 / 100, s2, s2 / 50, 100, 500)


def _fake_run(workdir, config, records):
  os.makedirs(workdir)
  with open(workdir / 'config.json', 'w') as f:
    f.write(config_lib.to_json(config))
  with open(workdir / 'metrics.jsonl', 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')


def test_rauc_compares_only_a_metric_both_objectives_share(tmp_path):
  # The shared MAE term follows the curves of test_rauc_of_two_linear_curves (RAUC 3.5 on
  # [100, 300]); the MTO run's total loss also holds its own term, so `loss` and `loss_mto` are
  # refused, and the default is the shared framework term loss_mae.
  steps = (50, 100, 200, 300)
  _fake_run(tmp_path / 'base', load_config('configs/mae.py:runlocal'),
            [dict(step=s, loss=s / 100, loss_mae=s / 100) for s in steps])
  _fake_run(tmp_path / 'mto', load_config('configs/mae_mto.py:runlocal'),
            [r for s in steps for r in (dict(step=s, loss=1.0 + s / 50, loss_mae=0.5 + s / 50,
                                             loss_mto=0.5), dict(step=s, eval_top1=0.1))])
  mto, base = str(tmp_path / 'mto'), str(tmp_path / 'base')
  result = evaluate.evaluate(mto, 'rauc', other_workdir=base, e1=100, e2=300)
  assert result['metric'] == 'loss_mae' and result['rauc'] == pytest.approx(3.5)
  with open(tmp_path / 'mto' / 'eval_rauc.json') as f:
    assert json.load(f)['results'][-1]['rauc'] == pytest.approx(3.5)
  with pytest.raises(errors.ConfigError, match='different terms'):
    evaluate.evaluate(mto, 'rauc', other_workdir=base, metric='loss')
  for metric in ('loss_mto', 'eval_top1'):
    with pytest.raises(errors.ConfigError, match=f'only {mto} logs it'):
      evaluate.evaluate(mto, 'rauc', other_workdir=base, metric=metric)
  with pytest.raises(errors.ConfigError, match='no option'):
    evaluate.evaluate(mto, 'rauc', other_workdir='x', k=[20])


def test_layer_decay_factors_follow_the_formula():
  depth, decay = 4, 0.65
  leaf = np.zeros(2)
  params = {'encoder': {'embedding': {'kernel': leaf}, 'cls': leaf, 'pos_embedding': leaf,
                        'Transformer': {f'encoderblock_{i}': {'w': leaf} for i in range(depth)}
                                       | {'encoder_norm': {'scale': leaf}},
                        'head': {'kernel': leaf}},
            'decoder': {'w': leaf}}
  f = optim.layer_decay_factors(params, depth, decay)
  for got in (f['encoder']['embedding']['kernel'], f['encoder']['cls'],
              f['encoder']['pos_embedding']):
    assert got == pytest.approx(decay ** 5)
  for i in range(depth):
    assert f['encoder']['Transformer'][f'encoderblock_{i}']['w'] == pytest.approx(
        decay ** (depth - i))
  assert f['encoder']['Transformer']['encoder_norm']['scale'] == 1.0
  assert f['encoder']['head']['kernel'] == 1.0 and f['decoder']['w'] == 1.0


def test_layer_decay_scales_each_adamw_step():
  config = load_config('configs/finetune.py:runlocal', **{'model.variant': 'pico/4'})
  params = {'encoder': {'embedding': {'kernel': jnp.ones((2, 2))},
                        'Transformer': {'encoderblock_2': {'w': jnp.ones((2, 2))}}}}
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.3), params)
  tx, _ = optim.make_optimizer(config, params)
  ref = optax.adamw(optim.learning_rate(config), b1=config.optim.b1, b2=config.optim.b2,
                    weight_decay=config.optim.weight_decay)
  state, ref_state = tx.init(params), ref.init(params)
  for _ in range(3):  # a few steps, so the warmup lr is not zero
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = ref.update(grads, ref_state, params)
  d = config.optim.layer_decay
  np.testing.assert_allclose(updates['encoder']['embedding']['kernel'],
                             d ** 5 * ref_updates['encoder']['embedding']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(updates['encoder']['Transformer']['encoderblock_2']['w'],
                             d ** 2 * ref_updates['encoder']['Transformer']['encoderblock_2']['w'],
                             rtol=1e-6)


def _mae_lars_reference(params, grads_list, lrs, weight_decay, momentum=0.9, trust=0.001):
  """MAE's util/lars.py LARS.step, transcribed to numpy: ndim > 1 params get weight decay and
  the trust ratio, then mu = momentum * mu + dp and p -= lr * mu."""
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_list, lrs):
    for k, p in params.items():
      dp = np.array(grads[k], np.float64)
      if p.ndim > 1:
        dp = dp + weight_decay * p
        param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(dp)
        q = trust * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
        dp = dp * q
      mu[k] = momentum * mu[k] + dp
      params[k] = p - lr * mu[k]
  return params


def test_mae_lars_matches_maes_optimizer_and_optax_at_constant_lr():
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(5, 3)).astype(np.float32),
            'bias': rng.normal(size=(3,)).astype(np.float32)}
  grads_list = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
                for _ in range(6)]
  lrs = [0.5, 1.0, 2.0, 1.5, 0.7, 0.1]  # warmup then decay: where lr-before-momentum differs
  tx = linear.mae_lars(lambda step: jnp.asarray(lrs)[step], weight_decay=0.05)
  got, state = dict(params), tx.init(params)
  for grads in grads_list:
    updates, state = tx.update(grads, state, got)
    got = optax.apply_updates(got, updates)
  want = _mae_lars_reference(params, grads_list, lrs, 0.05)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
  # At a constant lr the order of lr and momentum does not matter: optax.lars with MAE's
  # exclusions (ndim <= 1 params: no weight decay, no trust ratio) takes the same steps.
  mask = {'kernel': True, 'bias': False}
  ref = optax.lars(0.3, weight_decay=0.05, weight_decay_mask=mask, trust_ratio_mask=mask,
                   trust_coefficient=0.001, momentum=0.9)
  ours = linear.mae_lars(0.3, weight_decay=0.05)
  a, b, sa, sb = dict(params), dict(params), ref.init(params), ours.init(params)
  for grads in grads_list:
    ua, sa = ref.update(grads, sa, a)
    ub, sb = ours.update(grads, sb, b)
    a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
  for k in params:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_mae_schedule_is_warmup_then_half_cosine():
  f = linear.mae_schedule(steps_per_epoch=10, epochs=10, warmup_epochs=2)
  # MAE's adjust_learning_rate at fractional epochs 1, 2, 6 and 10.
  np.testing.assert_allclose([f(10), f(20), f(60), f(100)], [0.5, 1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize('optimizer', ['sgd', 'lars'])
def test_cached_linear_probe_separates_linearly_separable_features(optimizer):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 4))
  # Offset and scaled features: the BatchNorm standardisation must undo both.
  x, xt = (rng.normal(size=(n, 16)) * 3 + 5 for n in (4000, 1000))
  y, yt = (x - 5) @ w, (xt - 5) @ w
  x, xt = linear.standardize(x, xt)
  lrs = [0.5, 2.0] if optimizer == 'sgd' else [20.0, 80.0]
  heads = linear.train_probe(x, y.argmax(1), lrs, epochs=20, batch_size=256,
                             optimizer=optimizer, warmup_epochs=2)
  assert heads['kernel'].shape == (2, 16, 4)
  assert linear.top1(heads, xt, yt.argmax(1)).max() > 0.97


def test_mae_probe_draws_new_views_every_epoch(tiny_mae_config):
  # Without shuffling (buffer 1), epoch 2 shows the same 8 images in the same order: the labels
  # repeat, the pixels do not (new RandomResizedCrop + flip draws).
  config = tiny_mae_config.copy_and_resolve_references()
  with config.unlocked():
    config.data.shuffle_buffer = 1
    config.eval.linear.train_split = 'train[:8]'
    config.eval.linear.batch_size = 8
  probe = linear.probe_data_config(config)
  assert probe.data.augment == 'rrc_flip' and probe.data.crop_scale == (0.35, 1.0)
  stream = pipeline.train_batches(probe)
  first, second = next(stream), next(stream)
  np.testing.assert_array_equal(first['label'], second['label'])
  assert all(np.abs(a - b).max() > 0.1 for a, b in zip(first['image'], second['image']))


def test_standardize_uses_training_statistics():
  train_x = np.array([[1.0, 10.0], [3.0, 30.0]])
  a, b = linear.standardize(train_x, np.array([[2.0, 50.0]]))
  np.testing.assert_allclose(a, [[-1, -1], [1, 1]], atol=1e-5)
  np.testing.assert_allclose(b, [[0, 3]], atol=1e-5)  # (50 - 20) / 10


def test_spectrum_of_a_known_covariance():
  # Points (+-2, 0), (0, +-1), rotated by 30 degrees: mean 0, covariance diag(8, 2) / 4 rotated;
  # its singular values are 2 and 0.5.
  c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
  x = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], float) @ np.array([[c, s], [-s, c]]) + 7
  np.testing.assert_allclose(spectrum.covariance_spectrum(x), [2.0, 0.5], rtol=1e-10)


def test_spectrum_of_a_known_covariance_at_large_n_streamed():
  # Gaussian features with covariance Q diag(lam) Q^T: at n = 200k >> D = 6 the sample spectrum
  # is within a few sqrt(2 / n) = 0.3% of lam; the moments are summed in 20 chunks as streamed.
  rng = np.random.default_rng(0)
  lam = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.125])
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  x = (rng.normal(size=(200_000, 6)) * np.sqrt(lam)) @ q.T + 3.0
  total = sum(c.sum(axis=0) for c in np.split(x, 20))
  second = sum(c.T @ c for c in np.split(x, 20))
  np.testing.assert_allclose(spectrum.spectrum_from_moments(total, second, len(x)), lam,
                             rtol=0.02)


def test_image_features_by_hand():
  # One image, cls + 2 patches of width 2. Pre-norm block output patches (1, 3), (3, 5): mean
  # (2, 4), whose fresh LayerNorm (mean 3, variance 1) is (-1, 1) / sqrt(1 + 1e-6) (mae_gap).
  layers = [None, jnp.array([[[9.0, 9.0], [1.0, 3.0], [3.0, 5.0]]])]
  tokens = jnp.array([[[7.0, 8.0], [0.5, 1.5], [2.5, 0.5]]])
  encoded = dict(tokens=tokens, patch_tokens=tokens[:, 1:], pooled=tokens[:, 0], layers=layers)
  pick = lambda f: np.asarray(features_lib.select_feature(encoded, f, 1))  # noqa: E731
  np.testing.assert_allclose(pick('mae_gap'), [[-1 / math.sqrt(1 + 1e-6), 1 / math.sqrt(1 + 1e-6)]],
                             rtol=1e-6)
  np.testing.assert_allclose(pick('gap'), [[1.5, 1.0]])  # mean of the normed patch tokens
  np.testing.assert_allclose(pick('cls'), [[7.0, 8.0]])
  with pytest.raises(errors.ConfigError, match='Unknown feature'):
    pick('mean')


@pytest.mark.parametrize('num_tokens,num_groups', [(49, 24), (49, 6), (49, 2), (196, 13)])
def test_merge_schedule_reaches_the_requested_groups(num_tokens, num_groups):
  tokens = jax.random.normal(jax.random.PRNGKey(0), (2, num_tokens, 8))
  groups = dtm.morph_groups(tokens, pictures.merge_schedule(num_tokens, num_groups),
                            protect_first=False)
  assert [len(np.unique(g)) for g in np.asarray(groups)] == [num_groups] * 2


def test_group_colours_give_each_group_one_distinct_colour():
  groups = np.array([[5, 5, 2, 9, 2, 9]])
  colours = pictures.group_colours(groups)[0]
  assert (colours[0] == colours[1]).all() and (colours[2] == colours[4]).all()
  assert len({tuple(c) for c in colours}) == 3


@pytest.fixture(scope='module')
def pretrained(tiny_mae_run, tmp_path_factory):
  """A few MAE steps of a mu/4 encoder: this module's copy of the session's tiny run (the
  evaluations write their results into it)."""
  workdir = str(tmp_path_factory.mktemp('mae') / 'run')
  shutil.copytree(tiny_mae_run[1], workdir)
  return workdir


def test_analyses_write_json_and_pictures(pretrained):
  aad = evaluate.evaluate(pretrained, 'attention_distance', num_images=32)
  # mu has 1 layer of 2 heads; a mean distance on the unit square lies in (0, sqrt(2)).
  assert np.shape(aad['aad']) == (1, 2) and 0 < aad['aad_per_layer'][0] < math.sqrt(2)
  het = evaluate.evaluate(pretrained, 'heterogeneity', num_images=32)
  # MAE's mask tokens live in the decoder (1 block: layers 0 and 1); 12 of 49 patches visible.
  assert list(het['heterogeneity']) == ['decoder']
  assert all(0 < h <= math.log(12) + 1e-6 for h in het['heterogeneity']['decoder'])
  spec = evaluate.evaluate(pretrained, 'spectrum', num_images=32)
  assert len(spec['singular_values']) == 2 and len(spec['singular_values'][0]) == 32
  rec = evaluate.evaluate(pretrained, 'reconstruction', num_images=4)
  morph = evaluate.evaluate(pretrained, 'morphing', num_images=4, num_groups=[6, 2])
  assert morph['mean_groups_found'] == [6.0, 2.0]
  for path in (aad['plot'], het['plot'], spec['plot'], morph['picture'],
               *rec['pictures'].values()):
    assert os.path.getsize(path) > 0
  with pytest.raises(errors.ConfigError, match='tokenizer_norm'):
    evaluate.evaluate(pretrained, 'moto_layout')


def test_finetune_starts_from_the_pretrained_encoder(pretrained):
  from mimjax import checkpoint  # pylint: disable=g-import-not-at-top
  result = evaluate.evaluate(pretrained, 'finetune', total_steps=2)
  assert result['layer_decay'] == 0.65 and 0 <= result['top1'] <= 1
  with open(os.path.join(result['finetune_workdir'], 'config.json')) as f:
    config = json.load(f)
  assert config['init']['format'] == 'mimjax' and config['model']['variant'] == 'mu/4'
  # Two small steps move the weights little: the fine-tuned embedding is the pre-trained one,
  # not a fresh initialisation (whose values are unrelated).
  pre = checkpoint.restore_params(pretrained)['encoder']['embedding']['kernel']
  post = checkpoint.restore_params(result['finetune_workdir'])['encoder']['embedding']['kernel']
  assert np.abs(post - pre).max() < 0.05 * np.abs(pre).max()


def test_finetune_init_trains_the_sincos_table_and_drops_the_final_norm(pretrained):
  from mimjax import checkpoint  # pylint: disable=g-import-not-at-top
  from mimjax.models import vit  # pylint: disable=g-import-not-at-top
  from mimjax import finetune  # pylint: disable=g-import-not-at-top
  from mimjax.eval import loading  # pylint: disable=g-import-not-at-top
  from mimjax.interop import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
  config = finetune.derive_config(loading.load_run(pretrained))
  assert config.model.posemb == 'learn' and config.model.fc_norm
  size = config.data.image_size
  abstract = {'encoder': jax.eval_shape(
      vit.from_config(config).init, jax.random.PRNGKey(0),
      np.zeros((1, size, size, config.data.channels), np.float32))['params']}
  encoder = pretrained_lib.load(config, abstract)['encoder']
  table = np.asarray(encoder['pos_embedding'])
  assert table.shape == (1, 50, 32) and not table[0, 0].any()  # MAE's zero cls slot
  # MAE's sin-cos table: channel 0 is sin(column index), so patch row 0 reads sin(0..6).
  np.testing.assert_allclose(table[0, 1:8, 0], np.sin(np.arange(7)), atol=1e-6)
  assert 'encoder_norm' not in encoder['Transformer'] and 'fc_norm' not in encoder
  pre = checkpoint.restore_params(pretrained)['encoder']['Transformer']['encoderblock_0']
  np.testing.assert_array_equal(encoder['Transformer']['encoderblock_0']['LayerNorm_0']['scale'],
                                pre['LayerNorm_0']['scale'])


@pytest.mark.slow
def test_pretrained_encoder_beats_random_init_on_knn_and_linear(tmp_path):
  config = load_config('configs/mae.py:runlocal', **tiny_overrides(**{
      'batch_size': 128, 'total_steps': 400, 'warmup_steps': 40,
      'mae.decoder_width': 64, 'mae.decoder_depth': 1, 'mae.decoder_heads': 2,
      'data.train_split': 'train[:10000]', 'data.eval_split': 'test[:2000]',
      'data.shuffle_buffer': 10000, 'checkpoint.every_steps': 400, 'log.every_steps': 50,
      'eval.batch_size': 500}))
  train.train(config, str(tmp_path))
  for protocol in ('knn', 'linear'):
    result = evaluate.evaluate(str(tmp_path), protocol, compare_random_init=True)
    assert result['top1'] > result['random_init']['top1'] + 0.01, (protocol, result)


def test_protocols_on_one_loaded_run_share_its_features(pretrained, monkeypatch):
  # kNN then the cached linear probe on one Run: the same top-1 as each on its own freshly
  # loaded run, with one pass over each split instead of one per protocol.
  from mimjax.eval import loading  # pylint: disable=g-import-not-at-top
  alone = {p: evaluate.evaluate(pretrained, p)['top1'] for p in ('knn', 'linear_cached')}
  passes = []
  real = features_lib._extract  # pylint: disable=protected-access
  monkeypatch.setattr(features_lib, '_extract', lambda run, split, *a: passes.append(split) or
                      real(run, split, *a))
  run = loading.load_run(pretrained)
  shared = {p: evaluate.evaluate(pretrained, p, run=run)['top1'] for p in ('knn', 'linear_cached')}
  assert shared == pytest.approx(alone, abs=1e-6)
  lin = run.config.eval.linear
  assert sorted(passes) == sorted({run.config.data.train_split, run.config.data.eval_split,
                                   lin.train_split, lin.holdout_split})


def test_mae_linear_probe_runs_and_chooses_the_lr_on_held_out_images(pretrained):
  result = evaluate.evaluate(pretrained, 'linear', base_lrs=[0.1, 1.0])
  held = result['holdout_top1_by_base_lr']
  assert result['best_base_lr'] == float(max(held, key=held.get))
  assert result['top1'] == result['top1_by_base_lr'][str(result['best_base_lr'])]
  assert result['holdout_examples'] == 128 and result['test_examples'] == 256
  assert 0.0 <= result['top1'] <= 1.0


def test_knn_needs_no_teacher_file_nor_training_pipeline(pretrained, tmp_path, monkeypatch):
  # A CLIP-distilled run whose teacher file is gone: loading reads config + encoder params only.
  # Here the MAE run's config.json is rewritten into a CLIP-distillation run whose teacher file
  # does not exist (the encoder params are what both store), and the training pipeline is made
  # to fail: kNN still runs, on the same features.
  workdir = tmp_path / 'run'
  shutil.copytree(pretrained, workdir)
  with open(workdir / 'config.json') as f:
    raw = json.load(f)
  raw['framework'] = 'distill'
  raw['distill']['teacher'], raw['distill']['clip_path'] = 'clip', str(tmp_path / 'gone.pt')
  with open(workdir / 'config.json', 'w') as f:
    json.dump(raw, f)
  monkeypatch.setattr(pipeline, 'train_batches', lambda *a, **k: 1 / 0)
  before = evaluate.evaluate(pretrained, 'knn')['top1']
  assert evaluate.evaluate(str(workdir), 'knn')['top1'] == before


_EVAL_WORKER = '''
import sys
from mimjax import config_lib, distributed, evaluate
distributed.initialize(config_lib.read_config(sys.argv[1]))
for protocol in sys.argv[2:]:
  evaluate.evaluate(sys.argv[1], protocol)
'''
MULTI_PROTOCOLS = ('knn', 'linear_cached', 'spectrum', 'linear')


def _two_host_probe_stream(train_batches):
  """train_batches replaced by the global batches of a 2-process probe, built in one process:
  host 0's rows, then host 1's."""
  def stream(config, *args, **kwargs):
    del args, kwargs
    hosts = [train_batches(config, 0, i, 2) for i in range(2)]
    for parts in zip(*hosts):
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return stream


@pytest.mark.slow  # two processes evaluating 4 protocols, then the same in this one: ~2-3 min
def test_two_processes_give_the_one_process_results(pretrained, tmp_path, monkeypatch):
  """Each process reads half of every split; gathered features make kNN, the cached probe and
  the spectrum equal one process's. MAE's probe trains on global batches of per-host streams,
  so its reference is one process fed exactly those batches (as tests/test_scale.py does)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'two'
  shutil.copytree(pretrained, workdir)
  port = free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = []
  for i in range(2):
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL='3',
               MIMJAX_COORDINATOR=f'127.0.0.1:{port}', MIMJAX_NUM_PROCESSES='2',
               MIMJAX_PROCESS_ID=str(i))
    env.pop('XLA_FLAGS', None)
    procs.append(subprocess.Popen([sys.executable, '-c', _EVAL_WORKER, str(workdir),
                                   *MULTI_PROTOCOLS], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(log[-3000:] for log in logs)
  two = {}
  for protocol in MULTI_PROTOCOLS:
    with open(workdir / f'eval_{protocol}.json') as f:
      two[protocol] = json.load(f)['results'][-1]  # the latest entry: this run's
  monkeypatch.setattr(pipeline, 'train_batches', _two_host_probe_stream(pipeline.train_batches))
  one = {p: evaluate.evaluate(pretrained, p) for p in MULTI_PROTOCOLS}
  assert two['knn']['top1_by_k'] == one['knn']['top1_by_k']
  assert two['knn']['test_examples'] == one['knn']['test_examples'] == 256
  for probe in ('linear_cached', 'linear'):
    assert two[probe]['holdout_top1_by_base_lr'] == one[probe]['holdout_top1_by_base_lr']
    assert two[probe]['top1_by_base_lr'] == one[probe]['top1_by_base_lr']
  assert two['spectrum']['images'] == one['spectrum']['images'] == 256
  # Float32 features from other batch partitions: each eigenvalue is fixed to about float32
  # precision times the largest one (the rank-deficient tail is numerical zero in both).
  for a, b in zip(two['spectrum']['singular_values'], one['spectrum']['singular_values']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * b[0])


def test_a_damaged_evaluation_results_file_is_one_error_before_the_protocol_runs(trained,
                                                                                 monkeypatch):
  """eval_knn.json (evaluate's results) damaged: refused naming it before kNN runs, unchanged."""
  from mimjax import evaluate  # pylint: disable=g-import-not-at-top
  _, workdir = trained
  ran = []
  monkeypatch.setitem(evaluate.PROTOCOLS, 'knn', lambda run: ran.append(run) or {})
  target = os.path.join(workdir, 'eval_knn.json')
  for name, damage in damages(target).items():
    if not os.path.exists(target):
      open(target, 'w').write('{}')
    damage()
    damaged = open(target, 'rb').read() if os.path.isfile(target) else None
    with pytest.raises(errors.CheckpointError) as e:
      evaluate.evaluate(workdir, 'knn')
    one_line_error(e, target, 'is damaged', 'move it away')
    assert (open(target, 'rb').read() if os.path.isfile(target) else None) == damaged, name
    assert ran == [], name
    restore_file(target, b'{"protocol": "knn", "results": []}')


def test_evaluate_keeps_every_result_keyed_by_options_and_step(watched, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(watched, workdir)
  # A file written before results were kept (one result) stays, as the first entry.
  with open(os.path.join(workdir, 'eval_knn.json'), 'w') as f:
    json.dump({'protocol': 'knn', 'step': 3, 'top1': 0.5}, f)
  gap = evaluate.evaluate(workdir, 'knn', feature='gap', k=[5])
  cls = evaluate.evaluate(workdir, 'knn', feature='cls', k=[5])
  early = evaluate.evaluate(workdir, 'knn', step=3, feature='gap', k=[5])
  again = evaluate.evaluate(workdir, 'knn', feature='gap', k=[5])  # replaces its own entry only
  entries = evaluate.read_results(workdir, 'knn')
  assert [(e['options'], e['step']) for e in entries] == [
      ({}, 3), ({'feature': 'cls', 'k': [5]}, 6), ({'feature': 'gap', 'k': [5]}, 3),
      ({'feature': 'gap', 'k': [5]}, 6)]
  assert entries[0]['top1'] == 0.5
  assert [e['top1'] for e in entries[1:]] == [cls['top1'], early['top1'], again['top1']]
  assert again['top1'] == gap['top1'] and cls['feature'] == 'cls'
