"""camkd_jax.reporting: TensorBoard events, tables, seed summaries, results.md, format helpers;
progress and outputs: weighted loss lines, the whole-run ETA's step counts, no
TensorBoard step written twice after a resume, the summary's outputs, the Grad-CAM figure's
examples (all classes) and panels (the student's map over the input it saw)."""
import os

import numpy as np
import pytest

from camkd_jax import figures
from camkd_jax import reporting
from camkd_jax import stage as stage_lib
from configs import attn_kd


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
  table = reporting.markdown_table(reporting.results_rows(runs, 10.0))
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
  table, rows = reporting.results_markdown(out, 10.0)
  assert len(rows) == 8 and 'student (mean ± sample std)' in table
  assert rows[-2][:2] == ['teacher (mean ± sample std)', '10x'] and rows[-1][1] == '2.5x'


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
  reporting.write_results(run, str(tmp_path), 'kappa', 10.0)
  text = (tmp_path / 'results.md').read_text()
  assert text.startswith('# Results\n')
  assert '| teacher (seed 22) | 10x | 0.5000 | 0.2500 | 0.7500 | 0.5000 | 3 |' in text
  assert 'selected on validation kappa (config.selection.metric=kappa;' in text
  out = capsys.readouterr().out
  assert 'teacher (seed 22)  10x' in out and f'outputs in {tmp_path}' in out


def test_results_md_names_the_selection_metric_and_the_base_magnification(tmp_path, capsys):
  """results.md says the metric the checkpoint was selected on and labels the teacher with the
  run's config.base_magnification, both taken from the config rather than assumed."""
  run = {'seeds': [22],
         'teacher': {'val': {'balanced_accuracy': 0.5, 'kappa': 0.25},
                     'test': {'balanced_accuracy': 0.75, 'kappa': 0.5}, 'epoch': 3},
         'student': {'val': {'balanced_accuracy': 0.5, 'kappa': 0.125},
                     'test': {'balanced_accuracy': 0.5, 'kappa': 0.0}, 'epoch': 2,
                     'magnification': 5.0}}
  reporting.write_results(run, str(tmp_path), 'balanced_accuracy', 20.0)
  text = (tmp_path / 'results.md').read_text()
  assert 'selected on validation balanced accuracy (config.selection.metric=balanced_accuracy;' \
      in text and 'validation kappa' not in text
  assert '| teacher (seed 22) | 20x |' in text and '| student (seed 22) | 5x |' in text
  assert 'teacher (seed 22)  20x' in capsys.readouterr().out
  runs = {'22': run, '32': run}
  out = {'seeds': [22, 32], 'runs': runs, 'student': {'magnification': 5.0},
         'summary': reporting.summarize_runs([run, run])}
  _, rows = reporting.results_markdown(out, 20.0)
  assert [r[1] for r in rows] == ['20x', '5x', '20x', '5x', '20x', '5x']


def test_mean_std_cell():
  assert reporting.mean_std_cell(0.81234, 0.0456) == '0.8123 ± 0.0456'
  assert reporting.mean_std_cell(0.5, 0.25, 3) == '0.500 ± 0.250'


def test_progress_line_says_the_terms_are_weighted():
  s = reporting.format_losses({'loss/ce': 1.25, 'loss/at': 0.05, 'loss/total': 1.75},
                              {'ce': 1.0, 'at': 10.0, 'fm': 0.0})
  assert s == 'loss 1.7500 = 1*ce 1.2500 + 10*at 0.0500 (weight*raw term)'
  # The sum shown is the total: 1 * 1.25 + 10 * 0.05.
  assert 1.0 * 1.25 + 10.0 * 0.05 == pytest.approx(1.75)


def test_whole_run_steps_for_the_eta():
  config = attn_kd.get_config('smoke=1')
  config.max_steps, config.num_epochs, config.teacher.num_epochs = -1, 3, 2
  # spe 8: teacher 16 steps, student 24; two later seeds repeat both.
  assert stage_lib.later_stage_steps(config, 8, 0) == (24, 0)
  assert stage_lib.later_stage_steps(config, 8, 2) == (24 + 2 * 40, 2 * 40)
  config.teacher.checkpoint = '/given/teacher'  # a given teacher costs no steps
  assert stage_lib.later_stage_steps(config, 8, 1) == (24 + 24, 24)
  config.max_steps = 5
  assert stage_lib.stage_steps(config, 8, 3) == 5
  config.method = 'teacher'
  config.teacher.checkpoint = ''
  assert stage_lib.later_stage_steps(config, 8, 1) == (5, 5)


