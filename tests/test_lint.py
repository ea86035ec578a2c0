"""The linter (ruff, pinned in requirements-test.txt, configured in pyproject.toml) is clean."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
  proc = subprocess.run([sys.executable, '-m', 'ruff', 'check', 'mimjax', 'tests', 'configs'],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr
