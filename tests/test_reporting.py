"""camkd_jax.reporting: TensorBoard events, tables, seed summaries, results.md, format helpers."""
import os

import numpy as np
import pytest

from camkd_jax import reporting


def test_tensorboard_writer_round_trip(tmp_path):
  """Scalars written through the clu writer read back with TensorFlow's own event parser."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  w = reporting.make_writer(str(tmp_path), is_main=True)
  w.write_scalars(7, {'val/kappa': 0.25, 'train/loss/ce': 1.5})
  w.write_scalars(300000, {'val/kappa': -0.5})
  w.close()
  files = [f for f in os.listdir(tmp_path) if 'tfevents' in f]
  assert len(files) == 1
  got = []
  for e in tf.compat.v1.train.summary_iterator(os.path.join(tmp_path, files[0])):
    for v in e.summary.value:
      got.append((e.step, v.tag, float(tf.make_ndarray(v.tensor)) if v.HasField('tensor')
                  else v.simple_value))
  assert sorted(got) == sorted([(7, 'val/kappa', 0.25), (7, 'train/loss/ce', 1.5),
                                (300000, 'val/kappa', -0.5)])
  quiet = reporting.make_writer(str(tmp_path / 'p1'), is_main=False)
  quiet.write_scalars(1, {'a': 1.0})
  quiet.close()
  assert not os.path.exists(tmp_path / 'p1')


def test_markdown_table_and_rows():
  runs = {'teacher': {'val': {'balanced_accuracy': 0.5, 'kappa': 0.25},
                      'test': {'balanced_accuracy': 0.75, 'kappa': None}, 'epoch': 3},
          'student': {'val': {'balanced_accuracy': 0.5, 'kappa': 0.125},
                      'test': {'balanced_accuracy': 0.5, 'kappa': 0.0}, 'epoch': 2,
                      'magnification': 2.5}}
  table = reporting.markdown_table(reporting.results_rows(runs))
  lines = table.strip().split('\n')
  assert lines[0].startswith('| model | magnification |')
  assert lines[2] == '| teacher | 10x | 0.5000 | 0.2500 | 0.7500 | - | 3 |'
  assert lines[3] == '| student | 2.5x | 0.5000 | 0.1250 | 0.5000 | 0.0000 | 2 |'


def test_format_helpers():
  assert reporting.format_duration(3725) == '1h02m05s'
  assert reporting.format_duration(65) == '1m05s'
  assert reporting.format_duration(None) == '?'
  s = reporting.format_losses({'loss/total': 1.0, 'loss/ce': 0.5, 'loss/at': 0.05})
  assert s == 'loss 1.0000 (ce 0.500, at 0.050)'


def test_combine_seeds_mean_and_std():
  def run(seed, tk, sk):
    return {'seeds': [seed],
            'teacher': {'val': {'kappa': tk, 'balanced_accuracy': 0.5},
                        'test': {'kappa': tk, 'balanced_accuracy': 0.5}, 'epoch': 1},
            'student': {'val': {'kappa': sk, 'balanced_accuracy': 0.4},
                        'test': {'kappa': sk / 2, 'balanced_accuracy': 0.4}, 'epoch': 2,
                        'magnification': 2.5, 'factor': 4}}
  out = reporting.combine_seeds({22: run(22, 0.6, 0.2), 32: run(32, 0.8, 0.4),
                                43: run(43, 0.7, 0.9)})
  assert out['seeds'] == [22, 32, 43]
  s = out['summary']['student']['test']
  want = np.asarray([0.1, 0.2, 0.45])
  assert s['kappa_mean'] == pytest.approx(want.mean()) and s['kappa_std'] == pytest.approx(
      want.std(ddof=1))
  assert out['student']['test']['kappa'] == pytest.approx(want.mean())
  assert out['teacher']['epoch'] == [1, 1, 1] and out['student']['magnification'] == 2.5
  table, rows = reporting.results_markdown(out)
  assert len(rows) == 8 and 'student (mean ± sample std)' in table


def test_single_seed_metrics_are_kept_as_they_are():
  run = {'seeds': [22], 'teacher': {'val': {'kappa': 0.5}, 'test': {'kappa': 0.25}, 'epoch': 1}}
  assert reporting.combine_seeds({22: run}) is run
  summary = reporting.summarize_runs([run])
  assert summary == {'teacher': {'val': {'kappa_mean': 0.5, 'kappa_std': 0.0},
                                 'test': {'kappa_mean': 0.25, 'kappa_std': 0.0}}}


def test_write_results_writes_results_md_and_prints_the_table(tmp_path, capsys):
  run = {'seeds': [22],
         'teacher': {'val': {'balanced_accuracy': 0.5, 'kappa': 0.25},
                     'test': {'balanced_accuracy': 0.75, 'kappa': 0.5}, 'epoch': 3}}
  reporting.write_results(run, str(tmp_path))
  text = (tmp_path / 'results.md').read_text()
  assert text.startswith('# Results\n')
  assert '| teacher (seed 22) | 10x | 0.5000 | 0.2500 | 0.7500 | 0.5000 | 3 |' in text
  out = capsys.readouterr().out
  assert 'teacher (seed 22)  10x' in out and f'outputs in {tmp_path}' in out


def test_mean_std_cell():
  assert reporting.mean_std_cell(0.81234, 0.0456) == '0.8123 ± 0.0456'
  assert reporting.mean_std_cell(0.5, 0.25, 3) == '0.500 ± 0.250'