def _scalars(logdir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(os.listdir(logdir)):
    for e in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for v in e.summary.value:
        value = float(tf.make_ndarray(v.tensor)) if v.HasField('tensor') else v.simple_value
        out.append((e.step, v.tag, value))
  return out


def test_resumed_writer_skips_steps_already_written(tmp_path):
  logdir = str(tmp_path / 'tb')
  w = reporting.make_writer(logdir, is_main=True)
  for step in range(1, 6):
    w.write_scalars(step, {'loss': float(step)})
  w.close()
  assert reporting.last_written_step(logdir) == 5
  # Resumed from a checkpoint at step 2: steps 3..5 come again (same values), then 6, 7.
  w = reporting.make_writer(logdir, is_main=True, resume=True)
  for step in range(3, 8):
    w.write_scalars(step, {'loss': float(step) + 100 * (step <= 5)})
  w.close()
  got = sorted(_scalars(logdir))
  assert got == [(s, 'loss', float(s)) for s in range(1, 8)]


def test_last_written_step_reads_past_a_cut_record(tmp_path):
  logdir = str(tmp_path / 'tb')
  w = reporting.make_writer(logdir, is_main=True)
  w.write_scalars(4, {'a': 1.0})
  w.close()
  name = [f for f in os.listdir(logdir) if 'tfevents' in f][0]
  with open(os.path.join(logdir, name), 'ab') as f:
    f.write(b'\x30\x00\x00')  # a record cut short by a kill
  assert reporting.last_written_step(logdir) == 4
  assert reporting.last_written_step(str(tmp_path / 'none')) is None


def test_summary_lists_only_outputs_that_exist(tmp_path, capsys):
  run = tmp_path / 'run'
  (run / 'teacher').mkdir(parents=True)
  (run / 'tensorboard').mkdir()
  (run / 'metrics.json').write_text('{}')
  out = {'seeds': [22], 'teacher': {'val': {'kappa': 0.5, 'balanced_accuracy': 0.5},
                                    'test': {'kappa': 0.25, 'balanced_accuracy': 0.5},
                                    'epoch': 1}}
  reporting.write_results(out, str(run), 'kappa', 10.0)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last == (f'outputs in {run}: metrics.json, results.md, tensorboard/, teacher/')
  for seed in ('seed_1', 'seed_2'):
    (run / seed / 'figures').mkdir(parents=True)
    (run / seed / 'figures' / 'gradcam.png').write_bytes(b'png')
  assert reporting.existing_outputs(str(run)) == [
      'metrics.json', 'results.md', 'seed_*/figures/gradcam.png', 'tensorboard/', 'teacher/']


class FakeData:
  """Validation batches of 4 with labels 0 0 0 1 | 1 1 3 3 | 2 0 0 0 (the last 2 padded)."""
  num_classes, class_names = 4, ['NC', 'G3', 'G4', 'G5']

  def __init__(self):
    self.read = 0

  def eval_batches(self, split):
    assert split == 'validation'
    labels = [[0, 0, 0, 1], [1, 1, 3, 3], [2, 0, 0, 0]]
    masks = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    for b, (lab, mask) in enumerate(zip(labels, masks)):
      self.read += 1
      ids = np.arange(4) + 4 * b  # pixel value = example index
      yield {'image': np.broadcast_to(ids[:, None, None, None], (4, 2, 2, 3)).astype(np.uint8),
             'label': np.asarray(lab, np.int32), 'mask': np.asarray(mask, bool)}


def test_figure_takes_one_class_after_another():
  images, labels = figures.figure_examples(FakeData(), 6)
  assert labels.tolist() == [0, 1, 2, 3, 0, 1]
  assert images[:, 0, 0, 0].tolist() == [0, 3, 8, 6, 1, 4]  # the first examples of each class
  data = FakeData()
  images, labels = figures.figure_examples(data, 4)
  assert labels.tolist() == [0, 1, 2, 3] and data.read == 3
  _, labels = figures.figure_examples(FakeData(), 9)  # 3 per class where there are 3
  assert labels.tolist() == [0, 1, 2, 3, 0, 1, 3, 0, 1]


def test_figure_panels_and_png(tmp_path):
  cols = [{'title': 'teacher', 'view': np.zeros((2, 8, 8, 3)), 'maps': np.random.rand(2, 4, 4),
           'probs': np.full((2, 2), 0.5)},
          {'title': 'student (2.5x)', 'view': np.zeros((2, 2, 2, 3)),
           'maps': np.random.rand(2, 1, 1), 'probs': np.full((2, 2), 0.5), 'on_view': True}]
  assert reporting.figure_panels(cols) == [(0, 'cam'), (1, 'view'), (1, 'cam_view'), (1, 'cam')]
  path = tmp_path / 'figures' / 'gradcam.png'
  images = np.zeros((2, 8, 8, 3), np.uint8)
  reporting.save_gradcam_figure(str(path), images, np.asarray([0, 1]), ['a', 'b'], cols)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    assert im.size == (int(2.0 * 5 * 80), int(2.1 * 2 * 80))  # image + 4 panels, 2 rows
  assert os.listdir(path.parent) == ['gradcam.png']
