"""Feature-distillation MIM (BEiT v2 / FD-CLIP style): a masked student predicts teacher tokens.

The student is the mimjax ViT with a learned mask token substituted for block-masked patches inside
the encoder (all patches + cls are encoded), then the final norm and a linear head from the encoder
width to the teacher width on every patch token (cls is not supervised). The teacher (CLIP, a
mimjax checkpoint or an EMA of the student; `mimjax.teachers`) sees the unmasked image.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax import errors
from mimjax import losses
from mimjax import masking
from mimjax import teachers
from mimjax.frameworks import base
from mimjax.models import masked_encoder
from mimjax.models import vit

trunc_normal = nn.initializers.truncated_normal(0.02)


class Distill(base.Framework):
  """Masked feature distillation with a token-wise loss (DTM replaces it when enabled)."""
  name = 'distill'
  # BEiT v2's no_weight_decay(): pos_embed and cls_token (the mask token is decayed).
  no_weight_decay = ('pos_embedding', 'cls')

  @classmethod
  def config_fields(cls):
    """`config.distill`: the teacher, the block-wise mask and the token-wise loss (MAE's decoder
    predicts this teacher's tokens with this loss under mae.target='teacher')."""
    s = ml_collections.ConfigDict()
    s.teacher = 'ema'  # ema (of the student) | checkpoint (a mimjax workdir) | clip
    s.clip_path = ml_collections.FieldReference(None, field_type=str)  # local CLIP weights
    s.clip_quick_gelu = True  # QuickGELU: OpenAI weights; False for open_clip GELU models
    s.teacher_workdir = ml_collections.FieldReference(None, field_type=str)  # checkpoint
    s.teacher_layer = -1  # ema/checkpoint: -1 = after the final norm; k = block k output
    s.teacher_dtype = 'auto'  # the teacher's compute dtype, as model.dtype
    s.teacher_own_norm = True  # re-normalise inputs with the teacher's mean/std (CLIP's)
    s.ema_momentum = 0.999  # ema teacher: t <- m * t + (1 - m) * student
    s.mask_ratio = 0.4  # BEiT block-wise masking: round(ratio * N) patches masked
    s.mask_count = 0  # > 0: exactly this many masked patches (reference: 75); 0: mask_ratio
    s.mask_min_block = 16  # minimum patches per masked block
    s.loss = 'cosine'  # per-token distance: cosine | smooth_l1 (beta 2) | l1 | l2
    s.loss_tokens = 'all'  # all | masked: tokens the loss averages over
    s.norm_target = False  # standardise each target token (after morphing under DTM)
    return s

  @classmethod
  def provides(cls, config):
    return super().provides(config) | {'mask', 'teacher_features'}

  @classmethod
  def finetune_recipe(cls, config):
    """DTM's evaluation recipe, with or without DTM."""
    return 'distill_dtm' if config.dtm.enabled else 'distill'

  @classmethod
  def check_config(cls, config):
    teachers.check_feature_config(config)
    num_patches = vit.grid_size(config.model, config.data.image_size) ** 2
    if not 0 <= config.distill.mask_count < num_patches:
      raise errors.ConfigError(
          f'config.distill.mask_count={config.distill.mask_count} must be in [0, {num_patches}) '
          f'for {num_patches} patches (0 = use mask_ratio).')

  def build_teacher(self):
    return teachers.build(self.config, self.num_patches)

  def build_model(self):
    return masked_encoder.MaskedEncoderWithHead(
        vit.from_config(self.config), out_dim=self.teacher.dim, mask_token_init=trunc_normal,
        head_init=trunc_normal)

  def sample_mask(self, rng, batch_size):
    d = self.config.distill
    return masking.block_mask(rng, batch_size, self.grid_size, d.mask_ratio, d.mask_min_block,
                              num_masked=d.mask_count)

  def init_model(self, rng, batch):
    images = batch['image']
    mask = jnp.zeros((images.shape[0], self.num_patches), bool)
    return self.model.init(rng, images, mask)['params']

  def forward(self, params, model_state, batch, rng, train):
    mask_rng, drop_rng = jax.random.split(rng)
    images = batch['image']
    mask = self.sample_mask(mask_rng, images.shape[0])
    target = self.teacher.targets(model_state['teacher'], images)
    enc, pred = self.model.apply({'params': self.model_params(params)}, images, mask, train,
                                 frozenset(self.captures), rngs={'dropout': drop_rng})
    d = self.config.distill
    features = base.FeatureTargets(pred=pred, target=target,
                                   mask=teachers.loss_mask(self.config, mask))
    loss = losses.feature_loss(pred, target, d.loss, features.mask, d.norm_target)
    return loss, {}, base.ForwardOutputs(encoder=enc, image=images, mask=mask, features=features)
