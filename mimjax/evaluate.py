r"""Evaluate a training run: `python -m mimjax.evaluate --workdir DIR --protocol knn`.

Writes DIR/eval_<protocol>.json. With --compare_random_init the same protocol also runs on the
randomly initialised encoder of the same architecture, so the gain from pre-training is visible.
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from mimjax import checkpoint as checkpoint_lib
from mimjax import config_lib
from mimjax.data import sources
from mimjax.eval import features as features_lib
from mimjax.eval import knn
from mimjax.eval import loading

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a mimjax.train run.')
_PROTOCOL = flags.DEFINE_string('protocol', 'knn', 'Evaluation protocol.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_RANDOM = flags.DEFINE_bool('compare_random_init', False,
                            'Also evaluate the randomly initialised encoder.')
_FEATURE = flags.DEFINE_enum('feature', None, features_lib.FEATURES,
                             'Image feature (default: config.eval.feature).')
_K = flags.DEFINE_list('k', None, 'kNN neighbour counts (default: config.eval.knn_k).')


def run_knn(run):
  """kNN top-1 on the eval split with the train split as memory, for every configured k."""
  config = run.config
  feature = _FEATURE.value or config.eval.feature
  ks = [int(k) for k in (_K.value or config.eval.knn_k)]
  train_x, train_y = features_lib.extract(run, config.data.train_split, feature)
  test_x, test_y = features_lib.extract(run, config.data.eval_split, feature)
  top1 = {str(k): knn.knn_top1(train_x, train_y, test_x, test_y, k, config.eval.knn_temperature)
          for k in ks}
  return dict(top1=top1[str(ks[0])], top1_by_k=top1, k=ks, feature=feature,
              temperature=config.eval.knn_temperature, train_examples=len(train_y),
              test_examples=len(test_y))


PROTOCOLS = {
    'knn': run_knn,
}


def evaluate(workdir, protocol, step=None, compare_random_init=False):
  """Runs `protocol` on a workdir's checkpoint; writes and returns DIR/eval_<protocol>.json."""
  if protocol not in PROTOCOLS:
    raise config_lib.ConfigError(f'Unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}.')
  run = loading.load_run(workdir, step)
  result = dict(protocol=protocol, step=run.step, split=run.config.data.eval_split,
                **PROTOCOLS[protocol](run))
  if compare_random_init:
    result['random_init'] = PROTOCOLS[protocol](loading.load_run(workdir, random_init=True))
  with open(os.path.join(workdir, f'eval_{protocol}.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    result = evaluate(_WORKDIR.value, _PROTOCOL.value, _STEP.value, _RANDOM.value)
  except (config_lib.ConfigError, checkpoint_lib.CheckpointError, sources.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  line = f'{_PROTOCOL.value} top-1 ({result["split"]}, step {result["step"]}): {result["top1"]:.4f}'
  if 'random_init' in result:
    line += f'   randomly initialised encoder: {result["random_init"]["top1"]:.4f}'
  print(line)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
