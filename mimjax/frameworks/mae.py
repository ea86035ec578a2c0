"""MAE (He et al., 2022): encode a random 25% of the patches, reconstruct the rest in pixels.

With `mae.target = 'teacher'` the decoder predicts the tokens of the `config.distill` teacher
instead ("MAE + CLIP"), with the `config.distill` feature loss."""
import flax.linen as nn
import jax
import ml_collections

from mimjax import errors
from mimjax import losses
from mimjax import masking
from mimjax import teachers
from mimjax.frameworks import base
from mimjax.models import flops
from mimjax.models import mae_decoder
from mimjax.models import vit


class MAEModel(nn.Module):
  """Encoder on visible patches + MAE decoder. Params: encoder/..., decoder/..."""
  encoder: vit.ViT
  decoder: mae_decoder.MAEDecoder

  def __call__(self, images, keep_idx, train=False, capture=frozenset()):
    enc = self.encoder(images, keep_idx=keep_idx, train=train,
                       capture_layers='encoder_layers' in capture,
                       capture_attention='encoder_attention' in capture)
    dec = self.decoder(enc['tokens'], keep_idx, train, 'decoder_layers' in capture)
    return enc, dec


TARGETS = ('pixels', 'teacher')  # what the decoder predicts: patches, or the teacher's tokens


