"""The study sweep (experiments/reproduce.py) on a tiny grid: two cells, a few steps."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """What the sweeps of this module share: one generated smoke dataset and one persistent XLA
  cache (the teacher and CE programs are the same in every sweep), so each is built once."""
  root = tmp_path_factory.mktemp('study_shared')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  # No Grad-CAM figure per cell: the sweep's report does not use it, and it costs compiles.
  flags = ['--set=data.data_dir=' + str(root / 'tfds'), '--set=num_figure_images=0']
  return env, flags


def sweep_in_process(argv, capsys):
  """experiments/reproduce.py ARGV in this process (no interpreter start-up): stdout."""
  capsys.readouterr()
  _reproduce_module().main(argv)
  return capsys.readouterr().out


@pytest.mark.slow
def test_reproduce_tiny_grid_writes_results_and_resumes(tmp_path, shared, capsys):
  out = tmp_path / 'RESULTS.md'
  env, flags = shared
  cmd = [sys.executable, 'experiments/reproduce.py', '--magnifications=2.5',
         '--methods=ce,fm_at', '--seeds=22', '--smoke', f'--workdir={tmp_path / "runs"}',
         f'--out={out}', *flags, f'--store={tmp_path / "store"}']
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
  # The per-term gradient diagnostic on the finished FM + AT+ cell.
  diag = subprocess.run(
      [sys.executable, 'experiments/term_gradients.py', f'--workdir={tmp_path / "runs"}',
       '--method=fm_at', '--magnification=2.5', '--seed=22', '--smoke', '--batches=1', '--per_layer',
       flags[0], f'--out={tmp_path / "grads.md"}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert diag.returncode == 0, diag.stdout[-3000:] + diag.stderr[-3000:]
  rows = [l.split('|')[1:-1] for l in (tmp_path / 'grads.md').read_text().splitlines()
          if l.startswith('| init') or l.startswith('| best')]
  terms = {(r[0].strip().split()[0], r[1].strip()): r for r in rows if len(r) == 7}
  assert set(terms) == {(p, t) for p in ('init', 'best') for t in ('ce', 'fm', 'at')}
  # At init the head is N(0, 0.01): logits ~ 0, CE = log(4) to within a few thousandths.
  assert float(terms[('init', 'ce')][3]) == pytest.approx(np.log(4), abs=0.01)
  assert float(terms[('init', 'ce')][5]) == pytest.approx(1.0)  # CE's gradient against itself
  for point in ('init', 'best'):
    assert sum(float(terms[(point, t)][6]) for t in ('ce', 'fm', 'at')) == pytest.approx(1.0, abs=0.02)
  assert 'teacher / student' in (tmp_path / 'grads.md').read_text()
  # Per layer: one row per parameter group (13 convs + classifier) and point; shares sum to 1.
  layer_rows = [r for r in rows if len(r) == 5 and r[1].strip().startswith(('features_', 'classifier'))]
  assert len(layer_rows) == 2 * 14
  for r in layer_rows:
    assert sum(float(v) for v in r[2:]) == pytest.approx(1.0, abs=0.02)
  # Columns ce, fm, at. FM compares block5 features, so the classifier gets none of its gradient
  # (AT+ does reach it: the Grad-CAM weights are d logit / dA, which depend on the classifier).
  assert all(float(r[3]) == 0.0 for r in layer_rows if r[1].strip() == 'classifier')
  # Rerun: every cell is finished, so nothing trains and the same report comes out. (In this
  # process: the script's start-up and exit code were checked above; a cell trained here would
  # still print its '[study' line.)
  assert '[study' not in sweep_in_process(cmd[2:], capsys)
  assert json.loads((tmp_path / 'RESULTS.json').read_text()) == table
  # The store: one record per cell holding the cell's metrics.json, the sweep's settings and the
  # teacher a student was distilled from.
  store = tmp_path / 'store'
  assert sorted(os.listdir(store)) == ['ce_m2.5_s22.json', 'fm_at_m2.5_s22.json', 'sweep.json',
                                       'teacher_s22.json']
  teacher_metrics = json.loads((tmp_path / 'runs' / 'teacher_s22' / 'metrics.json').read_text())
  rec = json.loads((store / 'fm_at_m2.5_s22.json').read_text())
  assert rec['metrics'] == json.loads(
      (tmp_path / 'runs' / 'fm_at_m2.5_s22' / 'metrics.json').read_text())
  assert rec['settings']['smoke'] is True and (rec['method'], rec['seed']) == ('fm_at', 22)
  assert rec['teacher_kappa'] == {s: teacher_metrics['teacher'][s]['kappa'] for s in ('val', 'test')}
  # Both students and the teacher's own record carry the teacher's fingerprint (the pairing check).
  fingerprint = _reproduce_module().teacher_fingerprint(teacher_metrics)
  assert len(fingerprint) == 16
  for name in ('fm_at_m2.5_s22', 'ce_m2.5_s22', 'teacher_s22'):
    assert json.loads((store / f'{name}.json').read_text())['teacher_fingerprint'] == fingerprint
  # A fresh machine: the workdirs are gone, the store is not. The report comes from the store with
  # nothing trained; a new method trains the teacher again (its checkpoint is needed) and only
  # the new cell.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / 'runs')
  assert '[study' not in sweep_in_process(cmd[2:], capsys)
  assert json.loads((tmp_path / 'RESULTS.json').read_text()) == table
  more = subprocess.run([a.replace('--methods=ce,fm_at', '--methods=ce,fm_at,kd') for a in cmd],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
  started = [l for l in more.stdout.splitlines() if l.startswith('[study')]
  assert len(started) == 2, started
  assert 'teacher m=None seed=22' in started[0] and 'again' in started[0]
  assert 'kd m=2.5 seed=22' in started[1]
  assert not (tmp_path / 'runs' / 'ce_m2.5_s22').exists()
  assert set(json.loads((tmp_path / 'RESULTS.json').read_text())) == set(table) | {'kd|2.5'}
  assert (store / 'kd_m2.5_s22.json').exists()


@pytest.mark.slow
def test_reproduce_two_workers_share_the_queue(tmp_path, shared):
  """--workers=2: each cell runs once, in whichever worker claimed it; students after the teacher."""
  out = tmp_path / 'RESULTS.md'
  env, flags = shared
  stale = tmp_path / 'runs' / '.claims' / 'ce_m5_s22'  # left by a killed sweep: must not block
  stale.parent.mkdir(parents=True)
  stale.write_text('')
  cmd = [sys.executable, 'experiments/reproduce.py', '--magnifications=2.5,5', '--methods=ce',
         '--seeds=22', '--smoke', '--workers=2', f'--workdir={tmp_path / "runs"}', f'--out={out}',
         *flags]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  starts = [l for l in proc.stdout.splitlines() if l.startswith('[study')]
  cells = [l.split('] ')[1].split(' ->')[0] for l in starts]
  assert sorted(cells) == ['ce m=2.5 seed=22', 'ce m=5.0 seed=22', 'teacher m=None seed=22'], starts
  assert all(l.startswith(('[study w0 ', '[study w1 ')) for l in starts), starts
  assert cells[0] == 'teacher m=None seed=22', starts  # the students waited for it
  table = json.loads((tmp_path / 'RESULTS.json').read_text())
  assert set(table) == {'teacher|None', 'ce|2.5', 'ce|5.0'}
  for cell, factor in (('ce_m2.5_s22', 4), ('ce_m5_s22', 2)):
    metrics = json.loads((tmp_path / 'runs' / cell / 'metrics.json').read_text())
    assert metrics['student']['factor'] == factor
  assert '| CE only | 5x |' in out.read_text()


def test_work_queue_claims_each_cell_once_and_students_wait_for_their_teacher(tmp_path):
  """Two workers' views of one queue, interleaved by hand (no training): the claim files decide."""
  r = _reproduce_module()
  args = r.parse_args([f'--workdir={tmp_path}', '--seeds=22,32'])
  todo = [('teacher', None, 22), ('teacher', None, 32), ('ce', 2.5, 22), ('kd', 2.5, 22),
          ('ce', 2.5, 32)]
  dirs = [(str(tmp_path / f'{m}_{s}'), 'teacher' if m == 'teacher' else 'student')
          for m, _, s in todo]
  teacher_index = {22: 0, 32: 1}
  configs = [None] * len(todo)  # no config check here (test_a_teacher_of_another_config_...)
  a, b = list(range(5)), list(range(5))  # the cells each worker still considers
  assert r.next_cell(args, todo, a, dirs, teacher_index, configs) == 0  # A: teacher 22
  assert r.next_cell(args, todo, b, dirs, teacher_index, configs) == 1  # B: 22 is claimed -> teacher 32
  assert b == [2, 3, 4]
  # Students wait: neither teacher has finished, so nothing can start (and nothing is dropped).
  assert r.next_cell(args, todo, a, dirs, teacher_index, configs) is None and a == [2, 3, 4]
  # Teacher 32 finishes first: A (idle) takes its student although seed 22's come first in order.
  os.makedirs(dirs[1][0])
  with open(os.path.join(dirs[1][0], 'metrics.json'), 'w') as f:
    json.dump({'teacher': {}}, f)
  assert r.next_cell(args, todo, a, dirs, teacher_index, configs) == 4 and a == [2, 3]
  os.makedirs(dirs[0][0])
  with open(os.path.join(dirs[0][0], 'metrics.json'), 'w') as f:
    json.dump({'teacher': {}}, f)
  assert r.next_cell(args, todo, b, dirs, teacher_index, configs) == 2  # B
  assert r.next_cell(args, todo, a, dirs, teacher_index, configs) == 3  # A: 2 is B's
  assert r.next_cell(args, todo, b, dirs, teacher_index, configs) is None and b == []  # all claimed
  assert sorted(os.listdir(tmp_path / '.claims')) == sorted(
      os.path.basename(d) for d, _ in dirs)


