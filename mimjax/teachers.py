"""Frozen feature teachers for distillation: CLIP's image tower, a mimjax checkpoint or an EMA
student.

A teacher is a component its framework builds and holds (`Framework.build_teacher`; `__init__` sets
`framework.teacher`); the framework base class keeps its weights in `model_state['teacher']` (never
trained; saved with checkpoints), loads and updates them and counts its FLOPs. A teacher maps the
student's normalised images to target tokens [B, N, dim] in float32 without gradient, computed in
its own dtype and, by default, its own input normalisation.
"""
import abc
import os

import jax
import jax.numpy as jnp

from mimjax import checkpoint as checkpoint_lib
from mimjax import errors
from mimjax import losses
from mimjax import workdir as workdir_lib
from mimjax.interop import clip as clip_interop
from mimjax.models import flops
from mimjax.models import vit

TEACHERS = ('ema', 'checkpoint', 'clip')
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def ema_update(target, online, momentum):
  """momentum * target + (1 - momentum) * online, leaf by leaf (EMA teachers, LUT's context)."""
  return jax.tree_util.tree_map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


def _zeros_like_shapes(shapes):
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class Teacher(abc.ABC):
  """Interface; see the module docstring."""
  dim: int

  def __init__(self, config, num_patches):
    self.config = config
    self.num_patches = num_patches

  @abc.abstractmethod
  def init_state(self, params):
    """The teacher's weights (placeholders of the right shapes for frozen teachers)."""

  def load_frozen(self, state):
    """Host weights that replace the placeholders of `init_state` (identity for EMA)."""
    return state

  def update(self, state, params):
    """State after an optimizer step of the student (identity for frozen teachers)."""
    del params
    return state

  def flop_terms(self, channels):
    """Analytic forward FLOPs per example of the teacher's pass, when it is a mimjax ViT (EMA,
    checkpoint); CLIP's tower is not counted."""
    del channels
    return {}

  @abc.abstractmethod
  def targets(self, state, images):
    """Target tokens [B, N, dim], float32, without gradient, for student-normalised images."""

  def _check_grid(self, grid, name):
    if grid ** 2 != self.num_patches:
      raise errors.ConfigError(
          f'The {name} teacher has a {grid}x{grid} patch grid but the student has '
          f'{self.num_patches} patches; set data.image_size and model.variant so that the grids '
          'match (e.g. 224 px with patch 16 for a CLIP ViT-B/16 teacher).')

  def _input(self, images, mean, std, image_size):
    """Student-normalised images -> the teacher's normalisation and resolution."""
    images = images.astype(jnp.float32)
    if self.config.distill.teacher_own_norm:
      data = self.config.data
      raw = images * jnp.asarray(data.std) + jnp.asarray(data.mean)
      images = (raw - jnp.asarray(mean)) / jnp.asarray(std)
    if images.shape[1] != image_size:
      images = jax.image.resize(images, (images.shape[0], image_size, image_size,
                                         images.shape[-1]), 'bilinear')
    return images


class _EncoderTeacher(Teacher):
  """A mimjax ViT teacher: tokens after the final norm (layer -1) or block `layer`'s output.

  Its encoder is the ViT of `source_config` (the student's or the teacher run's) without drop
  path, in config.distill.teacher_dtype, with `overrides`.
  """

  def __init__(self, config, num_patches, source_config, **overrides):
    super().__init__(config, num_patches)
    self.encoder = encoder = vit.from_config(
        source_config, drop_path=0.0, dtype=vit.compute_dtype(config.distill.teacher_dtype),
        **overrides)
    self.dim = encoder.width
    self.layer = config.distill.teacher_layer
    if not -1 <= self.layer < encoder.depth:
      raise errors.ConfigError(
          f'config.distill.teacher_layer={self.layer} is out of range for a {encoder.depth}-block '
          'teacher; use -1 (after the final norm) or a block index in [0, depth).')

  def flop_terms(self, channels):
    """The teacher's encoder forward on every patch (frozen: x 1, not flops.TRAIN_FACTOR)."""
    e = self.encoder
    kw = dict(image_size=e.image_size, patch_size=e.patch_size, width=e.width, depth=e.depth,
              mlp_dim=e.mlp_dim, cls_token=e.cls_token)
    return {'teacher': flops.encoder(kw, channels, e.num_patches)}

  def encode(self, encoder_params, images):
    out = self.encoder.apply({'params': encoder_params}, images,
                             capture_layers=self.layer >= 0)
    if self.layer < 0:
      return out['patch_tokens']
    return out['layers'][self.layer + 1][:, int(self.encoder.cls_token):]


class EMATeacher(_EncoderTeacher):
  """Exponential moving average of the student's encoder (BYOL / data2vec style)."""

  def __init__(self, config, num_patches):
    super().__init__(config, num_patches, config)

  def init_state(self, params):
    return jax.tree_util.tree_map(jnp.copy, params['encoder'])

  def update(self, state, params):
    return ema_update(state, params['encoder'], self.config.distill.ema_momentum)

  def targets(self, state, images):
    return jax.lax.stop_gradient(self.encode(state, images).astype(jnp.float32))


