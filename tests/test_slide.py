"""Whole-slide inference (camkd_jax.wsi, camkd_jax.slide) on synthetic Aperio-like slides read by
the real OpenSlide (no mocks)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

openslide = pytest.importorskip('openslide')  # the `slides` extra, part of `test`

from camkd_jax import gleason  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import inference  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import slide as slide_cli  # pylint: disable=wrong-import-position
from camkd_jax import slide_outputs  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import slide_testdata  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import wsi  # pylint: disable=g-import-not-at-top,wrong-import-position
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position
from helpers import write_xlsx  # pylint: disable=g-import-not-at-top,wrong-import-position
import run_export  # pylint: disable=g-import-not-at-top,wrong-import-position

P = conftest.SLIDE_TILE      # patch = teacher tile at 10x
CLASSES = conftest.SLIDE_CLASSES


@pytest.fixture(scope='module')
def random_run(tmp_path_factory):
  """A finished run with random parameters: enough where only the geometry is checked."""
  workdir = str(tmp_path_factory.mktemp('random'))
  run_export.export_run(workdir, P, 4)
  return workdir


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A tiny teacher trained for 300 steps (~25 s) and exported as a finished run."""
  model, params, accuracy, num_test = run_export.train_tiny_teacher(P)
  workdir = str(tmp_path_factory.mktemp('trained'))
  run_export.export_run(workdir, P, 4, teacher_params=params)
  return workdir, model, params, accuracy, num_test


# ----------------------------------------------------------------------------- predictions
def _predictions(out_dir, name):
  with open(os.path.join(out_dir, name, 'tiles.csv')) as f:
    rows = list(csv.DictReader(f))
  return rows


@pytest.mark.slow
def test_predicted_map_agrees_with_ground_truth(slides, trained_run, tmp_path):
  """The trained tiny teacher on the 10x and 20x slides.

  1. Exactness: every tile's probabilities equal those of the same model on the 32 px patch that
     the writer put there (Predictor on the patches), so the slide pipeline adds no error.
  2. The issue's criterion: agreement of the predicted map with the ground truth >= the model's
     patch-level test accuracy p minus a margin MEASURED from p, not tuned: three standard errors
     of the difference of two independent accuracy estimates, 3 sqrt(p (1 - p) (1 / n_tiles +
     1 / n_test)). With p ~ 0.75, 168 tiles and 256 test patches that is ~0.13.
  """
  workdir, model, params, accuracy, num_test = trained_run
  _, s = slides
  truth = s['s10']
  rm = inference.load_run_model(workdir, 'teacher')
  results = slide_cli.run_slides(workdir, 'teacher', [truth.path, s['s20'].path], str(tmp_path),
                                 slide_cli.Options(batch_size=16, readers=2))
  assert [r['status'] for r in results] == ['ok', 'ok']
  image, _ = slide_testdata.render_content(truth.cells, P)
  rr, cc = np.nonzero(truth.cells >= 0)
  patches = np.stack([image[r * P:(r + 1) * P, c * P:(c + 1) * P] for r, c in zip(rr, cc)])
  direct = inference.Predictor(rm, 16).predict(patches)
  direct_by_cell = {(r, c): p for r, c, p in zip(rr, cc, direct)}
  margin = 3 * np.sqrt(accuracy * (1 - accuracy) * (1 / len(rr) + 1 / num_test))
  for name in ('s10', 's20'):
    rows = _predictions(str(tmp_path), name)
    assert len(rows) == len(rr)
    agree = []
    for row in rows:
      cell = (int(row['row']), int(row['col']))
      probs = np.array([float(row[f'prob_{c}']) for c in rm.class_names])
      np.testing.assert_allclose(probs, direct_by_cell[cell], atol=1e-5)
      agree.append(rm.class_names.index(row['prediction']) == truth.cells[cell])
    agreement = float(np.mean(agree))
    print(f"\n{name}: agreement {agreement:.4f}, test accuracy {accuracy:.4f}, margin {margin:.4f}")
    assert agreement >= accuracy - margin, (name, agreement, accuracy, margin)
    summary = json.load(open(tmp_path / name / 'summary.json'))
    assert summary['tissue_tiles'] == len(rr) and summary['level'] == 0
    assert summary['resample'] == (1.0 if name == 's10' else 2.0)
    fractions = summary['class_fractions']
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert summary['tissue_area_mm2'] == pytest.approx(168 * 32 ** 2 / 1e6, rel=0.05)
    for png in ('heatmap.png', 'overlay.png'):
      assert os.path.getsize(tmp_path / name / png) > 1000


