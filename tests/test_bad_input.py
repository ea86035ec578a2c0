"""Bad input, field by field (issue 32): every field of `mimjax/config_lib.py:base_config` is set to
zero, a negative, a non-finite, an out-of-range or an unknown value, and the one validation phase
(`mimjax.validation.validate`, in-process: no training, no subprocess per case) must refuse it with
a ConfigError naming the field, unless the schema gives that value a meaning (LEGAL). Subprocess
cases prove the command line turns such a refusal, or a misspelt config key, into one `error:`
line and writes nothing."""
import copy
import math

import pytest

from conftest import config_flags
from conftest import load_config
from conftest import run_module
from conftest import tiny_overrides
from mimjax import config_lib
from mimjax import errors
from mimjax import validation

# The recipe under which a section's fields are in use (a framework is refused only for the fields
# it uses); every other section is checked under MAE.
RECIPES = {
    'simmim': ('configs/simmim.py:runlocal', {}),
    'supervised': ('configs/supervised.py:runlocal', {}),
    'distill': ('configs/distill.py:runlocal,teacher=ema', {}),
    'dtm': ('configs/distill.py:runlocal,teacher=ema,dtm', {}),
    'lut': ('configs/mae_lut.py:runlocal', {}),
    'mto': ('configs/mae_mto.py:runlocal', {}),
    'tokenprop': ('configs/supervised.py:runlocal,tokenprop', {}),
    'model.moto': ('configs/mae.py:runlocal', {'model.tokenizer_norm': 'moto'}),
    'eval.knn_monitor': ('configs/mae.py:runlocal', {'eval.every_steps': 100}),
}
DEFAULT_RECIPE = ('configs/mae.py:runlocal', {})

NAN, INF = math.nan, math.inf
# Values the schema gives a meaning (the comments of mimjax/schema.py and of each framework's and
# plug-in's `config_fields`); all others must be refused.
LEGAL = {
    'seed': {0, -1},
    'warmup_steps': {0},
    'model.layerscale': {0.0, 1.5},
    'model.drop_path': {0.0},
    'model.num_classes': {0},
    'model.head_init_std': {0.0, 1.5},
    'model.moto.stem_channels': {0},
    'model.moto.temperature': {1.5},
    'model.moto.eps': {1.5},
    'data.randaug_layers': {0},
    'data.randaug_magnitude': {0},
    'data.randaug_magnitude_std': {0.0, 1.5},
    'data.random_erase': {0.0},
    'data.folder_holdout': {0.0},
    'data.label_fraction': {0.0},  # every image of the split
    'data.folder_holdout_min': {0},
    'data.threads': {0},
    'optim.base_lr': {0.0, 1.5},
    'optim.warmup_init_lr': {0.0, 1.5},
    'optim.min_lr': {0.0, 1.5},
    'optim.milestones': {()},
    'optim.b1': {0.0},
    'optim.b2': {0.0},
    'optim.weight_decay': {0.0, 1.5},
    'optim.grad_clip': {0.0, 1.5},
    'mae.mask_ratio': {0.0},
    'distill.teacher_layer': {-1, 0},
    'distill.ema_momentum': {0.0},
    'distill.mask_count': {0},
    'dtm.weight': {1.5},
    'dtm.min_tokens': {0},
    'dtm.schedule_groups': {0},
    'lut.alpha': {1.5},
    'lut.momentum': {0.0},
    'supervised.label_smoothing': {0.0},
    'supervised.mixup_alpha': {0.0, 1.5},
    'supervised.cutmix_alpha': {0.0, 1.5},
    'supervised.mix_prob': {0.0},
    'supervised.switch_prob': {0.0},
    'tokenprop.weight': {1.5},
    'mto.tau': {0.0, 1.5},
    'mto.lambda_spa': {0.0, 1.5},
    'mto.lambda_e': {0.0, 1.5},
    'mto.lambda_r': {0.0, 1.5},
    'mto.eps': {1.5},
    'mesh.data': {-1},
    'mesh.fsdp': {-1},
    'mesh.fsdp_min_size': {0},
    'distributed.num_processes': {0, -1},
    'distributed.process_id': {0, -1},
    'log.images_every_steps': {0},
    'eval.every_steps': {0},
    'eval.in_loop': {()},  # the framework's own evaluators
    'eval.knn_temperature': {1.5},
    'eval.linear.warmup_epochs': {0},
    'eval.linear.momentum': {0.0},
    'eval.linear.weight_decay': {0.0, 1.5},
    'eval.linear.trust_coefficient': {1.5},
    'eval.linear.base_lrs': {(1.5,)},
    'init.step': {-1, 0},
}
# Free-form strings and paths that `validate` cannot judge alone; each is checked, before anything
# is written, where it is read: the dataset and splits by `validation.check_run`, the init and
# teacher files when they are loaded (tests/test_interop.py: malformed init files), the
# accepted changes against the checkpoint (`resume.check`), the two evaluation-only choices by
# mimjax.evaluate's flags, the coordinator by jax.distributed.
CHECKED_WHERE_READ = {
    'data.name', 'data.train_split', 'data.eval_split', 'init.checkpoint', 'distill.clip_path',
    'distill.teacher_workdir', 'resume.accept_changes', 'log.wandb_project',
    'eval.linear.train_split', 'eval.linear.holdout_split', 'eval.feature', 'eval.linear.optimizer',
    'distributed.coordinator_address',
}


