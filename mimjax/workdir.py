"""A training workdir read back: its config, which with `vit.from_config` (the encoder its
checkpoints' params fit) and `checkpoint.restore` (the latest or a given checkpoint's params) is
all evaluation, export and pictures need: no framework, teacher, data pipeline or optimizer state.
"""
from mimjax import config_lib
from mimjax import errors
from mimjax import workdir_io


def read_config(workdir):
  """The locked config a mimjax.train run wrote to WORKDIR/config.json (local or gs://)."""
  workdir_io.check_reachable(workdir)
  path = workdir_io.path(workdir, 'config.json')
  if not path.exists():
    raise errors.CheckpointError(
        f'{path} does not exist: --workdir must be the directory a mimjax.train run wrote.')
  return config_lib.from_json(path.read_text())
