"""SimMIM (Xie et al., 2022): mask tokens replace random square cells of patches in the encoder; a
linear head regresses the raw pixels of every patch, and an L1 loss scores the masked ones."""
import math

import jax
import ml_collections

from mimjax import errors
from mimjax import losses
from mimjax import masking
from mimjax.frameworks import base
from mimjax.models import masked_encoder
from mimjax.models import vit


class SimMIM(base.Framework):
  """Inpainting-style MIM: the encoder sees every position, masked ones as the mask token."""
  name = 'simmim'
  # SimMIM's ViT skips pos_embed and cls_token only: its mask token is decayed.
  no_weight_decay = ('pos_embedding', 'cls')

  @classmethod
  def config_fields(cls):
    """`config.simmim`: mask ratio and mask cell size."""
    s = ml_collections.ConfigDict()
    s.mask_ratio = 0.6  # masked cells: ceil(cells * ratio), replaced by the mask token
    s.mask_patch_size = 32  # side of a mask cell in pixels; a multiple of the model's patch
    return s

  @classmethod
  def provides(cls, config):
    return super().provides(config) | {'mask', 'encoder_mask_tokens'}

  @classmethod
  def finetune_recipe(cls, config):
    """SimMIM's own fine-tuning yaml, with or without MTO."""
    return 'simmim_mto' if config.mto.enabled else 'simmim'

  @classmethod
  def check_config(cls, config):
    patch = vit.parse_variant(config.model.variant)['patch_size']
    cell = config.simmim.mask_patch_size
    if cell <= 0 or cell % patch:
      raise errors.ConfigError(
          f'config.simmim.mask_patch_size={cell} must be a positive multiple of the patch size '
          f'{patch} of model {config.model.variant!r} (SimMIM masks whole patches).')
    cells = math.ceil(config.data.image_size / cell) ** 2
    try:
      masking.num_masked_cells(cells, config.simmim.mask_ratio)
    except ValueError as e:
      raise errors.ConfigError(f'config.simmim.mask_ratio: {e}') from e

  def build_model(self):
    return masked_encoder.MaskedEncoderWithHead(
        vit.from_config(self.config), out_dim=self.patch_size ** 2 * self.config.data.channels,
        # models/simmim.py: self._trunc_normal_(self.mask_token, std=.02), cut at +-1 std
        mask_token_init=vit.beit_normal(), head_init=vit.xavier)

  def sample_mask(self, rng, batch_size):
    """bool [B, N], True where the mask token replaces the patch."""
    return masking.random_cells(rng, batch_size, self.grid_size,
                                self.config.simmim.mask_patch_size // self.patch_size,
                                self.config.simmim.mask_ratio)

  def init_model(self, rng, batch):
    images = batch['image']
    mask = self.sample_mask(jax.random.PRNGKey(0), images.shape[0])
    return self.model.init(rng, images, mask)['params']

  def forward(self, params, model_state, batch, rng, train):
    del model_state
    mask_rng, drop_rng = jax.random.split(rng)
    images = batch['image']
    mask = self.sample_mask(mask_rng, images.shape[0])
    enc, pred = self.model.apply({'params': self.model_params(params)}, images, mask, train,
                                 frozenset(self.captures), rngs={'dropout': drop_rng})
    loss = losses.simmim_loss(pred, images, mask, self.patch_size)
    return loss, {}, base.ForwardOutputs(encoder=enc, image=images, mask=mask,
                                         reconstruction=pred)

  def visualize(self, outputs, batch):
    """Original | masked input | reconstruction | reconstruction with visible patches pasted."""
    from mimjax import visualize  # pylint: disable=g-import-not-at-top
    return {'reconstruction': visualize.reconstruction_grid(
        batch['image'], outputs.reconstruction, outputs.mask, self.patch_size, self.config.data)}
