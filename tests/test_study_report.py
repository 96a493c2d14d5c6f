"""The study's report (experiments/study_report.py) on hand-made results and on the committed
records: epoch re-selection, pairing within a seed, the page's head and cost line, the curves
plot, the partial-grid line. The statistics themselves are tested in tests/test_metrics.py, the
whole paired page through the sweep's CLI in tests/test_reproduce.py."""
import glob
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
try:
  import study_report as sr  # pylint: disable=g-import-not-at-top
finally:
  sys.path.pop(0)


def _history(vals):
  return [{'epoch': e + 1, 'step': 10 * (e + 1), 'train': {}, 'val': {'kappa': v},
           'test': {'kappa': v / 2}} for e, v in enumerate(vals)]


def test_select_within_applies_the_run_rule_to_a_prefix():
  h = _history([0.50, 0.505, 0.52, 0.70, 0.69, 0.90])
  full = {'val': h[5]['val'], 'test': h[5]['test'], 'epoch': 6, 'step': 60, 'train': {},
          'history': h}
  # min_delta 0.01: e1 sets the best, e2 (+0.005) does not beat it, e3 (+0.02) does.
  three = sr.select_within(full, 3, 0.01)
  assert three['epoch'] == 3 and three['test']['kappa'] == 0.26 and len(three['history']) == 3
  assert sr.select_within(full, 5, 0.01)['epoch'] == 4
  assert sr.select_within(full, 2, 0.01)['epoch'] == 1
  assert sr.select_within(full, 6, 0.01) is full and sr.select_within(full, 9, 0.01) is full


def test_select_within_reproduces_the_recorded_selection():
  """On the committed records, re-selecting over the whole history gives each run's own choice."""
  paths = sorted(glob.glob(os.path.join(REPO, 'experiments', 'results', 'imagenet_cells', '*_m*.json')))
  assert len(paths) > 30
  for path in paths:
    with open(path) as f:
      student = json.load(f)['metrics']['student']
    # Dropping the last epoch and asking for all of them back is the identity...
    h = student['history']
    redo = sr.select_within({**student, 'history': h + [dict(h[-1], epoch=len(h) + 1)]}, len(h),
                           0.01)
    assert redo['epoch'] == student['epoch'] and redo['test'] == student['test'], path


def test_paired_table_pairs_within_a_seed_and_drops_another_teacher():
  res = lambda k: {'student': {'test': {'kappa': k}}}
  results = {('teacher', None, 1): {'teacher': {'test': {'kappa': 1.0}}},
             ('teacher', None, 2): {'teacher': {'test': {'kappa': 0.9}}},
             ('teacher', None, 3): {'teacher': {'test': {'kappa': 1.0}}},
             ('ce', 2.5, 1): res(0.7), ('at', 2.5, 1): res(0.8),
             ('ce', 2.5, 2): res(0.6), ('at', 2.5, 2): res(0.55),
             ('ce', 2.5, 3): res(0.5), ('at', 2.5, 3): res(0.9)}
  fps = {c: 'A' for c in results}
  fps[('at', 2.5, 3)] = 'B'  # distilled from a retrained teacher: not a pair
  pairs, mismatched = sr.paired_table(results, fps, [2.5], ['ce', 'at'], [1, 2, 3])
  assert mismatched == [('at', 2.5, 3)]
  assert pairs[('at', 2.5)] == {'seeds': [1, 2], 'method': [0.8, 0.55], 'baseline': [0.7, 0.6],
                                'teacher': [1.0, 0.9]}
  st = sr.difference_stats(pairs[('at', 2.5)])
  assert st['diffs'] == pytest.approx([0.1, -0.05]) and st['wins']['wins'] == 1
  assert st['gap_closed'] == pytest.approx(0.025 / 0.3)  # mean diff / mean(teacher - CE)


def test_curves_plot_draws_one_line_per_student(tmp_path):
  student = lambda vals, sel: {'student': {'epoch': sel, 'history': _history(vals)}}
  results = {('teacher', None, 1): {'teacher': {'val': {'kappa': 0.98}}},
             ('ce', 2.5, 1): student([0.5, 0.7, 0.6], 2), ('at', 2.5, 1): student([0.6, 0.8], 2),
             ('ce', 2.5, 2): student([0.4, 0.45], 1), ('ce', 1.25, 1): student([0.3], 1)}
  path = tmp_path / 'c.png'
  assert sr.plot_curves(results, [2.5, 1.25], ['ce', 'at'], [1, 2], str(path)) == 4
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  teacher_only = tmp_path / 'none.png'  # no student yet: no curve, no file
  assert sr.plot_curves({('teacher', None, 1): results[('teacher', None, 1)]}, [2.5], ['ce'], [1],
                       str(teacher_only)) == 0
  assert not teacher_only.exists()