def test_claimed_cells_gives_up_when_a_teacher_never_finishes(tmp_path):
  r = _reproduce_module()
  args = r.parse_args([f'--workdir={tmp_path}', '--seeds=22', '--teacher_wait_s=0.02'])
  todo = [('teacher', None, 22), ('ce', 2.5, 22)]
  dirs = [(str(tmp_path / 'teacher_s22'), 'teacher'), (str(tmp_path / 'ce_m2.5_s22'), 'student')]
  assert r.claim(args, dirs[0][0])  # another worker holds the teacher and never finishes it
  with pytest.raises(SystemExit, match=r'still wait for their teachers after 0 s.*Rerun'):
    list(r.claimed_cells(args, todo, [0, 1], dirs, {22: 0}, [None, None], poll_s=0.01))


def test_a_teacher_of_another_config_does_not_release_its_students(tmp_path, capsys):
  """Workers: a seed's teacher workdir still holding the metrics of another config (a sweep rerun
  with other settings) is not a finished teacher: its students wait until a worker has trained it
  again under this sweep's config, instead of distilling from the old one."""
  from camkd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from camkd_jax import runs  # pylint: disable=g-import-not-at-top
  r = _reproduce_module()
  old = r.parse_args(['--protocol=paper', '--set=teacher.num_epochs=2', f'--workdir={tmp_path}'])
  args = r.parse_args(['--protocol=paper', '--set=teacher.num_epochs=3', f'--workdir={tmp_path}'])
  todo = [('teacher', None, 22), ('ce', 2.5, 22)]
  dirs = [(r.cell_dir(args, c), r.study_report.cell_key(c)) for c in todo]
  configs = [r.cell_config(args, c, dirs[0][0]) for c in todo]
  os.makedirs(dirs[0][0])
  checkpoints.write_json(os.path.join(dirs[0][0], 'config.json'),
                         runs.config_dict(r.cell_config(old, todo[0], dirs[0][0])), barrier=False)
  checkpoints.write_json(os.path.join(dirs[0][0], 'metrics.json'), {'teacher': {}}, barrier=False)
  assert r.claim(args, dirs[0][0])  # another worker trains the teacher again
  left = [1]
  capsys.readouterr()
  assert r.next_cell(args, todo, left, dirs, {22: 0}, configs) is None and left == [1]
  assert not r.teacher_ready(dirs[0][0], configs[0]) and r.teacher_ready(dirs[0][0], None)
  assert 'another config' not in capsys.readouterr().out  # polling says nothing
  # Trained again under this config: the student may start.
  checkpoints.write_json(os.path.join(dirs[0][0], 'config.json'), runs.config_dict(configs[0]),
                         barrier=False)
  assert r.next_cell(args, todo, left, dirs, {22: 0}, configs) == 1


