"""Optimizer recipes: weight-decay groups against the references' own grouping, the schedules."""
import numpy as np
import pytest

from conftest import load_config
from mimjax import optim
from mimjax import registry
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