def test_completeness_names_a_partial_grid():
  done = {('teacher', None, 1): {}, ('ce', 2.5, 1): {}, ('at', 2.5, 1): {}}
  assert sr.completeness(done, [2.5], ['ce', 'at'], [1]) == ''
  line = sr.completeness(done, [2.5], ['ce', 'at'], [1, 2])
  assert line.startswith('**PARTIAL**: 3 of 6 cells') and '3 still to run' in line


def test_page_head_names_the_teacher_selection_and_cost():
  table = {('teacher', None): {s: {m: (1.0, 0.0, 1) for m in sr.METRICS} for s in sr.SPLITS}}
  text = sr.markdown(table, 0.0, [2.5], ['ce'], {}, title='T', command='python x.py --a',
                     seeds='22', labels=('20x', 'validation slide-level kappa'))
  assert text.startswith('# T\n\nProduced by `python x.py --a` (mean ± sample std over seeds 22;')
  assert '| teacher | 20x |' in text and 'selected on validation slide-level kappa' in text
  assert '0.0 min' not in text and 'No cell was trained by this invocation' in text
  results = {('teacher', None, 22): {'wall_time_s': 1800.0}, ('ce', 2.5, 22): {'wall_time_s': 5400.0}}
  assert 'the 2 cells in this report took 2.0 h' in sr.wall_text(results, 0.0)
  assert 'wall_time_s: the last run of each cell' in sr.wall_text(results, 0.0)
  assert sr.wall_text(results, 150.0).startswith('Wall time of this invocation: 2.5 min')
  # a stage's own time (every run of the cell) wins over the last run's wall time
  results[('ce', 2.5, 22)]['student'] = {'train_wall_time_s': 9000.0}
  text = sr.wall_text(results, 0.0)
  assert 'took 3.0 h' in text and '1 older record(s) hold only' in text, text
  results[('teacher', None, 22)]['teacher'] = {'train_wall_time_s': 1800.0}
  text = sr.wall_text(results, 0.0)
  assert 'took 3.0 h' in text and 'every run of a cell)' in text and 'older' not in text, text


