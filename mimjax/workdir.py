"""A training workdir's config.json read back, below the frameworks: its values as saved, and the
encoder part of its config (`model`, `data`), which a teacher or a pre-trained encoder is built
from (`vit.from_config`). The whole config, with every framework's and plug-in's section, is
`config_lib.read_config`; with `vit.from_config` (the encoder its checkpoints' params fit) and
`checkpoint.restore` it is all evaluation, export and pictures need.
"""
import json

import ml_collections

from mimjax import errors
from mimjax import schema
from mimjax import workdir_io

# The sections an encoder of a run is built from: the ViT and its input (size, channels, mean/std).
ENCODER_SECTIONS = ('model', 'data')


def read_json(workdir):
  """WORKDIR/config.json (local or gs://) as written by a mimjax.train run: a dict."""
  workdir_io.check_reachable(workdir)
  path = workdir_io.path(workdir, 'config.json')
  if not path.exists():
    raise errors.CheckpointError(
        f'{path} does not exist: --workdir must be the directory a mimjax.train run wrote.')
  return json.loads(path.read_text())


def read_encoder_config(workdir):
  """The run's `model` and `data` sections on today's defaults, locked. Read without the whole
  schema, which is assembled from the registry, above the teachers and the pre-trained weight
  loader that call this (the frameworks import both)."""
  values = read_json(workdir)
  defaults = ml_collections.ConfigDict({s: schema.SECTIONS[s]() for s in ENCODER_SECTIONS})
  return schema.merged(defaults, {s: values[s] for s in ENCODER_SECTIONS if s in values})