def _reproduce_module():
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  try:
    import reproduce  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return reproduce


def test_store_refuses_a_sweep_with_other_settings(tmp_path):
  reproduce = _reproduce_module()
  args = reproduce.parse_args([f'--store={tmp_path}', '--protocol=paper', '--set=num_epochs=2'])
  reproduce.check_store(args)  # creates sweep.json
  reproduce.check_store(args)  # the same settings: fine
  other = reproduce.parse_args([f'--store={tmp_path}', '--protocol=paper', '--set=num_epochs=3'])
  with pytest.raises(SystemExit, match=r"holds the records of a sweep with other settings \(set: "
                     r"store \['num_epochs=2'\], this sweep \['num_epochs=3'\]\)"):
    reproduce.check_store(other)


def test_set_loss_weight_applies_only_where_the_method_uses_the_term():
  """--set=loss.at=3 tunes AT+ in 'at'/'fm_at' but must not switch AT+ on for CE, KD or FM."""
  r = _reproduce_module()
  overrides = ['loss.at=3', 'loss.fm=0.5', 'num_epochs=2']
  expected = {'ce': dict(ce=1.0, kd=0.0, fm=0.0, at=0.0), 'kd': dict(ce=1.0, kd=1.0, fm=0.0, at=0.0),
              'fm': dict(ce=1.0, kd=0.0, fm=0.5, at=0.0), 'at': dict(ce=1.0, kd=0.0, fm=0.0, at=3.0),
              'fm_at': dict(ce=1.0, kd=0.0, fm=0.5, at=3.0)}
  for method, weights in expected.items():
    config = r.method_config(method, 'magnification=2.5', 22, overrides)
    assert {t: config.loss[t] for t in weights} == weights, method
    assert config.num_epochs == 2 and config.seed == 22
  assert r.method_overrides(overrides, None) == ['num_epochs=2']  # the CE-only teacher
  with pytest.raises(KeyError, match='loss.nope'):
    r.method_config('ce', 'magnification=2.5', 22, ['loss.nope=1'])