class CheckpointTeacher(_EncoderTeacher):
  """The encoder of the latest checkpoint in a mimjax workdir (e.g. an MAE or supervised run)."""

  def __init__(self, config, num_patches):
    workdir = config.distill.teacher_workdir
    if not workdir:
      raise errors.ConfigError('config.distill.teacher="checkpoint" needs '
                               'config.distill.teacher_workdir=<a mimjax workdir>.')
    self.teacher_config = workdir_lib.read_encoder_config(workdir)
    super().__init__(config, num_patches, self.teacher_config, num_classes=0)
    self._check_grid(self.encoder.grid_size, 'checkpoint')
    self.workdir = workdir

  def init_state(self, params):
    del params
    image = jnp.zeros((1, self.encoder.image_size, self.encoder.image_size,
                       self.teacher_config.data.channels))
    return _zeros_like_shapes(jax.eval_shape(
        lambda: self.encoder.init(jax.random.PRNGKey(0), image)['params']))

  def load_frozen(self, state):
    try:
      restored = dict(checkpoint_lib.restore_params(self.workdir)['encoder'])
    except errors.CheckpointError as e:
      raise errors.ConfigError(f'config.distill.teacher_workdir={self.workdir!r}: {e}') from e
    restored.pop('head', None)  # a supervised run's classifier is no part of the teacher's tokens
    if checkpoint_lib.param_shapes(restored) != checkpoint_lib.param_shapes(state):
      raise errors.ConfigError(
          f'The encoder in {self.workdir} does not match its config.json (model '
          f'{self.teacher_config.model.variant}).')
    return restored

  def targets(self, state, images):
    data = self.teacher_config.data
    images = self._input(images, data.mean, data.std, self.encoder.image_size)
    return jax.lax.stop_gradient(self.encode(state, images).astype(jnp.float32))


class CLIPTeacher(Teacher):
  """CLIP image tower from a local PyTorch checkpoint; targets = ln_post(patch tokens) @ proj."""

  def __init__(self, config, num_patches):
    super().__init__(config, num_patches)
    path = config.distill.clip_path
    if not path or not os.path.exists(path):
      raise errors.ConfigError(
          f'config.distill.teacher="clip" needs config.distill.clip_path=<local CLIP checkpoint> '
          f'(OpenAI clip .pt or open_clip .bin/.safetensors); got {path!r}.')
    self.model, self.params = clip_interop.load(
        path, config.distill.clip_quick_gelu, dtype=vit.compute_dtype(config.distill.teacher_dtype))
    self.dim = self.model.out_dim
    self._check_grid(self.model.grid_size, 'CLIP')

  def init_state(self, params):
    del params
    return _zeros_like_shapes(jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), self.params))

  def load_frozen(self, state):
    del state
    return self.params

  def targets(self, state, images):
    images = self._input(images, CLIP_MEAN, CLIP_STD, self.model.image_size)
    out = self.model.apply({'params': state}, images)
    return jax.lax.stop_gradient(out['tokens'].astype(jnp.float32))


def build(config, num_patches):
  """The teacher named by config.distill.teacher for a student of `num_patches` patches."""
  kind = config.distill.teacher
  if kind == 'ema':
    return EMATeacher(config, num_patches)
  if kind == 'checkpoint':
    return CheckpointTeacher(config, num_patches)
  if kind == 'clip':
    return CLIPTeacher(config, num_patches)
  raise errors.ConfigError(f'config.distill.teacher={kind!r} is unknown; use one of '
                           f'{TEACHERS}.')


def check_feature_config(config):
  """Start-up checks of the config.distill teacher, loss and masking options."""
  d = config.distill
  errors.require_choice('distill.teacher', d.teacher, TEACHERS)
  errors.require_choice('distill.teacher_dtype', d.teacher_dtype, vit.DTYPES)
  errors.require(0 <= d.ema_momentum <= 1, 'distill.ema_momentum', d.ema_momentum,
                 'use a momentum in [0, 1]')
  errors.require(d.teacher_layer >= -1, 'distill.teacher_layer', d.teacher_layer,
                 'use -1 (after the final norm) or a block index >= 0')
  errors.require_choice('distill.loss', d.loss, losses.DISTANCES)
  errors.require_choice('distill.loss_tokens', d.loss_tokens, ('all', 'masked'))
  errors.require(0 < d.mask_ratio < 1, 'distill.mask_ratio', d.mask_ratio, 'use a ratio in (0, 1)')
  errors.require(d.mask_min_block >= 1, 'distill.mask_min_block', d.mask_min_block,
                 'use a positive number of patches')


def loss_mask(config, mask):
  """The tokens the feature loss averages over: all (None) or the masked ones."""
  return mask if config.distill.loss_tokens == 'masked' else None
