"""Feature-distillation framework: block masking, teachers (CLIP import, checkpoint, EMA), DTM."""
import json
import os

# open_clip imports torchvision, which aborts the process (duplicate LLVM options) when loaded after
# tensorflow; mimjax.train loads tensorflow, so open_clip comes first.
from open_clip import transformer as open_clip_transformer  # pylint: disable=g-bad-import-order
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, tiny_overrides

from mimjax import config_lib
from mimjax import errors
from mimjax import registry
from mimjax import masking
from mimjax import optim
from mimjax import teachers
from mimjax import train
from mimjax import validation
from mimjax.frameworks import simmim
from mimjax.interop import clip as clip_interop


def tiny(spec, steps=2, **overrides):
  """The config of `spec` shrunk to a test run of `steps` steps (conftest's tiny settings)."""
  return load_config(spec, **tiny_overrides(total_steps=steps, **{'checkpoint.async_save': False},
                                            **overrides))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize('grid,ratio,min_block', [(14, 0.4, 16), (7, 0.4, 4), (7, 0.75, 16)])
def test_block_mask_exact_count(grid, ratio, min_block):
  mask = masking.block_mask(jax.random.PRNGKey(0), 64, grid, ratio, min_block)
  assert mask.shape == (64, grid * grid)
  np.testing.assert_array_equal(mask.sum(1), round(ratio * grid * grid))
  # Masks differ between samples and keys.
  assert len({tuple(m) for m in np.asarray(mask)}) > 50


def test_block_mask_exact_count_of_the_reference():
  """--num_mask_patches 75 at 224 / 16: 75 patches, not round(0.4 * 196) = 78."""
  mask = masking.block_mask(jax.random.PRNGKey(3), 64, 14, 0.4, 16, num_masked=75)
  np.testing.assert_array_equal(mask.sum(1), 75)
  c = load_config('configs/distill.py:model=B/16,dtm,clip_path=/clip.pt')
  fw_mask = masking.block_mask(jax.random.PRNGKey(4), 8, 14, c.distill.mask_ratio,
                               c.distill.mask_min_block, num_masked=c.distill.mask_count)
  np.testing.assert_array_equal(fw_mask.sum(1), 75)


def test_recipe_learning_rate_follows_the_reference_code():
  """lr = 1.5e-3 * sqrt(1024 / 2048) at the paper's batch, 1e-6 at step 0, 1e-5 at the end."""
  c = load_config('configs/distill.py:model=B/16,dtm,clip_path=/clip.pt')
  assert c.batch_size == 1024
  lr = optim.learning_rate(c)
  np.testing.assert_allclose(optim.peak_lr(c), 1.5e-3 * np.sqrt(0.5), rtol=1e-12)
  np.testing.assert_allclose(float(lr(c.warmup_steps)), 1.5e-3 * np.sqrt(0.5), rtol=1e-6)
  # optax interpolates in float32 from the peak: an error of about one ulp of 1e-3 (1.2e-10).
  np.testing.assert_allclose(float(lr(0)), 1e-6, rtol=0, atol=2.5e-10)
  np.testing.assert_allclose(float(lr(c.total_steps)), 1e-5, rtol=0, atol=2.5e-10)
  c.unlock()
  c.optim.lr_scaling = 'linear'
  np.testing.assert_allclose(optim.peak_lr(c), 1.5e-3 * 0.5, rtol=1e-12)
  validation.validate(c)
  c.optim.lr_scaling = 'cubic'
  with pytest.raises(errors.ConfigError, match='optim.lr_scaling'):
    validation.validate(c)


def test_block_mask_is_blocky():
  # Masked patches of block masking touch other masked patches far more often than random ones.
  grid = 14
  mask = np.asarray(masking.block_mask(jax.random.PRNGKey(1), 32, grid)).reshape(-1, grid, grid)
  right = (mask[:, :, :-1] & mask[:, :, 1:]).sum() / mask[:, :, :-1].sum()
  assert right > 0.6  # a uniformly random 40% mask gives about 0.4


