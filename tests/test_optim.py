"""Optimizer recipes: weight-decay groups against the references' own grouping, the schedules."""
import jax
import numpy as np
import optax
import pytest

from conftest import load_config
from mimjax import optim
from mimjax import registry
from mimjax import train_step as train_step_lib
from mimjax.bench import runner
from mimjax.interop import timm as timm_lib

timm = pytest.importorskip('timm')


def _timm_no_decay_names(model, skip):
  """Names of the parameters timm's param_groups_weight_decay leaves undecayed with `skip`."""
  from timm.optim import _param_groups  # pylint: disable=import-outside-toplevel
  groups = _param_groups.param_groups_weight_decay(model, 0.05, no_weight_decay_list=skip)
  undecayed = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
  return {name for name, p in model.named_parameters() if id(p) in undecayed}


# Per framework, the reference's skip list: MAE's / LUT's main_pretrain.py call timm's
# add_weight_decay without one; SimMIM's ViT, BEiT and timm's ViT (DeiT, MAE fine-tuning) return
# {'pos_embed', 'cls_token'} (+ 'dist_token') from no_weight_decay().
@pytest.mark.parametrize('framework,skip', [
    ('mae', ()), ('simmim', ('pos_embed', 'cls_token')), ('distill', ('pos_embed', 'cls_token')),
    ('supervised', ('pos_embed', 'cls_token', 'dist_token'))])
def test_decay_mask_equals_reference_param_groups(framework, skip):
  model = timm.create_model('vit_base_patch16_224', pretrained=False, img_size=32, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2, init_values=0.1, num_classes=5)
  no_decay = _timm_no_decay_names(model, skip)
  # The reference's grouping as a state dict of indicators, mapped onto mimjax's names.
  sd = {name: np.full(p.shape, float(name not in no_decay), np.float32)
        for name, p in model.named_parameters()}
  want, _ = timm_lib.from_timm(sd, num_heads=2)
  names = registry.FRAMEWORKS[framework].no_weight_decay
  got = optim.decay_mask(want, names)
  flat_want = dict(_flatten(want))
  for path, decays in _flatten(got):
    values = np.unique(flat_want[path])
    assert values.size == 1, path  # q/k/v split from one timm tensor: one group
    assert bool(values[0]) == decays, (framework, path)
  # Mask tokens are in no reference's skip list (SimMIM's ViT, MAE's decoder): decayed.
  assert optim.decay_mask({'mask_token': np.zeros((1, 1, 32))}, names)['mask_token']


def _flatten(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f'{prefix}{key}/')
    else:
      yield f'{prefix}{key}', value


def test_multistep_schedule_by_hand():
  config = load_config('configs/simmim.py', **{
      'batch_size': 512, 'warmup_steps': 10, 'total_steps': 100, 'optim.base_lr': 1e-3,
      'optim.milestones': (30, 50), 'optim.gamma': 0.1})
  assert config.optim.schedule == 'multistep'
  lr = optim.learning_rate(config)
  # Peak 1e-3 * 512 / 512; linear warmup from 0, then x0.1 from each milestone on (inclusive).
  want = {0: 0.0, 5: 5e-4, 10: 1e-3, 29: 1e-3, 30: 1e-4, 49: 1e-4, 50: 1e-5, 99: 1e-5}
  for step, value in want.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, atol=1e-12)


def test_simmim_recipes_use_their_sources_schedule():
  official = load_config('configs/simmim.py')
  # SimMIM's ViT-B yaml: MULTISTEPS [700] of 800 epochs; steps at batch 2048 of ImageNet-1k.
  assert official.optim.schedule == 'multistep'
  assert official.optim.milestones == (round(700 * 1_281_167 / 2048),)
  assert load_config('configs/simmim_mto.py').optim.schedule == 'cosine'  # MTO's Table 3
  assert load_config('configs/simmim_mto.py:cosine=false').optim.schedule == 'multistep'


