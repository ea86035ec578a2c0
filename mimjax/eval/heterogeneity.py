"""Heterogeneity of masked tokens per layer (MTO eq. 2, Fig. 1) for any run with mask tokens.

The framework's own forward pass (masks from the run's seed) is run with per-layer captures of
its mask-token sites (`Framework.mask_token_sites`: the encoder of SimMIM, the decoder of MAE), and
`mimjax.plugins.mto.heterogeneity` is measured at every layer, image by image, with the run's own
`config.mto` affinity settings (eq. 2 on raw features by default).
"""
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import errors
from mimjax import registry
from mimjax.eval import features as features_lib
from mimjax.eval import plots
from mimjax.models import vit
from mimjax.plugins import mto


def _site_layers(outputs, site, num_prefix):
  """Per-layer patch tokens [B, N, D] of `site` (the encoder's layers keep prefix tokens)."""
  layers = getattr(outputs, site)['layers']
  return [t[:, num_prefix:] for t in layers] if site == 'encoder' else layers


def protocol(run, num_images=None):
  """Heterogeneity H^l of layers l = 0 (input of the first block) .. L at each mask-token site,
  over the first `num_images` eval images; writes eval_heterogeneity.png."""
  config = run.config
  num_images = num_images or config.eval.analysis_examples
  sites = registry.FRAMEWORKS[config.framework].mask_token_sites(config)
  if not sites:
    raise errors.ConfigError(
        f'framework {config.framework!r} of {run.workdir} has no mask tokens; heterogeneity '
        'needs a framework with mask tokens (simmim, mae).')
  framework = registry.build(config, captures=[f'{site}_layers' for site in sites])
  num_prefix = vit.from_config(config).num_prefix
  rng = jax.random.PRNGKey(config.seed)
  kw = mto.affinity_options(config.mto)  # the run's own affinity (eq. 2 by default)
  one = jax.vmap(lambda x, m: mto.heterogeneity(x[None], m[None], **kw))

  def per_image(params, images):
    batch = dict(image=images, label=jnp.zeros(images.shape[:1], jnp.int32))
    _, _, outputs = framework.forward(params, run.model_state, batch, rng, False)
    return {site: jnp.stack([one(x, outputs.mask) for x in
                             _site_layers(outputs, site, num_prefix)], axis=1)  # [B, layers]
            for site in sites}

  sums, count = {}, 0
  for out, valid, _ in features_lib.map_batches(run, config.data.eval_split, per_image,
                                                num_images):
    for site, h in out.items():
      sums[site] = sums.get(site, 0.0) + np.asarray(h, np.float64)[valid].sum(axis=0)
    count += int(valid.sum())
  result = {site: (s / count).tolist() for site, s in sums.items()}
  png = plots.curves(list(result.values()), list(result), run.output_path('heterogeneity.png'),
                     'layer (0 = input of block 1)', 'heterogeneity H',
                     f'masked-token heterogeneity, step {run.step}')
  return dict(heterogeneity=result, images=count, plot=png)