def _open_clip_tower(tmp_path, quick_gelu):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  act = open_clip_transformer.QuickGELU if quick_gelu else torch.nn.GELU
  tower = open_clip_transformer.VisionTransformer(
      image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0, output_dim=48,
      output_tokens=True, act_layer=act).eval()
  with torch.no_grad():  # open_clip initialises some tensors to 0/1: randomise everything
    for p in tower.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  path = str(tmp_path / 'clip.pt')
  torch.save({'visual.' + k: v for k, v in tower.state_dict().items()}, path)
  return tower, path


@pytest.mark.parametrize('quick_gelu', [True, False])
def test_clip_import_matches_open_clip(tmp_path, quick_gelu):
  import torch  # pylint: disable=g-import-not-at-top
  tower, path = _open_clip_tower(tmp_path, quick_gelu)
  images = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    pooled, tokens = tower(images)
    tokens = tokens @ tower.proj  # ln_post(patch tokens) @ proj
  model, params = clip_interop.load(path, quick_gelu=quick_gelu, num_heads=2)
  out = model.apply({'params': params}, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(out['tokens'], tokens.numpy(), atol=1e-4)
  np.testing.assert_allclose(out['pooled'], pooled.numpy(), atol=1e-4)


@pytest.mark.parametrize('own_norm', [True, False])
def test_clip_teacher_normalisation_and_targets(tmp_path, own_norm):
  """own_norm: CLIP sees its own normalisation; else the student's pixels as they are (the DTM
  reference code feeds CLIP ImageNet-normalised images)."""
  import torch  # pylint: disable=g-import-not-at-top
  tower, path = _open_clip_tower(tmp_path, True)
  c = tiny('configs/distill.py:runlocal,dtm')
  c.model.variant = 'mu/8'
  c.data.image_size = 32
  c.distill.teacher = 'clip'
  c.distill.clip_path = path
  c.distill.teacher_own_norm = own_norm
  framework = registry.build(c)
  framework.teacher.model = framework.teacher.model.clone(num_heads=2)
  raw = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
  student = (raw - np.array(c.data.mean)) / np.array(c.data.std)
  state = framework.teacher.load_frozen(framework.teacher.init_state(None))
  got = framework.teacher.targets(state, jnp.asarray(student, jnp.float32))
  clip_input = (raw - np.array(teachers.CLIP_MEAN)) / np.array(teachers.CLIP_STD)
  if not own_norm:
    clip_input = student
  with torch.no_grad():
    _, tokens = tower(torch.from_numpy(clip_input.transpose(0, 3, 1, 2).astype(np.float32)))
    want = (tokens @ tower.proj).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_gradient_reaches_student_only():
  c = tiny('configs/distill.py:runlocal,dtm')
  framework = registry.build(c)
  batch = {'image': jax.random.normal(jax.random.PRNGKey(0), (8, 28, 28, 3))}  # 8 DTM groups
  params, model_state = framework.init(jax.random.PRNGKey(1), batch)
  assert set(params) == {'encoder', 'mask_token', 'head'}
  assert set(model_state) == {'teacher'}
  loss_fn = lambda p, s: framework.loss(p, s, batch, jax.random.PRNGKey(2), 0)[0]  # noqa: E731
  g_params, g_teacher = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(params, model_state)
  norms = {k: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(v)))
           for k, v in g_params.items()}
  assert all(n > 0 for n in norms.values()), norms
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(g_teacher))


def test_ema_teacher_update():
  c = tiny('configs/distill.py:runlocal')
  framework = registry.build(c)
  batch = {'image': jnp.zeros((2, 28, 28, 3))}
  params, state = framework.init(jax.random.PRNGKey(0), batch)
  moved = jax.tree_util.tree_map(lambda x: x + 1.0, params)
  new = framework.update_state(moved, state, 0)
  m = c.distill.ema_momentum
  a = new['teacher']['embedding']['kernel']
  # x + 1.0 rounds at float32 precision near 1 (~6e-8 absolute), which is large relative to the
  # BEiT init's ~1e-3 weights: compare with an absolute tolerance at that scale.
  np.testing.assert_allclose(a, params['encoder']['embedding']['kernel'] + (1 - m), rtol=1e-6,
                             atol=1e-7)


