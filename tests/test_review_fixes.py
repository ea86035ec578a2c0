"""Quick tests of review findings: each fails without its fix."""
import errno

from mimjax import errors


def test_reason_takes_only_system_causes_from_the_chain():
  # A handled FileNotFoundError deep in the chain is not why the outer error happened.
  try:
    try:
      raise FileNotFoundError(errno.ENOENT, 'No such file or directory', 'optional.json')
    except FileNotFoundError:
      raise ValueError('bad value') from None
  except ValueError as e:
    outer = e
  outer.__context__ = FileNotFoundError(errno.ENOENT, 'No such file or directory')
  assert errors.reason(outer) == 'ValueError: bad value'
  # A system cause anywhere in the chain comes first.
  full = OSError(errno.ENOSPC, 'No space left on device')
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = full
  assert errors.reason(wrapped) == 'No space left on device; RuntimeError: save failed'
  # The exception's own strerror stays.
  assert errors.reason(FileNotFoundError(errno.ENOENT, 'No such file or directory')).startswith(
      'No such file or directory')


def test_finetune_workdir_names_the_steps_and_another_recipe():
  # Another length or recipe gets its own folder, so a resume never meets a changed config.
  from mimjax import finetune  # pylint: disable=g-import-not-at-top
  from mimjax.reproduce import study as reproduce  # pylint: disable=g-import-not-at-top
  from mimjax.eval import loading  # pylint: disable=g-import-not-at-top
  pre = reproduce.build_config('mae', reproduce.row_overrides('mae', 0, reproduce.BUDGETS['cpu']))
  run = loading.Run(pre, None, 1500, '/w', False)
  own = finetune.recipe_for(pre)
  assert finetune.workdir_name(run) == 'finetune'
  assert finetune.workdir_name(run, total_steps=100) == 'finetune_steps100'
  assert finetune.workdir_name(run, total_steps=600) == 'finetune_steps600'
  assert finetune.workdir_name(run, 0.01, 600) == 'finetune_labels0.01_step1500_steps600'
  assert finetune.workdir_name(run, finetune_config=f'model=Ti/4,recipe={own}') == 'finetune'
  assert finetune.workdir_name(run, None, None, 'recipe=simmim') == 'finetune_recipesimmim'
