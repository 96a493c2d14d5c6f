"""The study sweep (experiments/reproduce.py) on a tiny grid: two cells, a few steps."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_reproduce_tiny_grid_writes_results_and_resumes(tmp_path):
  out = tmp_path / 'RESULTS.md'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  cmd = [sys.executable, 'experiments/reproduce.py', '--magnifications=2.5',
         '--methods=ce,fm_at', '--seeds=22', '--smoke', f'--workdir={tmp_path / "runs"}',
         f'--out={out}', '--set=data.data_dir=' + str(tmp_path / 'tfds')]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert '[study 3/3] fm_at m=2.5 seed=22' in proc.stdout
  text = out.read_text()
  assert '| teacher | 10x |' in text
  assert '| CE only | 2.5x |' in text and '| FM + AT+ | 2.5x |' in text
  with open(tmp_path / 'RESULTS_kappa.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  table = json.loads((tmp_path / 'RESULTS.json').read_text())
  assert set(table) == {'teacher|None', 'ce|2.5', 'fm_at|2.5'}
  for cell in ('ce_m2.5_s22', 'fm_at_m2.5_s22'):
    metrics = json.loads((tmp_path / 'runs' / cell / 'metrics.json').read_text())
    assert metrics['student']['factor'] == 4
    assert table[cell.split('_m')[0] + '|2.5']['test']['kappa'][0] == pytest.approx(
        metrics['student']['test']['kappa'])
  # Rerun: every cell is finished, so nothing trains and the same report comes out.
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '[study' not in again.stdout
  assert json.loads((tmp_path / 'RESULTS.json').read_text()) == table