def _train_params(config, steps):
  """Params (numpy) and the optimizer state's structure after `steps` train steps of `config` on
  one fixed synthetic batch, through the trainer's own step."""
  framework = registry.build(config)
  batch = runner.synthetic_batch(config)
  init_fn, _, tx, lr = train_step_lib.build(framework, config, batch)
  step = jax.jit(train_step_lib.make_train_step(framework, tx, lr))
  state = jax.jit(init_fn)()
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return (jax.tree_util.tree_map(np.asarray, state.params),
          jax.tree_util.tree_structure(state.opt_state),
          jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.shape, state.opt_state)), losses)


_TINY = {'model.variant': 'mu/4', 'batch_size': 4, 'data.image_size': 16, 'total_steps': 20,
         'warmup_steps': 2, 'model.dtype': 'float32'}


@pytest.mark.slow  # 10 steps of two train programs: about a minute on 2 cores
def test_flat_update_equals_per_leaf_update_in_the_train_step():
  """The flattened AdamW update (`optim.flat_update`) gives the per-leaf update's losses and
  parameters over 10 train steps, and stores the optimizer state in the same per-leaf layout (so a
  checkpoint of either restores in the other).

  The two programs fuse the backward pass differently, so gradients differ in float32 rounding.
  That stays at rounding level everywhere but in the attention's key biases, whose gradient is
  zero up to rounding (softmax ignores a constant per query): Adam scales that noise to lr-sized
  steps, so they are only checked to stay that small."""
  config = load_config('configs/mae.py:runlocal', **_TINY, **{'optim.flat_update': True})
  assert optim.flat_update_applies(config)
  flat = _train_params(config, 10)
  leaf = _train_params(load_config('configs/mae.py:runlocal', **_TINY), 10)
  assert flat[1] == leaf[1] and flat[2] == leaf[2]  # state layout: same tree, same shapes
  np.testing.assert_allclose(flat[3], leaf[3], rtol=1e-6)
  want = dict(_flatten(leaf[0]))
  bound = 2 * 10 * optim.peak_lr(config)
  for path, got in _flatten(flat[0]):
    if path.endswith('key/bias'):
      assert np.abs(got).max() <= bound and np.abs(want[path]).max() <= bound, path
    else:
      np.testing.assert_allclose(got, want[path], rtol=1e-6, atol=1e-8, err_msg=path)


@pytest.mark.slow  # about 35 s on 2 cores
def test_flat_update_equals_per_leaf_update_with_layer_decay_and_clipping():
  """Fed the same gradients, the flattened and per-leaf fine-tuning optimizers (a group per
  encoder depth and decay flag, global-norm clipping) keep equal parameters over 10 steps."""
  config = load_config('configs/finetune.py:runlocal', **_TINY,
                       **{'optim.grad_clip': 0.5, 'optim.flat_update': True})
  framework = registry.build(config)
  params = framework.init(jax.random.PRNGKey(0), {
      'image': np.zeros((2, 16, 16, 3), np.float32), 'label': np.zeros(2, np.int32)})[0]
  flat_tx, _ = optim.make_optimizer(config, params, framework.no_weight_decay)
  config.optim.flat_update = False
  leaf_tx, _ = optim.make_optimizer(config, params, framework.no_weight_decay)

  def run(tx):
    @jax.jit
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    p, state = params, tx.init(params)
    for i in range(10):
      rng = np.random.default_rng(i)
      grads = jax.tree_util.tree_map(
          lambda x, rng=rng: rng.standard_normal(x.shape).astype(np.float32), p)
      p, state = step(p, state, grads)
    return p, state
  (p_flat, s_flat), (p_leaf, s_leaf) = run(flat_tx), run(leaf_tx)
  assert jax.tree_util.tree_structure(s_flat) == jax.tree_util.tree_structure(s_leaf)
  for (path, got), (_, want) in zip(_flatten(p_flat), _flatten(p_leaf)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=path)


def test_flat_update_is_off_with_fsdp():
  config = load_config('configs/mae.py:runlocal', **{'mesh.fsdp': 2, 'optim.flat_update': True})
  assert not optim.flat_update_applies(config)
  assert not optim.flat_update_applies(load_config('configs/mae.py:runlocal'))  # off by default
