"""Loading a finished (or running) training run from its workdir for evaluation and export."""
import dataclasses
import os
from typing import Any

import jax

from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax import errors
from mimjax import registry
from mimjax import sharding
from mimjax import train_step as train_step_lib
from mimjax.data import pipeline


@dataclasses.dataclass
class Run:
  config: Any
  framework: Any
  params: Any
  model_state: Any
  step: int  # 0 for a randomly initialised model
  workdir: str
  random_init: bool = False
  # (split, feature, mesh) -> (features, labels) already extracted from these params, so that
  # protocols run on one loaded Run (kNN and linear probe) share a pass over the data.
  features: dict = dataclasses.field(default_factory=dict, repr=False)

  def output_path(self, name):
    """WORKDIR/eval_<name> for files a protocol writes; '_random_init' marks the baseline's."""
    stem, ext = os.path.splitext(name)
    return os.path.join(self.workdir,
                        f'eval_{stem}{"_random_init" if self.random_init else ""}{ext}')


def read_config(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise errors.CheckpointError(
        f'{path} does not exist: --workdir must be the directory a mimjax.train run wrote.')
  with open(path) as f:
    return config_lib.from_json(f.read())


def load_run(workdir, step=None, random_init=False, mesh=None):
  """Params and model state of the checkpoint at `step` (latest by default) of a workdir.

  With `random_init`, the same architecture freshly initialised from the run's seed instead: the
  baseline that shows what pre-training bought.
  """
  config = read_config(workdir)
  framework = registry.build(config)
  mesh = mesh or sharding.make_mesh(config.mesh)
  sample = jax.tree_util.tree_map(lambda x: x[:2], next(pipeline.train_batches(config, 0)))
  init_fn, abstract_state, _, _ = train_step_lib.build(framework, config, sample)
  shardings = train_step_lib.state_shardings(abstract_state, mesh, config.mesh)
  if random_init:
    state = jax.jit(init_fn, out_shardings=shardings)()
    return Run(config, framework, state.params, state.model_state, 0, workdir, True)
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise errors.CheckpointError(f'No checkpoint in {ckpt.directory}; train first.')
    ckpt.check_compatible(step, abstract_state.params, config.framework)
    state = ckpt.restore(step, train_step_lib.with_shardings(abstract_state, shardings))
  finally:
    ckpt.close()
  return Run(config, framework, state.params, state.model_state, int(step), workdir)