def test_student_reads_the_lower_level_and_upsamples(slides, random_run, tmp_path):
  """The (upsampled, f = 4) student on the 10x slide reads level 1 (2.5x) as it is and sees the
  8 px tiles bilinearly upsampled: its probabilities equal the Predictor's on the level-1
  pixels of each cell."""
  truth = slides[1]['s10']
  rm = inference.load_run_model(random_run, 'student')
  runner = slide_cli.SlideRunner(rm, 'student', str(tmp_path), slide_cli.Options(batch_size=16))
  assert runner.run([truth.path])[0]['status'] == 'ok'
  image, _ = slide_testdata.render_content(truth.cells, P)
  level1 = slide_testdata.area_downsample(image, 4)
  rows = _predictions(str(tmp_path), 's10')
  cells = [(int(r['row']), int(r['col'])) for r in rows]
  tiles = np.stack([level1[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] for r, c in cells])
  want = inference.Predictor(rm, 16).predict(tiles)
  got = np.array([[float(r[f'prob_{c}']) for c in rm.class_names] for r in rows])
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert {r['level'] for r in rows} == {'1'} and runner.predictor.compiled_programs() == 1


def test_cli_bad_files_are_named_and_the_others_finish(slides, random_run, tmp_path):
  """A text file, a slide without metadata and a slide whose tiles do not decode, among two good
  slides: one error line each naming the file, the good slides' outputs, exit status 1."""
  d, s = slides
  out = tmp_path / 'out'
  bad = [str(d / 'notes.svs'), s['nometa'].path, s['corrupt']]
  args = [sys.executable, '-m', 'camkd_jax.slide', '--workdir', random_run, '--model',
          'teacher', '--out', str(out), '--batch_size', '16', '--readers', '2',
          s['s10'].path, *bad, s['s20'].path]
  env = dict(os.environ, PYTHONPATH=conftest.REPO)
  proc = subprocess.run(args, env=env, cwd=conftest.REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  failed = [l for l in proc.stderr.splitlines() if 'FAILED' in l]
  assert len(failed) == 3, failed
  for path, why in zip(bad, ('not a slide format OpenSlide can read', 'no magnification metadata',
                             'reading tiles failed')):
    assert any(path in l and why in l for l in failed), (path, failed)
  assert 'Traceback' not in proc.stderr
  summary = json.load(open(out / 'run_summary.json'))
  assert [r['status'] for r in summary['slides']].count('ok') == 2
  for name in ('s10', 's20'):
    assert len(_predictions(str(out), name)) == 168
  assert not (out / 'corrupt' / 'tiles.csv').exists()
  assert 'slides 5/5' in proc.stderr
  cohort = list(csv.DictReader(open(out / 'slides.csv')))  # the command line's order
  assert [(r['slide'], r['status']) for r in cohort] == [
      ('s10', 'ok'), ('notes', 'failed'), ('nometa', 'failed'), ('corrupt', 'failed'),
      ('s20', 'ok')]
  for name in ('s10', 's20'):  # the grade in the command's output
    g = json.load(open(out / name / 'summary.json'))['gleason']
    grade = f"Gleason {g['score']}, grade group {g['grade_group']}" if g['grade_group'] else \
        'benign'
    assert f'{name}: {grade} (tumour' in proc.stderr


def test_cli_on_a_run_that_is_not_finished(tmp_path, slides):
  """A workdir without a finished student: one error line, exit status 2, no traceback."""
  (tmp_path / 'config.json').write_text('{"method": "ce"}')
  proc = subprocess.run([sys.executable, '-m', 'camkd_jax.slide', '--workdir', str(tmp_path),
                         '--out', str(tmp_path / 'out'), slides[1]['s10'].path],
                        env=dict(os.environ, PYTHONPATH=conftest.REPO), cwd=conftest.REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert f'no finished student in {tmp_path}/student' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_slides_are_shared_across_processes():
  paths = [f's{i}' for i in range(7)]
  shares = [slide_cli.my_slides(paths, p, 3) for p in range(3)]
  assert shares == [['s0', 's3', 's6'], ['s1', 's4'], ['s2', 's5']]
  assert slide_cli.output_names(['a/x.svs', 'b/x.svs', 'c/y.ndpi']) == ['x_0', 'x_1', 'y']


@pytest.mark.slow
def test_two_processes_share_the_slides(slides, random_run, tmp_path):
  """Under jax.distributed (two CPU processes on localhost) slide i goes to process i % 2: each
  writes its own slides and run_summary_p<i>.json; the process with the bad file exits 1."""
  import test_distributed  # pylint: disable=g-import-not-at-top
  d, s = slides
  workdir = random_run
  port = test_distributed.free_port()
  out = tmp_path / 'out'
  argv = [sys.executable, '-m', 'camkd_jax.slide', '--workdir', workdir, '--model', 'teacher',
          '--out', str(out), '--batch_size', '16', '--readers', '1',
          s['s10'].path, s['s20'].path, str(d / 'notes.svs')]
  procs = []
  for i in range(2):
    env = test_distributed._env(1, str(tmp_path / 'cache'), dict(  # pylint: disable=protected-access
        CAMKD_COORDINATOR=f'localhost:{port}', CAMKD_PROCESS_ID=str(i), CAMKD_NUM_PROCESSES='2'))
    procs.append(subprocess.Popen(argv, env=env, cwd=conftest.REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [1, 0], logs
  p0 = json.load(open(out / 'run_summary_p0.json'))
  p1 = json.load(open(out / 'run_summary_p1.json'))
  assert [(r['name'], r['status']) for r in p0['slides']] == [('s10', 'ok'), ('notes', 'failed')]
  assert [(r['name'], r['status']) for r in p1['slides']] == [('s20', 'ok')]
  assert (p0['processes'], p1['process']) == (2, 1)
  for name in ('s10', 's20'):
    assert len(_predictions(str(out), name)) == 168
  # process 0 merged both processes' rows into slides.csv
  cohort = list(csv.DictReader(open(out / 'slides.csv')))
  assert sorted((r['slide'], r['status']) for r in cohort) == [
      ('notes', 'failed'), ('s10', 'ok'), ('s20', 'ok')]


# ----------------------------------------------------------------------------- Gleason scoring
GLEASON = [0, 3, 4, 5]  # NC, G3, G4, G5


@pytest.mark.parametrize('counts, text, group', [
    ((20, 48, 32, 0), '3+4=7', 2),   # tumour 60 % G3, 40 % G4
    ((20, 32, 48, 0), '4+3=7', 3),
    ((10, 40, 0, 0), '3+3=6', 1),
    ((0, 0, 48, 32), '4+5=9', 5),
    ((40, 0, 0, 0), 'benign', 0),
    ((10, 58, 2, 0), '3+3=6', 1),    # G4 = 2 / 60 = 3.3 % of the tumour: under the 5 % threshold
    ((10, 30, 15, 5), '3+5=8', 4),   # biopsy rule: the highest remaining pattern, here 8 %
])
def test_ground_truth_map_of_a_known_composition_scores_exactly(tmp_path, counts, text, group):
  """A slide written with exactly these cells per class, planned by the real OpenSlide path:
  scoring its ground-truth tile map gives the published answer."""
  layout = slide_testdata.composition_layout(counts, seed=1)
  truth = slide_testdata.write_slide(str(tmp_path / 'c.svs'), P, layout=layout)
  plan = wsi.plan_slide(truth.path, 10, P, P)
  labels = truth.cells[plan.grid[:, 0], plan.grid[:, 1]]
  assert (labels >= 0).all() and np.bincount(labels, minlength=4).tolist() == list(counts)
  g = gleason.slide_score(np.eye(4)[labels], GLEASON, tile_area_mm2=slide_outputs.tile_area_mm2(plan))
  assert (g['score'], g['grade_group']) == (text, group)
  tumour = sum(counts[1:])
  assert g['pattern_percent'] == pytest.approx(
      {str(p): 100 * counts[k + 1] / tumour if tumour else 0.0 for k, p in enumerate((3, 4, 5))})
  assert g['tissue_mm2'] == pytest.approx(sum(counts) * (P * 1e-3) ** 2)


@pytest.mark.slow
def test_trained_model_grades_a_slide_of_its_best_pattern(trained_run, tmp_path):
  """The trained tiny teacher on a slide made of one Gleason pattern only: the one it recognises
  best on its own test patches (recall r, measured here on the fixture's 256 test patches).

  1. Exactness: the slide's score equals the score of the model's probabilities on the written
     patches (the Predictor), so the pipeline adds nothing.
  2. A bound from r, not a tuned number: the share of the slide's n tiles the model gets right is
     >= r - 3 standard errors of the difference of the two proportions (Agresti-Coull estimate,
     so that r = 1 still has an error). Then at most e = 1 - (r - margin) of the tiles go to other
     classes; with e < 1/2 the pattern is the primary one, and with the noise threshold above e
     the score is exactly p+p.
  """
  workdir, _, _, _, num_test = trained_run
  rm = inference.load_run_model(workdir, 'teacher')
  predictor = inference.Predictor(rm, 16)
  xt, yt = run_export.synthetic_patches(num_test, P, 2)  # the fixture's test patches
  pred = predictor.predict(xt).argmax(1)
  recall = {k: (int((pred[yt == k] == k).sum()), int((yt == k).sum())) for k in (1, 2, 3)}
  best = max(recall, key=lambda k: recall[k][0] / recall[k][1])
  hits, m = recall[best]
  pattern = GLEASON[best]
  counts = [0, 0, 0, 0]
  counts[best] = n = 100
  truth = slide_testdata.write_slide(str(tmp_path / 'pure.svs'), P, seed=5,
                                     layout=slide_testdata.composition_layout(counts, seed=2))
  labels = tmp_path / 'wsi_labels.xlsx'
  write_xlsx(str(labels), [('pure', 'p1', pattern, pattern), ('absent', 'p2', 3, 4)],
             header=('slide_id', 'patient_id', 'Gleason_primary', 'Gleason_secondary'))
  out = tmp_path / 'out'
  results = slide_cli.run_slides(workdir, 'teacher', [truth.path], str(out),
                                 slide_cli.Options(batch_size=16, readers=2, labels=str(labels)))
  assert [r['status'] for r in results] == ['ok']
  g = json.load(open(out / 'pure' / 'summary.json'))['gleason']
  # 1. exact
  image, _ = slide_testdata.render_content(truth.cells, P, seed=5)
  rr, cc = np.nonzero(truth.cells >= 0)
  direct = predictor.predict(np.stack([image[r * P:(r + 1) * P, c * P:(c + 1) * P]
                                       for r, c in zip(rr, cc)]))
  want = gleason.slide_score(direct, GLEASON)
  assert (g['score'], g['grade_group']) == (want['score'], want['grade_group'])
  assert g['pattern_percent'] == pytest.approx(want['pattern_percent'], abs=1e-9)
  # 2. the bound
  rows = _predictions(str(out), 'pure')
  agreement = np.mean([r['prediction'] == rm.class_names[best] for r in rows])
  pt = (hits + 2) / (m + 4)
  margin = 3 * np.sqrt(pt * (1 - pt) * (1 / n + 1 / m))
  e = 1 - (hits / m - margin)
  print(f'\npattern {pattern}: recall {hits}/{m}, agreement {agreement:.3f}, margin {margin:.3f}, '
        f'e {e:.3f}; grade {g["score"]} (grade group {g["grade_group"]})')
  assert agreement >= hits / m - margin and e < 0.5
  assert g['primary'] == pattern and g['grade_group'] > 0
  probs = np.array([[float(r[f'prob_{c}']) for c in rm.class_names] for r in rows])
  strict = gleason.slide_score(probs, GLEASON, gleason.Rules(min_share=min(e + 1 / n, 0.99)))
  assert strict['score'] == f'{pattern}+{pattern}={2 * pattern}'
  # the cohort table and the slide-level metrics
  cohort = list(csv.DictReader(open(out / 'slides.csv')))
  assert [(c['slide'], c['status'], c['score']) for c in cohort] == [('pure', 'ok', g['score'])]
  metrics = json.load(open(out / 'slide_metrics.json'))
  assert metrics['metrics']['num_slides'] == 1
  assert metrics['metrics']['accuracy'] == float(
      g['grade_group'] == gleason.grade_group(pattern, pattern))
  assert metrics['notes'] == [f'1 slide(s) of {labels} are not in this run: absent']


def test_cohort_rerun_skips_done_slides_and_overwrite_redoes_them(slides, random_run, tmp_path):
  """slides.csv after a run with a good and a bad file; a rerun skips the good one (its row and
  outputs kept) and retries the bad one; --overwrite redoes both."""
  d, s = slides
  paths = [s['s10'].path, str(d / 'notes.svs')]
  out = tmp_path / 'out'
  opt = slide_cli.Options(batch_size=16, readers=1)
  first = slide_cli.run_slides(random_run, 'teacher', paths, str(out), opt)
  assert [r['status'] for r in first] == ['ok', 'failed']
  rows = list(csv.DictReader(open(out / 'slides.csv')))
  assert [(r['slide'], r['status']) for r in rows] == [('s10', 'ok'), ('notes', 'failed')]
  assert 'not a slide format' in rows[1]['error'] and rows[0]['tiles'] == '168'
  assert rows[0]['grade_group'] != ''  # NC/G3/G4/G5 classes: graded
  summary = json.load(open(out / 's10' / 'summary.json'))
  assert rows[0]['score'] == summary['gleason']['score']
  for name in ('tiles.geojson', 'regions.geojson'):
    assert json.load(open(out / 's10' / name))['type'] == 'FeatureCollection'
  stamp = os.path.getmtime(out / 's10' / 'summary.json')
  again = slide_cli.run_slides(random_run, 'teacher', paths, str(out), opt)
  assert [(r['name'], r['status'], r.get('skipped')) for r in again] == [
      ('s10', 'ok', True), ('notes', 'failed', None)]
  assert os.path.getmtime(out / 's10' / 'summary.json') == stamp
  assert list(csv.DictReader(open(out / 'slides.csv'))) == rows
  opt.overwrite = True
  redo = slide_cli.run_slides(random_run, 'teacher', paths, str(out), opt)
  assert [r.get('skipped') for r in redo] == [None, None]
  assert os.path.getmtime(out / 's10' / 'summary.json') > stamp


def test_an_interrupted_cohort_keeps_its_rows_and_the_rerun_finishes_it(slides, random_run,
                                                                        tmp_path, monkeypatch):
  """Ctrl-C while the second slide's outputs are written: slides.csv holds the first slide's
  row; the same command again skips it and does the second."""
  _, s = slides
  paths, out = [s['s10'].path, s['s20'].path], tmp_path / 'out'
  real = slide_outputs.write_slide

  def interrupted(directory, *args, **kwargs):
    if directory.endswith('s20'):
      raise KeyboardInterrupt
    return real(directory, *args, **kwargs)
  monkeypatch.setattr(slide_outputs, 'write_slide', interrupted)
  opt = slide_cli.Options(batch_size=16, readers=1)
  with pytest.raises(KeyboardInterrupt):
    slide_cli.run_slides(random_run, 'teacher', paths, str(out), opt)
  rows = list(csv.DictReader(open(out / 'slides.csv')))
  assert [(r['slide'], r['status']) for r in rows] == [('s10', 'ok')]
  monkeypatch.setattr(slide_outputs, 'write_slide', real)
  again = slide_cli.run_slides(random_run, 'teacher', paths, str(out), opt)
  assert [(r['name'], r.get('skipped')) for r in again] == [('s10', True), ('s20', None)]
  rows = list(csv.DictReader(open(out / 'slides.csv')))
  assert [(r['slide'], r['status']) for r in rows] == [('s10', 'ok'), ('s20', 'ok')]
