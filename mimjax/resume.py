"""Resuming on the config a workdir ran with: the compatibility check and the config history.

A resume continues the checkpoint's trajectory only when every setting that shapes it (data,
batch, optimizer, schedule, seed, model, losses) is the checkpoint's. Any other change is refused
with the diff, unless `resume.accept_changes` names it. Settings that only say how the run is
observed or laid out (logging, checkpoint cadence, evaluation, the device mesh) may change freely.
"""
import json
import time

import jax

from mimjax import config_lib
from mimjax import errors
from mimjax import tree_util
from mimjax import workdir_io

# Dotted keys (or prefixes) of settings that do not change the sequence of parameters a run
# produces: observation, layout, where the same data lives, and `init` (unused on resume).
FREE = ('log.', 'checkpoint.', 'eval.', 'mesh.', 'distributed.', 'resume.', 'init.',
        'data.eval_split', 'data.eval_crop_fraction', 'data.cache', 'data.download',
        'data.data_dir', 'model.remat')

HISTORY = 'config_history.jsonl'


def _plain(config):
  """The config as flat {dotted key: JSON value}, tuples and lists alike."""
  return tree_util.flatten_dict(json.loads(config_lib.to_json(config)))


def changed_keys(saved, config):
  """{key: (checkpoint's value, this config's value)} for every trajectory-changing difference.

  `saved` is the config dict stored in the checkpoint; keys it lacks (an older mimjax) take
  today's defaults.
  """
  old = _plain(config_lib.from_json(json.dumps(saved)))
  new = _plain(config)
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and not k.startswith(FREE)}


def accepted(config):
  """The dotted keys named in `resume.accept_changes` (comma-separated)."""
  return {k.strip() for k in config.resume.accept_changes.split(',') if k.strip()}


def check(config, meta, ckpt_dir):
  """Raises ConfigError when resuming checkpoint `meta` with `config` would silently change the
  run: a trajectory-changing setting not accepted, or total_steps below the checkpoint step."""
  step = int(meta['step'])
  if config.total_steps < step:
    raise errors.ConfigError(
        f'config.total_steps={config.total_steps} is below the step of the latest checkpoint '
        f'({step}) in {ckpt_dir}; a run cannot go back. Use total_steps >= {step}, or a new '
        '--workdir.')
  if 'config' not in meta:
    return
  diff = changed_keys(meta['config'], config)
  refused = {k: v for k, v in diff.items() if k not in accepted(config)}
  if not refused:
    return
  lines = '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in refused.items())
  schedule = (' Extending total_steps stretches the warmup + cosine schedule to the new end: '
              'from the next step the lr follows the new schedule (a jump upwards from the old '
              'one), it does not restart.' if 'total_steps' in refused else '')
  raise errors.ConfigError(
      f'This config differs from the one that wrote checkpoint {step} in {ckpt_dir} in '
      f'settings that change the training trajectory ({lines}).{schedule} To continue anyway, '
      f'pass --config.resume.accept_changes={",".join(refused)}; to keep the run as it was, '
      'use its config (WORKDIR/config.json), or start in a new --workdir.')


def data_position_examples(meta):
  """Training examples the checkpoint's run has consumed (older checkpoints: steps x batch)."""
  if 'data_examples' in meta:
    return int(meta['data_examples'])
  return int(meta.get('data_position', 0)) * int(meta['config']['batch_size'])


def read_history(workdir):
  """The entries of WORKDIR/config_history.jsonl ([] when there is none), read and checked before
  the run writes anything: a damaged line inside it, an entry without an integer `start_step` and
  a `config` record, invalid UTF-8 or a directory in its place is one CheckpointError naming the
  file; a torn last line (a crash mid-write) is dropped with a warning."""
  path = workdir_io.path(workdir, HISTORY)
  if not path.exists():
    return []
  entries = workdir_io.read_jsonl(path)
  for i, entry in enumerate(entries):
    if not (isinstance(entry, dict) and isinstance(entry.get('start_step'), int)
            and isinstance(entry.get('config'), dict)):
      raise errors.CheckpointError(
          f'Entry {i + 1} of {path} is not a config record with "start_step" and "config" '
          f'({json.dumps(entry)[:80]}); fix or delete that line (or move the file away, losing '
          'the record of the earlier configs) to resume.')
  return entries


def record(workdir, config, start_step, history):
  """Writes WORKDIR/config.json (this run's config) and the workdir's config history: `history`
  (`read_history`'s entries) and this run's."""
  if jax.process_index() != 0:
    return
  text = config_lib.to_json(config)
  workdir_io.write_atomic(workdir_io.path(workdir, 'config.json'), text)
  entry = dict(start_step=int(start_step), time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
               config=json.loads(text))
  workdir_io.write_atomic(workdir_io.path(workdir, HISTORY),
                          ''.join(json.dumps(e, sort_keys=True) + '\n' for e in [*history, entry]))