def test_a_teacher_is_a_component_any_framework_can_hold():
  """Not a mix-in: a framework that only returns a teacher from `build_teacher` (here SimMIM, which
  has none) holds it in `framework.teacher`, and the base class initialises its weights in
  model_state['teacher'], moves them as an EMA of the encoder after an update and counts its pass
  in the step's FLOPs."""
  c = tiny('configs/simmim.py:runlocal', **{'distill.teacher': 'ema'})

  class SimMIMWithTeacher(simmim.SimMIM):
    def build_teacher(self):
      return teachers.build(self.config, self.num_patches)

  framework = SimMIMWithTeacher(c)
  assert isinstance(framework.teacher, teachers.EMATeacher)
  assert registry.build(c).teacher is None
  params, state = framework.init(jax.random.PRNGKey(0), {'image': jnp.zeros((2, 28, 28, 3))})
  start = params['encoder']['embedding']['kernel']
  np.testing.assert_array_equal(state['teacher']['embedding']['kernel'], start)
  moved = jax.tree_util.tree_map(lambda x: x + 1.0, params)
  new = framework.update_state(moved, state, 0)['teacher']['embedding']['kernel']
  # m * start + (1 - m) * (start + 1); x + 1.0 rounds at float32 precision near 1 (~6e-8).
  np.testing.assert_allclose(new, start + (1 - c.distill.ema_momentum), rtol=1e-6, atol=1e-7)
  assert 'teacher' in framework.step_flops() and 'teacher' not in registry.build(c).step_flops()


def test_dtm_needs_teacher_features():
  c = load_config('configs/mae.py:runlocal')
  c.dtm.enabled = True
  with pytest.raises(errors.ConfigError, match='mae.target'):
    validation.validate(c)


@pytest.mark.slow  # 40 steps; as for LUT and MTO, a plug-in's learning check is slow
def test_runlocal_distill_dtm_ema_loss_decreases(tmp_path):
  c = tiny('configs/distill.py:runlocal,dtm', steps=40)
  c.batch_size = 32
  c.log.every_steps = 10
  train.train(c, str(tmp_path))
  metrics = read_metrics(str(tmp_path))
  assert metrics[-1]['loss'] < 0.9 * metrics[0]['loss'], metrics
  assert metrics[0]['loss'] == metrics[0]['loss_dtm']  # DTM replaced the token-wise loss
  assert 0 < metrics[-1]['dtm_merges'] < 49


def test_checkpoint_teacher_without_checkpoints_names_the_key(tmp_path):
  teacher_dir = tmp_path / 'mae'
  teacher_dir.mkdir()
  (teacher_dir / 'config.json').write_text(config_lib.to_json(tiny('configs/mae.py:runlocal')))
  c = tiny(f'configs/distill.py:runlocal,teacher=checkpoint,teacher_workdir={teacher_dir}')
  teacher = registry.build(c).teacher
  with pytest.raises(errors.ConfigError, match='config.distill.teacher_workdir=.*No checkpoint'):
    teacher.load_frozen(teacher.init_state(None))
  assert sorted(os.listdir(teacher_dir)) == ['config.json']  # reading created nothing


@pytest.mark.slow
def test_checkpoint_teacher_and_mae_teacher_target(tmp_path):
  teacher_dir = str(tmp_path / 'mae')
  train.train(tiny('configs/mae.py:runlocal'), teacher_dir)
  # The distill student's teacher holds exactly the MAE run's encoder.
  c = tiny(f'configs/distill.py:runlocal,teacher=checkpoint,teacher_workdir={teacher_dir}')
  framework = registry.build(c)
  state = framework.teacher.load_frozen(framework.teacher.init_state(None))
  from mimjax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(teacher_dir)
  saved = ckpt.restore(ckpt.latest_step(), None)['params']['encoder']
  ckpt.close()
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(saved)):
    np.testing.assert_array_equal(a, b)
  train.train(c, str(tmp_path / 'distill'))
  # MAE + checkpoint teacher + DTM: the decoder predicts teacher tokens.
  m = tiny('configs/mae.py:runlocal')
  m.mae.target = 'teacher'
  m.distill.teacher = 'checkpoint'
  m.distill.teacher_workdir = teacher_dir
  m.dtm.enabled = True
  last = train.train(m, str(tmp_path / 'mae_dtm'))
  assert np.isfinite(last['loss_dtm']) and last['loss'] == last['loss_dtm']