def test_write_report_from_a_hand_made_grid(tmp_path):
  """write_report on {cell: metrics} made here (no sweep, no store): the page, its table as
  JSON, the figures; the paired row is the hand computation."""
  def metrics(key, test, val=0.9, epochs=2):
    report = {'val': {'kappa': val, 'balanced_accuracy': val},
              'test': {'kappa': test, 'balanced_accuracy': test}, 'epoch': epochs,
              'history': [{'epoch': e + 1, 'val': {'kappa': val}} for e in range(epochs)]}
    return {key: report}
  results = {}
  for seed, (t, ce, at) in {1: (0.95, 0.70, 0.80), 2: (0.97, 0.75, 0.78)}.items():
    results[('teacher', None, seed)] = metrics('teacher', t)
    results[('ce', 2.5, seed)] = metrics('student', ce)
    results[('at', 2.5, seed)] = metrics('student', at)
  out = tmp_path / 'page' / 'R.md'
  table = sr.write_report(results, str(out), [2.5], ['ce', 'at'], [1, 2], title='Hand',
                          command='python somewhere.py', seeds_text='1,2',
                          labels=('10x', 'validation kappa'), wall=0.0,
                          fingerprints={c: 'same' for c in results})
  text = out.read_text()
  assert text.startswith('# Hand\n\nProduced by `python somewhere.py`')
  assert table[('at', 2.5)]['test']['kappa'][:2] == pytest.approx((0.79, np.std([0.8, 0.78],
                                                                                ddof=1)))
  row = [l for l in text.splitlines() if l.startswith('| AT+ - CE | 2.5x |')]
  cells = [c.strip() for c in row[0].split('|')[1:-1]]
  # differences +0.10 and +0.03: mean +0.065, both wins; gap closed 0.065 / mean(0.25, 0.22)
  assert cells[2:4] == ['2', '+0.065'] and cells[7] == '2 / 2', cells
  assert cells[10] == f'{100 * 0.065 / 0.235:.0f} %', cells
  assert json.loads((tmp_path / 'page' / 'R.json').read_text())['at|2.5']['test']['kappa'][2] == 2
  for png in ('R_kappa.png', 'R_differences.png', 'R_curves.png'):
    assert (tmp_path / 'page' / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png


def test_intro_placeholders_are_the_pages_own_paired_numbers(tmp_path):
  """An intro's {{...}} are filled from the page's paired numbers (by hand here), views after N
  epochs included, and kept as <page>_paired.json for another page to quote; a placeholder that
  names nothing is one error naming the file and the placeholder."""
  split = lambda k: {'kappa': k, 'balanced_accuracy': k}
  def student(test, epochs=2, key='student', selected=None):
    return {key: {'val': split(0.9), 'test': split(test), 'epoch': selected or epochs,
                  'history': [{'epoch': e + 1, 'val': {'kappa': 0.9}} for e in range(epochs)]}}
  results = {}
  for seed, (t, ce, at) in {1: (0.95, 0.70, 0.80), 2: (0.97, 0.75, 0.78)}.items():
    results[('teacher', None, seed)] = student(t, key='teacher')
    results[('ce', 2.5, seed)] = student(ce)
    results[('at', 2.5, seed)] = student(at, epochs=1 + seed, selected=2)  # seed 2: 2 of 3
  early = {**results, ('at', 2.5, 1): student(0.60)}  # the view after N epochs: AT+ loses seed 1
  intro = tmp_path / 'intro.md'
  intro.write_text('AT+ {{at.verdict}} ({{at.reading}}): {{at.mean}} (CI {{at.ci}}; {{at.diffs}}; {{at.wins}} wins '
                   'of {{at.n}}; {{at.share}} of the {{at.gap}} gap; seeds {{at.seeds}}); early '
                   '{{ at@4.mean }}, {{at:2.5@4.wins}} of {{at@4.n}}; last {{last_epoch}}.\n')
  out = tmp_path / 'R.md'
  kwargs = dict(title='Hand', command='python x.py', seeds_text='1,2',
                labels=('10x', 'validation kappa'), wall=0.0,
                fingerprints={c: 'same' for c in results})
  sr.write_report(results, str(out), [2.5], ['ce', 'at'], [1, 2], intro=str(intro),
                  views={4: early}, **kwargs)
  # differences +0.10 and +0.03: mean +0.065, sd 0.0495, t_{0.975, 1} = 12.706
  half = 12.7062047 * np.std([0.10, 0.03], ddof=1) / np.sqrt(2)
  gap = np.mean([0.95 - 0.70, 0.97 - 0.75])
  want = (f'AT+ is not answered yet (the interval includes zero, so no gain is shown yet): +0.065 (CI [{0.065 - half:+.3f}, {0.065 + half:+.3f}]; '
          f'+0.100 and +0.030; 2 wins of 2; {100 * 0.065 / gap:.0f} % of the {gap:.3f} gap; seeds '
          f'1 and 2); early {np.mean([-0.10, 0.03]):+.3f}, 1 of 2; last 3 of 4.')
  assert want in ' '.join(out.read_text().split()), out.read_text()  # wrapped again: see below
  saved = json.loads((tmp_path / 'R_paired.json').read_text())
  assert set(saved) == {'at|2.5', 'at|2.5@4'} and saved['at|2.5']['seeds'] == [1, 2]
  # Another page quotes this one's numbers through its _paired.json.
  other = tmp_path / 'other.md'
  other.write_text('There: {{R.md#at.mean}} over {{R.md#at@4.n}} seeds.\n')
  assert sr.fill_placeholders(other.read_text(), {}, str(other), str(tmp_path)) == (
      'There: +0.065 over 2 seeds.\n')
  # A filled paragraph is wrapped again at 100 columns, with no line that would start a list;
  # a list or table is left as it is.
  long = ' '.join(['FM + AT+ - CE = {{at.mean}} (CI {{at.ci}}),'] * 12)
  filled = sr.fill_placeholders(f'{long}\n\n- {long}\n', saved, 'x.md')
  prose, bullet = filled.split('\n\n')
  assert ' '.join(prose.split()) == ' '.join(
      ['FM + AT+ - CE = +0.065 (CI [-0.380, +0.510]),'] * 12)
  assert max(map(len, prose.splitlines())) <= 100 and len(prose.splitlines()) > 3
  assert not [l for l in prose.splitlines() if l.startswith(('- ', '+ '))], prose
  assert bullet.count('\n') == 1 and bullet.startswith('- FM + AT+')  # as written, filled
  # The verdict and its reason follow the interval: a gain, a loss, no gain at the target width.
  x = dict(saved['at|2.5'], gap=0.2)
  assert sr.verdict(dict(x, lo=0.01, hi=0.2)) == 'beats CE'
  assert sr.reading(dict(x, lo=-0.2, hi=-0.01)) == 'the interval lies below zero: a loss'
  assert sr.format_field(dict(x, lo=-0.02, hi=0.03), 'reading') == (
      'the interval includes zero and rules out a gain above +0.030 (15 % of the gap)')
  assert sr.verdict(dict(x, lo=-0.02, hi=0.03)) == 'does not beat CE'
  for bad, why in [('{{at.median}}', "no field 'median'"), ('{{kd.mean}}', 'no paired numbers for kd'),
                   ('{{at@9.mean}}', 'after 9 epochs'), ('{{at:1.25.mean}}', 'at 1.25x'),
                   ('{{nope.md#at.mean}}', 'nope_paired.json does not exist'),
                   ('{{at mean}}', 'not a placeholder')]:
    intro.write_text(f'x {bad} y\n')
    with pytest.raises(sr.errors.UserError) as e:
      sr.write_report(results, str(out), [2.5], ['ce', 'at'], [1, 2], intro=str(intro),
                      views={4: early}, **kwargs)
    assert str(e.value).startswith(f'{intro}: {bad}: ') and why in str(e.value), str(e.value)
