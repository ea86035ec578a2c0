"""docs/recipes.md stays true: every table row with a config key states the config's value."""
import ast
import os
import re

import pytest

from conftest import ROOT
from conftest import load_config

DOC = os.path.join(ROOT, 'docs', 'recipes.md')
HEADING = re.compile(r'^## (?P<name>.+) \(`configs/(?P<file>\w+)\.py(?::(?P<arg>[^`]*))?`\)\s*$')
COLUMNS = ['hyperparameter', 'config key', 'paper', 'reference code', 'mimjax', 'note']


def _cells(line):
  """Cells of a markdown table row; `\\|` is a literal bar inside a cell."""
  cells = re.split(r'(?<!\\)\|', line.strip())[1:-1]
  return [c.strip().replace('\\|', '|') for c in cells]


def parse(text):
  """{(name, spec): [(config key, mimjax cell)]} for every recipe section of the document."""
  sections, current = {}, None
  for line in text.splitlines():
    match = HEADING.match(line)
    if match:
      spec = f'configs/{match["file"]}.py' + (f':{match["arg"]}' if match['arg'] else '')
      current = sections.setdefault((match['name'], spec), [])
    elif line.startswith('## '):
      current = None
    elif current is not None and line.startswith('|'):
      cells = _cells(line)
      if cells == COLUMNS or set(''.join(cells)) <= set('-: '):
        continue
      assert len(cells) == len(COLUMNS), line
      key = cells[1].strip('`')
      if key:
        current.append((key, cells[4]))
  return sections


def literal(cell):
  """The Python value a `mimjax` cell states."""
  return ast.literal_eval(cell)


def value(config, key):
  """config[<dotted key>]."""
  for part in key.split('.'):
    config = config[part]
  return config


with open(DOC, encoding='utf-8') as _f:
  SECTIONS = parse(_f.read())


def test_document_has_every_recipe():
  files = {spec.partition(':')[0] for _, spec in SECTIONS}
  for name in ('mae', 'mae_lut', 'mae_mto', 'simmim', 'simmim_mto', 'supervised', 'finetune'):
    assert f'configs/{name}.py' in files
  assert all(rows for rows in SECTIONS.values())


def test_parser_reads_a_known_row():
  text = ('## X (`configs/mae.py:runlocal`)\n\n| ' + ' | '.join(COLUMNS)
          + ' |\n|---|---|---|---|---|---|\n'
          '| a | `optim.b2` | p \\| q | r | 0.95 | |\n| b | | p | r | free text | |\n')
  assert parse(text) == {('X', 'configs/mae.py:runlocal'): [('optim.b2', '0.95')]}


@pytest.mark.parametrize('name,spec', sorted(SECTIONS))
def test_document_states_config_values(name, spec):
  config = load_config(spec)
  for key, stated in SECTIONS[(name, spec)]:
    actual = value(config, key)
    assert literal(stated) == actual, (
        f'{name}: {key} is {actual!r}, document says {stated}')
