"""Shared test helpers."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, env_extra=None, timeout=300):
  """Runs `code` in a fresh Python process (own XLA flags / x64 mode) and returns stdout."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc.stdout


@pytest.fixture
def python_runner():
  return run_python