def test_worker_share_parses_and_rejects():
  r = _reproduce_module()
  assert r.worker_share('') == (0, 1) and r.worker_share('1/3') == (1, 3)
  for bad in ('3/3', 'x', '1-2'):
    with pytest.raises(SystemExit, match='--worker'):
      r.worker_share(bad)


def test_estimate_seconds_by_hand():
  """100 train images at batch 32 -> 3 steps of 32 = 96 images per epoch; val+test 30 images."""
  r = _reproduce_module()
  est = r.estimate_seconds((100, 10, 20), 32, teacher_epochs=2, student_epochs=3,
                           methods=['ce', 'at'], num_mags=2, num_seeds=3, distill_rate=10.0,
                           teacher_rate=20.0, eval_rate=60.0)
  assert est['teacher'] == pytest.approx(2 * (96 / 20 + 30 / 60))     # 10.6
  assert est['students']['ce'] == pytest.approx(3 * (96 / 20 + 0.5))  # 15.9: teacher program
  assert est['students']['at'] == pytest.approx(3 * (96 / 10 + 0.5))  # 30.3: distill program
  assert est['total'] == pytest.approx(3 * (10.6 + 2 * (15.9 + 30.3)))
  # Defaults: teacher rate = distill rate, eval rate = 3 x teacher rate.
  d = r.estimate_seconds((100, 10, 20), 32, 1, 1, ['kd'], 1, 1, 10.0)
  assert d['teacher'] == pytest.approx(96 / 10 + 30 / 30)


