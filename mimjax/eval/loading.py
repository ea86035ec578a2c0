"""Loading a finished (or running) training run from its workdir for evaluation.

Encoder params and config are all that frozen-encoder protocols and analyses need, so loading
reads only those: no framework (no teacher file or teacher workdir), no training pipeline, no
optimizer state. The framework and the full params are built on first use, by the protocols that
run the training objective (reconstruction, heterogeneity).
"""
import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import errors
from mimjax import registry
from mimjax import validation
from mimjax import workdir_io
from mimjax.data import fit
from mimjax.models import vit


@dataclasses.dataclass
class Run:
  config: Any
  encoder_params: Any  # host numpy arrays of params['encoder']
  step: int  # 0 for a randomly initialised model
  workdir: str
  random_init: bool = False
  # (split, feature) -> (features, labels) already extracted from these params, so that
  # protocols run on one loaded Run (kNN and linear probe) share a pass over the data.
  features: dict = dataclasses.field(default_factory=dict, repr=False)

  def output_path(self, name):
    """WORKDIR/eval_<name> for files a protocol writes; '_random_init' marks the baseline's."""
    stem, ext = os.path.splitext(name)
    return str(workdir_io.path(self.workdir,
                               f'eval_{stem}{"_random_init" if self.random_init else ""}{ext}'))

  @functools.cached_property
  def encoder(self):
    """The ViT that `encoder_params` belong to."""
    return vit.from_config(self.config)

  @functools.cached_property
  def framework(self):
    """The training framework, for protocols that run its objective (it may load a teacher)."""
    return registry.build(self.config)

  @functools.cached_property
  def params(self):
    """All params of the trained model (decoder, plug-in heads included)."""
    if self.random_init:
      return self._random_model[0]
    return checkpoint_lib.restore(self.workdir, self.step, 'params')[0]

  @functools.cached_property
  def model_state(self):
    """The non-trained state of the trained model (EMA copies, teachers)."""
    if self.random_init:
      return self._random_model[1]
    return checkpoint_lib.restore(self.workdir, self.step, 'model_state')[0]

  @functools.cached_property
  def _random_model(self):
    """(params, model_state) of the framework freshly initialised around `encoder_params`."""
    data = self.config.data
    batch = dict(image=np.zeros((2, data.image_size, data.image_size, data.channels), np.float32),
                 label=np.zeros((2,), np.int32))
    return self.framework.init(jax.random.PRNGKey(self.config.seed), batch,
                               pretrained={'encoder': self.encoder_params})


def random_encoder_params(config):
  """Encoder params freshly initialised from the run's seed (host numpy arrays)."""
  data = config.data
  images = np.zeros((1, data.image_size, data.image_size, data.channels), np.float32)
  params = jax.jit(vit.from_config(config).init)(
      jax.random.PRNGKey(config.seed), images)['params']
  return jax.tree_util.tree_map(np.asarray, params)


def eval_config(workdir, overrides=None):
  """(config, note): the run's config with `overrides` ({'eval.KEY': value}, mimjax.evaluate's
  --config.eval.*) applied and checked as training checks them, and its evaluation sizes fitted
  to the data (`fit.note` of the changes, '' when none)."""
  config = config_lib.read_config(workdir)
  outside = sorted(k for k in overrides or {} if not k.startswith('eval.'))
  if outside:
    raise errors.ConfigError(f'mimjax.evaluate changes only config.eval.* settings, not '
                             f'{", ".join(outside)}: they would not match the trained run.')
  config.update_from_flattened_dict(dict(overrides or {}))
  validation.validate(config)
  return config, fit.note(fit.fit(config, training=False), config.data.name)


def load_run(workdir, step=None, random_init=False, config=None):
  """The config and encoder params of the checkpoint at `step` (latest by default) of a workdir.

  With `random_init`, the same architecture freshly initialised from the run's seed instead: the
  baseline that shows what pre-training bought. `config` (from `eval_config`) replaces the
  workdir's.
  """
  config = config or config_lib.read_config(workdir)
  if random_init:
    return Run(config, random_encoder_params(config), 0, workdir, True)
  params, step = checkpoint_lib.restore(workdir, step)
  return Run(config, params['encoder'], step, workdir)
