"""Supervised ViT classification, DeiT-style (Touvron et al., 2021).

Cross-entropy on mixup / cutmix-mixed, label-smoothed targets (mixing done on device from the step
rng), drop path in the encoder; RandAugment and random erasing run in the input pipeline
(`data.augment='deit'`). Held-out top-1 / top-5 come from `eval_metrics`.
"""
import jax
import jax.numpy as jnp
import ml_collections

from mimjax import errors
from mimjax import losses
from mimjax import mixup
from mimjax.frameworks import base
from mimjax.models import vit


class Supervised(base.Framework):
  """ViT with a classification head (`params['encoder']['head']`)."""
  name = 'supervised'
  # timm's VisionTransformer.no_weight_decay() (DeiT, MAE/LUT fine-tuning): pos_embed, cls_token.
  no_weight_decay = ('pos_embedding', 'cls')
  best_metric = 'top1'

  @classmethod
  def config_fields(cls):
    """`config.supervised`: label smoothing, mixup and cutmix."""
    s = ml_collections.ConfigDict()
    s.label_smoothing = 0.1
    s.mixup_alpha = 0.8  # Beta(a, a) mixing weight of mixup; 0 = no mixup
    s.cutmix_alpha = 1.0  # Beta(a, a) area weight of cutmix; 0 = no cutmix
    s.mix_prob = 1.0  # probability that a batch is mixed at all
    s.switch_prob = 0.5  # probability of cutmix rather than mixup when both are on
    return s

  @classmethod
  def check_config(cls, config):
    if config.model.num_classes < 1:
      raise errors.ConfigError(
          'framework="supervised" needs config.model.num_classes > 0 (the number of classes of '
          f'config.data.name={config.data.name!r}, e.g. 1000 for imagenet2012).')
    s = config.supervised
    errors.require(0 <= s.label_smoothing < 1, 'supervised.label_smoothing', s.label_smoothing,
                   'use a fraction in [0, 1)')
    for key in ('mixup_alpha', 'cutmix_alpha'):
      errors.require(s[key] >= 0, f'supervised.{key}', s[key], 'use >= 0 (0 = off)')
    for key in ('mix_prob', 'switch_prob'):
      errors.require(0 <= s[key] <= 1, f'supervised.{key}', s[key], 'use a probability in [0, 1]')

  def build_model(self):
    return vit.from_config(self.config)

  def init_model(self, rng, batch):
    return {'encoder': self.model.init(rng, batch['image'])['params']}

  def forward(self, params, model_state, batch, rng, train):
    del model_state
    mix_rng, drop_rng = jax.random.split(rng)
    s = self.config.supervised
    images = batch['image']
    targets = losses.smooth_labels(batch['label'], self.config.model.num_classes,
                                   s.label_smoothing)
    if train:
      images, targets, _ = mixup.mix(mix_rng, images, targets, s.mixup_alpha, s.cutmix_alpha,
                                     s.switch_prob, s.mix_prob)
    enc = self.model.apply({'params': params['encoder']}, images, train=train,
                           capture_layers='encoder_layers' in self.captures,
                           capture_attention='encoder_attention' in self.captures,
                           rngs={'dropout': drop_rng})
    loss = losses.soft_cross_entropy(enc['logits'], targets)
    return loss, {}, base.ForwardOutputs(encoder=enc, image=images)

  def eval_metrics(self, params, model_state, batch):
    """Correct top-1 / top-5 counts over the valid examples, and their number."""
    del model_state
    logits = self.model.apply({'params': params['encoder']}, batch['image'])['logits']
    valid = batch['valid'].astype(jnp.float32)
    labels = batch['label']
    _, top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    hit = top5 == labels[:, None]
    return {'top1': jnp.sum(hit[:, 0] * valid), 'top5': jnp.sum(hit.any(-1) * valid),
            'count': jnp.sum(valid)}
