"""Feature-distillation MIM (BEiT v2 / FD-CLIP style): a masked student predicts teacher tokens.

The student is the mimjax ViT with a learned mask token substituted for block-masked patches inside
the encoder (all patches + cls are encoded), then the final norm and a linear head from the encoder
width to the teacher width on every patch token (cls is not supervised). The teacher (CLIP, a
mimjax checkpoint or an EMA of the student; `mimjax.teachers`) sees the unmasked image.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mimjax import errors
from mimjax import losses
from mimjax import masking
from mimjax import teachers
from mimjax.frameworks import base
from mimjax.models import vit

trunc_normal = nn.initializers.truncated_normal(0.02)


class DistillModel(nn.Module):
  """Params: encoder/..., mask_token [1, 1, width], head/{kernel, bias}."""
  encoder: vit.ViT
  out_dim: int

  @nn.compact
  def __call__(self, images, mask, train=False, capture=frozenset()):
    mask_token = self.param('mask_token', trunc_normal, (1, 1, self.encoder.width))
    enc = self.encoder(images, mask=mask, mask_token=mask_token, train=train,
                       capture_layers='encoder_layers' in capture,
                       capture_attention='encoder_attention' in capture)
    pred = nn.Dense(self.out_dim, dtype=self.encoder.dtype, kernel_init=trunc_normal,
                    name='head')(enc['patch_tokens'])
    return enc, pred.astype(jnp.float32)


def check_feature_config(config):
  """Start-up checks of the config.distill loss and masking options."""
  d = config.distill
  if d.loss not in losses.DISTANCES:
    raise errors.ConfigError(f'config.distill.loss={d.loss!r}; use one of {losses.DISTANCES}.')
  if d.loss_tokens not in ('all', 'masked'):
    raise errors.ConfigError(f'config.distill.loss_tokens={d.loss_tokens!r}; use "all" or '
                                 '"masked".')
  if not 0 < d.mask_ratio < 1:
    raise errors.ConfigError(f'config.distill.mask_ratio must be in (0, 1), got '
                                 f'{d.mask_ratio}.')
  num_patches = (config.data.image_size // vit.parse_variant(config.model.variant)['patch_size'])**2
  if not 0 <= d.mask_count < num_patches:
    raise errors.ConfigError(f'config.distill.mask_count={d.mask_count} must be in [0, '
                             f'{num_patches}) for {num_patches} patches (0 = use mask_ratio).')


def loss_mask(config, mask):
  """The tokens the feature loss averages over: all (None) or the masked ones."""
  return mask if config.distill.loss_tokens == 'masked' else None


class Distill(teachers.WithTeacher, base.Framework):
  """Masked feature distillation with a token-wise loss (DTM replaces it when enabled)."""
  name = 'distill'

  @classmethod
  def check_config(cls, config):
    check_feature_config(config)

  def build_model(self):
    check_feature_config(self.config)
    self.teacher = teachers.build(self.config, self)
    return DistillModel(self.build_encoder(), self.teacher.dim)

  @property
  def grid_size(self):
    return self.image_size // self.patch_size

  def sample_mask(self, rng, batch_size):
    d = self.config.distill
    return masking.block_mask(rng, batch_size, self.grid_size, d.mask_ratio, d.mask_min_block,
                              num_masked=d.mask_count)

  def init_model(self, rng, batch):
    images = batch['image']
    mask = jnp.zeros((images.shape[0], self.grid_size ** 2), bool)
    return self.model.init(rng, images, mask)['params']

  def forward(self, params, model_state, batch, rng, train):
    mask_rng, drop_rng = jax.random.split(rng)
    images = batch['image']
    mask = self.sample_mask(mask_rng, images.shape[0])
    target = self.teacher.targets(model_state['teacher'], images)
    model_params = {k: params[k] for k in ('encoder', 'mask_token', 'head')}
    enc, pred = self.model.apply({'params': model_params}, images, mask, train,
                                 frozenset(self.captures), rngs={'dropout': drop_rng})
    d = self.config.distill
    feature_mask = loss_mask(self.config, mask)
    loss = losses.feature_loss(pred, target, d.loss, feature_mask, d.norm_target)
    outputs = dict(encoder=enc, mask=mask, feature_pred=pred, feature_target=target,
                   feature_mask=feature_mask)
    return loss, {}, outputs
