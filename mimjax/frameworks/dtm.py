"""DTM plug-in: replaces a framework's token-wise feature loss by the Dynamic Token Morphing loss.

Hosts put `feature_pred`, `feature_target` ([B, N, D]) and `feature_mask` (bool [B, N] or None)
in their outputs: the distill framework (CLIP, checkpoint or EMA teacher) and MAE with
`mae.target = 'teacher'`. Loss options (distance, masked tokens only, target normalisation) are the
host's `config.distill` ones, so DTM with no merges equals the host's own loss.
"""
import jax.numpy as jnp

from mimjax import config_lib
from mimjax.frameworks import base
from mimjax.methods import dtm


class DTM(base.Plugin):
  name = 'dtm'
  replaces_base_loss = True

  @classmethod
  def enabled(cls, config):
    return config.dtm.enabled

  @classmethod
  def check_config(cls, config):
    c = config.dtm
    if not (config.framework == 'distill' or
            (config.framework == 'mae' and config.mae.target == 'teacher')):
      raise config_lib.ConfigError(
          f'config.dtm.enabled needs teacher features to morph: use framework "distill", or '
          f'"mae" with config.mae.target="teacher" (got framework {config.framework!r}).')
    if c.scheduler not in dtm.SCHEDULERS:
      raise config_lib.ConfigError(f'config.dtm.scheduler={c.scheduler!r}; use one of '
                                   f'{dtm.SCHEDULERS}.')
    if c.num_schedules < 1 or c.max_rounds < 1 or c.min_tokens < 1:
      raise config_lib.ConfigError('config.dtm.num_schedules, max_rounds and min_tokens must be '
                                   '>= 1.')

  def loss(self, params, state, outputs, batch, rng, step, train):
    del params, state, batch, step, train
    c, d = self.config.dtm, self.config.distill
    pred = outputs['feature_pred']
    num_tokens = pred.shape[1]
    if c.min_tokens > num_tokens:
      raise config_lib.ConfigError(f'config.dtm.min_tokens={c.min_tokens} exceeds the '
                                   f'{num_tokens} tokens per image.')
    schedules = dtm.sample_schedules(rng, num_tokens, c.num_schedules, c.max_rounds,
                                     c.min_tokens, c.scheduler)
    loss = dtm.dtm_loss(pred, outputs['feature_target'], schedules, d.loss,
                        outputs['feature_mask'], d.norm_target, c.protect_first)
    metrics = {'loss_dtm': loss, 'dtm_merges': schedules.sum(-1).astype(jnp.float32).mean()}
    return c.weight * loss, metrics, None