def test_estimate_cli_prints_the_sicapv2_grid(capsys):
  r = _reproduce_module()
  est = r.main(['--dataset=sicapv2', '--estimate=310,410,1230'])
  out = capsys.readouterr().out
  assert 'sicapv2: splits (7472, 2487, 2122), batch 32, teacher 20 epochs, students 20 epochs' in out
  steps = 7472 // 32
  teacher = 20 * (steps * 32 / 410 + (2487 + 2122) / 1230)
  assert est['teacher'] == pytest.approx(teacher)
  assert est['total'] == pytest.approx(3 * (teacher + 4 * (
      20 * (steps * 32 / 410 + (2487 + 2122) / 1230) + 4 * 20 * (steps * 32 / 310 + (2487 + 2122) / 1230))))
  with pytest.raises(SystemExit, match='--estimate'):
    r.main(['--estimate=fast'])


# ----------------------------------------------------------------------------- paired design
def test_methods_of_a_seed_differ_only_in_their_loss():
  """A seed's students share everything but the loss: seed (hence data order and augmentation
  key, train.stage_seeds), data, augmentation, optimiser, epochs, selection and model; the sweep
  gives them one teacher checkpoint (the seed's teacher cell)."""
  r = _reproduce_module()
  args = r.parse_args(['--protocol=paper', '--set=num_epochs=10', '--workdir=/w'])

  def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {prefix + k: v})
    return out
  ce = flat(r.method_config('ce', r.config_arg(args, 1.25), 22, args.set).to_dict())
  for method in ('kd', 'fm', 'at', 'fm_at'):
    other = flat(r.method_config(method, r.config_arg(args, 1.25), 22, args.set).to_dict())
    differ = {k for k in set(ce) | set(other) if ce.get(k) != other.get(k)}
    assert differ and all(k == 'method' or k.startswith('loss.') for k in differ), (method, differ)
    assert other['seed'] == 22 and other['num_epochs'] == 10
  assert r.cell_dir(args, ('teacher', None, 22)) == os.path.join('/w', 'teacher_s22')
  assert r.cell_dir(args, ('fm_at', 1.25, 22)) == os.path.join('/w', 'fm_at_m1.25_s22')


def test_a_cell_of_another_config_is_not_finished(tmp_path, capsys):
  """A workdir's metrics.json counts only for the config that wrote it: a sweep rerun with more
  epochs over the same workdirs runs its cells again (they continue), instead of taking the
  shorter runs' metrics as its own."""
  from camkd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from camkd_jax import runs  # pylint: disable=g-import-not-at-top
  r = _reproduce_module()
  args8 = r.parse_args(['--protocol=paper', '--set=num_epochs=8', f'--workdir={tmp_path}'])
  args16 = r.parse_args(['--protocol=paper', '--set=num_epochs=16', f'--workdir={tmp_path}'])
  cell = ('at', 2.5, 22)
  wd, teacher_wd = r.cell_dir(args8, cell), r.cell_dir(args8, ('teacher', None, 22))
  os.makedirs(wd)
  checkpoints.write_json(os.path.join(wd, 'config.json'),
                         runs.config_dict(r.cell_config(args8, cell, teacher_wd)), barrier=False)
  checkpoints.write_json(os.path.join(wd, 'metrics.json'), {'student': {'epoch': 8}},
                         barrier=False)
  assert r.finished(wd, 'student') == {'student': {'epoch': 8}}
  assert r.finished(wd, 'student', r.cell_config(args8, cell, teacher_wd))['student']['epoch'] == 8
  assert r.finished(wd, 'teacher', r.cell_config(args8, cell, teacher_wd)) is None
  capsys.readouterr()
  assert r.finished(wd, 'student', r.cell_config(args16, cell, teacher_wd)) is None
  assert 'was written by another config (num_epochs: 8 -> 16); the cell runs again' in (
      capsys.readouterr().out)
  # Another teacher path is another config too (the student was distilled from another file).
  assert r.finished(wd, 'student', r.cell_config(args8, cell, str(tmp_path / 'elsewhere'))) is None


