"""Heterogeneity of masked tokens per layer (MTO eq. 2, Fig. 1) for any run with mask tokens.

The framework's own forward pass (masks from the run's seed) is run with per-layer captures; a
site qualifies when its layers hold every patch position, i.e. mask tokens stand in for the masked
patches: the encoder of SimMIM / distillation, the decoder of MAE.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import config_lib
from mimjax import frameworks
from mimjax.eval import features as features_lib
from mimjax.eval import plots

try:  # MTO's own definition once mimjax.methods.mto is present (branch `mto`).
  from mimjax.methods.mto import heterogeneity  # pylint: disable=g-import-not-at-top
except ImportError:
  import math  # pylint: disable=g-import-not-at-top

  def heterogeneity(x, mask, tau=None, layer_norm=True):
    """Eq. (2): mean over masked rows of the entropy of softmax(x_m . x_v / tau) over visible
    tokens v, features layer-normalised (no affine), tau = sqrt(D); MTO's default settings."""
    x = x.astype(jnp.float32)
    if layer_norm:
      x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
    logits = jnp.einsum('bnd,bmd->bnm', x, x) / (tau or math.sqrt(x.shape[-1]))
    visible = jnp.broadcast_to(~mask[:, None, :], logits.shape)
    logp = jax.nn.log_softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    entropy = -jnp.sum(jnp.where(visible, jnp.exp(logp) * logp, 0.0), axis=-1)
    rows = mask.astype(jnp.float32)
    return jnp.mean(jnp.sum(entropy * rows, -1) / jnp.maximum(rows.sum(-1), 1.0))

SITES = ('encoder', 'decoder')


def _site_layers(outputs, site, num_patches, num_prefix):
  """Per-layer patch tokens [B, N, D] of `site`, or None when it does not hold all N patches."""
  layers = (outputs.get(site) or {}).get('layers')
  if not layers:
    return None
  if site == 'encoder':  # the encoder's layers keep the prefix tokens; the decoder's do not
    layers = [t[:, num_prefix:] for t in layers]
  return layers if layers[0].shape[1] == num_patches else None


def protocol(run, num_images=None):
  """Heterogeneity H^l of layers l = 0 (input of the first block) .. L at each mask-token site,
  over the first `num_images` eval images; writes eval_heterogeneity.png."""
  config = run.config
  num_images = num_images or config.eval.analysis_examples
  framework = frameworks.build(config, captures=('encoder_layers', 'decoder_layers'))
  encoder = framework.build_encoder()
  rng = jax.random.PRNGKey(config.seed)

  def per_image(params, images):
    batch = dict(image=images, label=jnp.zeros(images.shape[:1], jnp.int32))
    _, _, outputs = framework.forward(params, run.model_state, batch, rng, False)
    if 'mask' not in outputs:
      return {}
    mask = outputs['mask']
    one = jax.vmap(lambda x, m: heterogeneity(x[None], m[None]))
    result = {}
    for site in SITES:
      layers = _site_layers(outputs, site, encoder.num_patches, encoder.num_prefix)
      if layers is not None:
        result[site] = jnp.stack([one(x, mask) for x in layers], axis=1)  # [B, layers]
    return result

  sums, count = {}, 0
  for out, valid, _ in features_lib.map_batches(run, config.data.eval_split, per_image,
                                                num_images):
    for site, h in out.items():
      sums[site] = sums.get(site, 0.0) + np.asarray(h, np.float64)[valid].sum(axis=0)
    count += int(valid.sum())
  if not sums:
    raise config_lib.ConfigError(
        f'framework {config.framework!r} of {run.workdir} has no mask tokens (no layer sees every '
        'patch position with masks); heterogeneity needs e.g. SimMIM, distill or MAE.')
  result = {site: (s / count).tolist() for site, s in sums.items()}
  png = plots.curves(list(result.values()), list(result), run.output_path('heterogeneity.png'),
                     'layer (0 = input of block 1)', 'heterogeneity H',
                     f'masked-token heterogeneity, step {run.step}')
  return dict(heterogeneity=result, images=count, plot=png)