class MAE(base.Framework):
  """Masked autoencoder with per-patch (optionally normalised) pixel or teacher-token targets."""
  name = 'mae'
  # MAE's and LUT's main_pretrain.py call timm's add_weight_decay without a skip list: cls and
  # mask tokens are decayed.
  no_weight_decay = ()

  @classmethod
  def config_fields(cls):
    """`config.mae`: mask ratio, pixel target, the decoder."""
    s = ml_collections.ConfigDict()
    s.mask_ratio = 0.75
    s.norm_pix_loss = True
    s.decoder_width = 512
    s.decoder_depth = 8
    s.decoder_heads = 16
    s.decoder_mlp_ratio = 4
    s.target = 'pixels'  # pixels | teacher (decoder predicts the config.distill teacher's tokens)
    return s

  @classmethod
  def provides(cls, config):
    extra = {'mask', 'patch_order', 'decoder_mask_tokens', 'decoder_layers'}
    if config.mae.target == 'teacher':
      extra.add('teacher_features')
    return super().provides(config) | extra

  @classmethod
  def config_sections(cls, config):
    """`mae`, and `distill` (the teacher) when the decoder predicts teacher tokens."""
    teacher = {'distill'} if config.mae.target == 'teacher' else set()
    return super().config_sections(config) | teacher

  @classmethod
  def finetune_recipe(cls, config):
    """LUT's and MTO's papers fine-tune with MAE's Table 9 (`mae_lut`, `mae_mto`)."""
    return 'mae_lut' if config.lut.enabled else 'mae_mto' if config.mto.enabled else 'mae'

  @classmethod
  def check_config(cls, config):
    """The `config.mae` fields: a mask ratio that keeps a patch visible, a decoder that exists."""
    mae = config.mae
    errors.require_choice('mae.target', mae.target, TARGETS)
    num_patches = vit.grid_size(config.model, config.data.image_size) ** 2
    try:
      masking.num_kept(num_patches, mae.mask_ratio)
    except ValueError as e:
      raise errors.ConfigError(f'config.mae.mask_ratio={mae.mask_ratio!r}: {e}') from e
    for key in ('decoder_width', 'decoder_depth', 'decoder_heads', 'decoder_mlp_ratio'):
      errors.require(mae[key] >= 1, f'mae.{key}', mae[key], 'use a positive integer')
    errors.require(mae.decoder_width % mae.decoder_heads == 0, 'mae.decoder_heads',
                   mae.decoder_heads, f'it must divide mae.decoder_width={mae.decoder_width}')
    if mae.target == 'teacher':
      teachers.check_feature_config(config)

  def build_teacher(self):
    """The `config.distill` teacher when the decoder predicts its tokens (`mae.target`)."""
    if self.config.mae.target == 'teacher':
      return teachers.build(self.config, self.num_patches)
    return None

  def build_model(self):
    mae = self.config.mae
    encoder = vit.from_config(self.config)
    out_dim = self.patch_size ** 2 * self.config.data.channels
    if self.teacher is not None:
      out_dim = self.teacher.dim
    decoder = mae_decoder.MAEDecoder(
        width=mae.decoder_width, depth=mae.decoder_depth, num_heads=mae.decoder_heads,
        mlp_ratio=mae.decoder_mlp_ratio, grid_size=encoder.grid_size,
        out_dim=out_dim, num_prefix=int(encoder.cls_token),
        dtype=encoder.dtype)
    return MAEModel(encoder, decoder)

  @property
  def num_kept(self):
    """The visible patches: int(N * (1 - mask_ratio)), as MAE's code (`masking.num_kept`)."""
    return masking.num_kept(self.num_patches, self.config.mae.mask_ratio)

  def sample_order(self, rng, batch_size):
    """A random patch order per sample [B, N]; the encoder sees its first `num_kept` patches.

    The order is returned in `outputs.patch_order`, so a plug-in can take further views that are
    disjoint from MAE's (LUT) with `masking.keep_from_order`.
    """
    return masking.random_permutation(rng, batch_size, self.num_patches)

  def flop_terms(self):
    """The encoder on the kept patches, the decoder on all of them (`step_flops` adds a teacher's
    pass)."""
    kw, mae = self.encoder_kwargs, self.config.mae
    out_dim = kw['patch_size'] ** 2 * self.config.data.channels
    return {'encoder': flops.TRAIN_FACTOR * self.encoder_flops(self.num_kept),
            'decoder': flops.TRAIN_FACTOR * flops.mae_decoder(
                mae, kw['width'], self.num_patches, out_dim, int(kw['cls_token']))}

  def init_model(self, rng, batch):
    images = batch['image']
    order = self.sample_order(jax.random.PRNGKey(0), images.shape[0])
    keep_idx, _ = masking.keep_from_order(order, self.num_kept)
    return self.model.init(rng, images, keep_idx)['params']

  def forward(self, params, model_state, batch, rng, train):
    mask_rng, drop_rng = jax.random.split(rng)
    images = batch['image']
    order = self.sample_order(mask_rng, images.shape[0])
    keep_idx, mask = masking.keep_from_order(order, self.num_kept)
    enc, dec = self.model.apply({'params': self.model_params(params)}, images, keep_idx, train,
                                frozenset(self.captures), rngs={'dropout': drop_rng})
    outputs = base.ForwardOutputs(encoder=enc, image=images, mask=mask, patch_order=order,
                                  keep_idx=keep_idx, decoder=dec)
    if self.teacher is None:
      loss = losses.mae_loss(dec['pred'], images, mask, self.patch_size,
                             self.config.mae.norm_pix_loss)
      return loss, {}, outputs.replace(reconstruction=dec['pred'])
    d = self.config.distill
    features = base.FeatureTargets(pred=dec['pred'],
                                   target=self.teacher.targets(model_state['teacher'], images),
                                   mask=teachers.loss_mask(self.config, mask))
    loss = losses.feature_loss(features.pred, features.target, d.loss, features.mask,
                               d.norm_target)
    return loss, {}, outputs.replace(features=features)

  def visualize(self, outputs, batch):
    """Original | masked input | reconstruction | reconstruction with visible patches pasted; with
    norm_pix_loss the last two are the standardised target and prediction
    ('reconstruction_norm_pix', see visualize.norm_pix_reconstruction_grid)."""
    from mimjax import visualize  # pylint: disable=g-import-not-at-top
    if self.teacher is not None:
      return {}
    args = (batch['image'], outputs.reconstruction, outputs.mask, self.patch_size,
            self.config.data)
    if self.config.mae.norm_pix_loss:
      return {'reconstruction_norm_pix': visualize.norm_pix_reconstruction_grid(*args)}
    return {'reconstruction': visualize.reconstruction_grid(*args)}