def test_an_interrupted_cell_ends_the_sweep_in_one_line(tmp_path, monkeypatch, capsys):
  """The command line turns the training loop's Interrupted (Ctrl-C / SIGTERM, checkpointed) into
  one `error:` line with the signal's exit code, and installs the handlers that raise it."""
  import signal  # pylint: disable=g-import-not-at-top
  from camkd_jax import errors  # pylint: disable=g-import-not-at-top
  from camkd_jax import interrupts  # pylint: disable=g-import-not-at-top
  r = _reproduce_module()
  seen = {}

  def interrupted(config, workdir):
    seen['handler'] = signal.getsignal(signal.SIGINT)
    raise errors.Interrupted('interrupted at step 7; rerun the same command to resume from step '
                             '7 (student stage, SIGINT)', signal.SIGINT)
  monkeypatch.setattr(r, 'run_cell', interrupted)
  saved = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
  hook = sys.unraisablehook
  try:
    with pytest.raises(SystemExit) as e:
      r.cli_main(['--protocol=paper', '--methods=ce', '--magnifications=2.5', '--seeds=22',
                  f'--workdir={tmp_path}', f'--out={tmp_path / "R.md"}'])
  finally:
    for s, h in saved.items():
      signal.signal(s, h)
    sys.unraisablehook = hook
    interrupts.reset()
  assert e.value.code == 130
  assert seen['handler'] is interrupts._handler  # pylint: disable=protected-access
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ('error: interrupted at step 7; rerun the same command to resume from step 7 '
                     '(student stage, SIGINT)')


def test_paired_report_from_the_committed_records(tmp_path):
  """--report_only --paired on the committed 3-seed records: the per-seed differences are the
  records' test kappas subtracted, with scipy's paired t; a plot of them is written."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  r = _reproduce_module()
  store = os.path.join(REPO, 'experiments', 'results', 'imagenet_cells')
  out = tmp_path / 'R.md'
  r.main(['--protocol=paper', '--magnifications=1.25', '--methods=ce,at', '--seeds=22,32,43',
          '--set=num_epochs=2', '--set=teacher.num_epochs=2', f'--store={store}',
          f'--workdir={tmp_path / "none"}', f'--out={out}', '--report_only', '--paired'])
  kappa = lambda cell: json.load(open(os.path.join(store, cell + '.json')))['metrics'][
      'student']['test']['kappa']
  at = [kappa(f'at_m1.25_s{s}') for s in (22, 32, 43)]
  ce = [kappa(f'ce_m1.25_s{s}') for s in (22, 32, 43)]
  ref = stats.ttest_rel(at, ce)
  ci = ref.confidence_interval()
  text = out.read_text()
  row = [l for l in text.splitlines() if l.startswith('| AT+ - CE | 1.25x |')]
  assert len(row) == 1, text
  cells = [c.strip() for c in row[0].split('|')[1:-1]]
  assert cells[2] == '3' and cells[3] == f'{np.mean(np.subtract(at, ce)):+.3f}'
  assert cells[5] == f'[{ci.low:+.3f}, {ci.high:+.3f}]' and cells[6] == f'{ref.pvalue:.3f}'
  assert cells[7] == f'{int(np.sum(np.subtract(at, ce) > 0))} / 3'
  sd = np.std(np.subtract(at, ce), ddof=1)
  need = next(n for n in range(2, 1000) if stats.t.ppf(0.975, n - 1) * sd / n ** 0.5 <= 0.03)
  assert cells[11] == f'{sd:.3f}' and cells[12] == str(need) and 40 < need < 60, cells
  assert '| 32 | 1.000 | 0.718 (e2) | 0.896 (e2) | +0.178 |' in text
  assert 'The selected epoch is the last one for 6 of 6 students.' in text
  assert 'PARTIAL' not in text
  for png in ('R_differences.png', 'R_curves.png'):
    with open(tmp_path / png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', png
  assert '![validation kappa after every epoch](R_curves.png)' in text


def test_report_labels_come_from_the_grid_config():
  """The teacher's magnification and the selection rule are read from the config, not assumed."""
  r = _reproduce_module()
  default = r.parse_args(['--seeds=22'])
  assert r.study_labels(default) == ('10x', 'validation kappa')
  other = r.parse_args(['--seeds=22', '--set=base_magnification=20',
                        '--set=selection.metric=slide_kappa'])
  assert r.study_labels(other) == ('20x', 'validation slide-level kappa')