def _candidates(value):
  """The bad values tried for a field holding `value`: by its type in the schema."""
  if isinstance(value, bool):
    return []  # the locked config accepts only booleans; both are meaningful
  if isinstance(value, int):
    return [0, -1]
  if isinstance(value, float):
    return [0.0, -1.0, NAN, INF, 1.5]
  if isinstance(value, str) or value is None:
    return ['bogus']
  if isinstance(value, tuple) and value and isinstance(value[0], tuple):  # mesh.param_rules
    return [(('.*', 'bogus'),), (('(', 'fsdp'),)]
  if isinstance(value, tuple):
    return [(), (-1.0,), (NAN,), (1.5,)]
  raise AssertionError(f'no bad values for {value!r}')


def _fields():
  return [(key, value) for key, value in validation._leaves(config_lib.base_config())  # pylint: disable=protected-access
          if key != 'framework']  # the framework is the recipe's; bogus is tested below


def _recipe(key):
  for prefix in sorted(RECIPES, key=len, reverse=True):
    if key.startswith(prefix + '.'):
      return RECIPES[prefix]
  return DEFAULT_RECIPE


_CONFIGS = {}


def _config(recipe):
  spec, overrides = recipe
  if spec + str(overrides) not in _CONFIGS:
    _CONFIGS[spec + str(overrides)] = load_config(spec, **overrides)
  return copy.deepcopy(_CONFIGS[spec + str(overrides)])


def _with(config, key, value):
  *parents, leaf = key.split('.')
  target = config
  for p in parents:
    target = target[p]
  with config.unlocked():
    target[leaf] = value
  return config


def _same(a, b):
  if isinstance(a, tuple) and isinstance(b, tuple):
    return len(a) == len(b) and all(map(_same, a, b))
  return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and
                    math.isnan(b))


def test_every_bad_value_of_every_field_is_refused_naming_it():
  """Every field of the schema, every bad value: a ConfigError naming the field, unless LEGAL."""
  accepted, unnamed, tried = [], [], 0
  for key, default in _fields():
    if key in CHECKED_WHERE_READ:
      continue
    for value in _candidates(default):
      if any(_same(value, legal) for legal in LEGAL.get(key, ())):
        continue
      tried += 1
      try:
        validation.validate(_with(_config(_recipe(key)), key, value))
      except errors.ConfigError as e:
        if f'config.{key}' not in str(e) or '\n' in str(e):
          unnamed.append(f'{key}={value!r}: {e}')
        continue
      accepted.append(f'{key}={value!r}')
  assert not accepted, f'accepted without a meaning: {accepted}'
  assert not unnamed, f'refused without naming the field on one line: {unnamed}'
  assert tried > 250  # the schema really was walked (277 cases on 2026-12-07)


def test_the_legal_values_are_accepted():
  """The other side of LEGAL: each listed value passes validation (so LEGAL is no blanket
  exemption), as does every recipe's own config."""
  refused = []
  for key, values in LEGAL.items():
    for value in values:
      try:
        validation.validate(_with(_config(_recipe(key)), key, value))
      except errors.ConfigError as e:
        refused.append(f'{key}={value!r}: {e}')
  assert not refused