def test_cell_logging_drops_library_info_and_keeps_the_driver_lines():
  import logging as std_logging
  from absl import logging
  reproduce = _reproduce_module()
  reproduce.cell_logging()
  reproduce.cell_logging()  # idempotent: one filter
  absl_logger = logging.get_absl_logger()
  from camkd_jax import cli
  assert absl_logger.filters.count(cli.quiet_library_record) == 1
  assert logging.get_verbosity() == logging.INFO

  def record(path, level):
    return std_logging.LogRecord('absl', level, path, 1, 'msg', None, None)

  orbax = os.path.join(os.sep, 'env', 'site-packages', 'orbax', 'checkpoint', 'x.py')
  tfds = os.path.join(os.sep, 'env', 'site-packages', 'tensorflow_datasets', 'core', 'x.py')
  driver = os.path.join(REPO, 'camkd_jax', 'stage.py')
  assert not absl_logger.filter(record(orbax, std_logging.INFO))
  assert not absl_logger.filter(record(tfds, std_logging.INFO))
  assert absl_logger.filter(record(orbax, std_logging.WARNING))
  assert absl_logger.filter(record(driver, std_logging.INFO))


def test_the_paired_pages_are_what_their_commands_write(tmp_path, monkeypatch):
  """Each committed paired page (its intro's numbers included) is what the command at its top
  writes from the committed records alone; the 2.5x page first, whose numbers the other quotes."""
  import shlex  # pylint: disable=g-import-not-at-top
  r = _reproduce_module()
  monkeypatch.chdir(REPO)
  for page in ('RESULTS_paired_2.5x.md', 'RESULTS_paired.md'):
    with open(os.path.join(REPO, 'experiments', page)) as f:
      text = f.read()
    command = re.search(r'^Produced by `python (.*?)` \(mean', text, re.M).group(1)
    argv = [a if not a.startswith('--out=') else f'--out={tmp_path / page}'
            for a in shlex.split(command)[1:]]
    r.main(argv)
    mine = (tmp_path / page).read_text()
    drop = lambda t: re.sub(r'^Produced by `python .*?` \(mean', '', t, flags=re.M)
    assert drop(mine) == drop(text), f'experiments/{page} is stale: rerun the command at its top'


def test_the_readme_quotes_the_paired_pages():
  """Every difference and interval in README's paired-study bullet is one the paired pages hold."""
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  bullet = re.search(r'^- \*\*Paired study\*\*.*?(?=^- |\Z)', readme, re.M | re.S).group(0)
  pages = ''
  for page in ('RESULTS_paired.md', 'RESULTS_paired_2.5x.md'):
    with open(os.path.join(REPO, 'experiments', page)) as f:
      pages += ' '.join(f.read().split())
  quoted = re.findall(r'\[[-+]\d\.\d{3}, [-+]\d\.\d{3}\]|[-+]\d\.\d{3}', ' '.join(bullet.split()))
  assert len(quoted) >= 10, bullet
  missing = [q for q in quoted if q not in pages]
  assert not missing, f'README quotes {missing}, which the paired pages do not hold'