def test_an_unknown_framework_or_enum_names_the_choices():
  config = _with(_config(DEFAULT_RECIPE), 'framework', 'bogus')
  with pytest.raises(errors.ConfigError, match=r"config.framework='bogus'.*'mae'"):
    validation.validate(config)
  for key, choice in (('model.pool', "'gap'"), ('model.posemb', "'sincos2d'"),
                      ('data.augment', "'rrc_flip'")):
    with pytest.raises(errors.ConfigError, match=rf"config.{key}='bogus'.*{choice}"):
      validation.validate(_with(_config(DEFAULT_RECIPE), key, 'bogus'))


def test_a_framework_is_refused_only_for_the_fields_it_uses():
  """MAE ignores simmim.*, SimMIM ignores mae.*: a value the other framework would refuse passes."""
  validation.validate(_with(_config(DEFAULT_RECIPE), 'simmim.mask_ratio', 0.999))
  validation.validate(_with(_config(RECIPES['simmim']), 'mae.mask_ratio', 0.999))
  with pytest.raises(errors.ConfigError, match='config.mae.mask_ratio'):
    validation.validate(_with(_config(DEFAULT_RECIPE), 'mae.mask_ratio', 0.999))


def test_a_nonexistent_data_dir_is_refused_and_not_created(tmp_path):
  missing = tmp_path / 'no' / 'such'
  with pytest.raises(errors.ConfigError, match='config.data.data_dir.*never created'):
    validation.validate(_with(_config(DEFAULT_RECIPE), 'data.data_dir', str(missing)))
  assert not (tmp_path / 'no').exists()


@pytest.mark.parametrize('override', ['checkpoint.every_steps=0', 'mae.mask_ratio=0.999'])
def test_the_command_prints_one_error_line_and_writes_nothing(tmp_path, override):
  """The real CLI: one `error:` line (no traceback), exit status 1, no workdir."""
  workdir = tmp_path / 'run'
  result = run_module(['mimjax.train', '--config', 'configs/mae.py:runlocal',
                       *config_flags(tiny_overrides()), f'--config.{override}',
                       f'--workdir={workdir}'])
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert [line for line in lines if line.startswith('error:')] == lines[-1:], result.stderr
  assert f'config.{override.split("=")[0]}' in lines[-1]
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()


def test_a_recipe_argument_typo_is_one_line_without_a_traceback(capsys):
  """`--config mae:runloacl`: the recipe's own ValueError, not ml_collections' quoted traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from mimjax import config_lib  # pylint: disable=g-import-not-at-top
  from mimjax import startup  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values)
  with pytest.raises(SystemExit) as e:
    config_lib.parse_flags(['train', '--config', startup.resolve_config_path('mae:runloacl')],
                           flag_values)
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: flag --config='), err
  assert "Unknown config argument 'runloacl'; this config accepts: epochs, model, runlocal" in err
  assert 'Traceback' not in err


@pytest.mark.parametrize('options,flag', [
    (dict(k=['-5']), '--k=-5'), (dict(k=['20', '0']), '--k=20,0'), (dict(k=['2.5']), '--k=2.5'),
    (dict(num_images=0), '--num_images=0'), (dict(base_lrs=['nan']), '--base_lrs=nan'),
    (dict(epochs=-1), '--epochs=-1')])
def test_evaluate_refuses_counts_that_are_not_positive_before_loading(tmp_path, options, flag):
  """Checked before the workdir is read (it does not even exist here) and before anything runs."""
  from mimjax import evaluate  # pylint: disable=g-import-not-at-top
  protocol = {'k': 'knn', 'num_images': 'attention_distance', 'base_lrs': 'linear',
              'epochs': 'linear'}[next(iter(options))]
  with pytest.raises(errors.ConfigError, match=f'^{flag}: use positive'):
    evaluate.evaluate(str(tmp_path / 'run'), protocol, **options)
  assert not (tmp_path / 'run').exists()


def test_misspelt_config_key_names_the_near_miss(tmp_path):
  workdir = tmp_path / 'run'
  result = run_module(['mimjax.train', '--config', 'configs/mae.py:runlocal',
                       '--config.mae.mask_ration=0.5', f'--workdir={workdir}'])
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  errors_shown = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors_shown == ['error: --config.mae.mask_ration is not a config key; did you mean '
                          '--config.mae.mask_ratio?']
  assert not workdir.exists()
