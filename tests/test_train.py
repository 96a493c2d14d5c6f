"""The driver end to end: CLI outputs, resume after SIGKILL, and the bad-input paths.

The end-to-end runs use the embedded synthetic dataset's `smoke` build (32 px, 64/32/32 images)
and a width-0.0625 VGG16; subprocess runs share a persistent XLA compilation cache so that the
later runs of the resume test do not recompile.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import attn_kd
from configs import base
from camkd_jax import checkpoints
from camkd_jax import reporting
from camkd_jax import train
from camkd_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = 'configs/attn_kd.py:smoke=1'


@pytest.fixture(scope='module')
def cache_env(tmp_path_factory):
  """Environment of the subprocess runs: one shared compilation cache for this module."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jax_cache'))
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('XLA_FLAGS', None)
  return env


def run_cli(args, env, timeout=600, prelude=''):
  """`python -m camkd_jax.main ARGS` (or `prelude` then main) in a fresh process."""
  code = '\n'.join([
      'import sys', textwrap.dedent(prelude), 'from absl import app',
      'from camkd_jax import main', f"sys.argv = ['camkd_jax.main'] + {list(args)!r}",
      'app.run(main.main)'])
  return subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def smoke_config(**overrides):
  config = attn_kd.get_config('smoke=1')
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config


def load_json(path):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- start-up checks
@pytest.mark.parametrize('overrides, devices, pattern', [
    ({'method': 'distil'}, 1, r"unknown config.method 'distil'"),
    ({'magnification': 3.0}, 1, r'config.magnification: magnification 3.0 is not a power-of-two'),
    ({'magnification': 0.625, 'image_size': 24}, 1, r'config.image_size=24 is not divisible'),
    ({}, 3, r'config.batch_size=8 is not a positive multiple of the number of devices \(3\)'),
    ({'batch_size': 6, 'eval_batch_size': 12}, 4, r'config.batch_size=6 .* devices \(4\)'),
    ({'data.name': 'imagenet'}, 1, r"unknown config.data.name 'imagenet'"),
    ({'seeds': '22,x'}, 1, r"config.seeds='22,x' must be comma-separated integers"),
    ({'selection.metric': 'f1'}, 1, r"unknown config.selection.metric 'f1'"),
    ({'optimizer.name': 'lamb'}, 1, r"unknown config.optimizer.name 'lamb'"),
    ({'loss.at': -1.0}, 1, r'negative config.loss.at'),
    ({'teacher.checkpoint': '/nonexistent/teacher'}, 1, r'metadata.json not found'),
])
def test_validate_config_names_the_key(overrides, devices, pattern):
  config = smoke_config(**overrides)
  with pytest.raises((ValueError, FileNotFoundError), match=pattern):
    train.validate_config(config, devices)


def test_validate_config_accepts_the_shipped_configs():
  for name in ('teacher', 'ce_student', 'kd', 'fm', 'attn_kd'):
    module = __import__(f'configs.{name}', fromlist=['get_config'])
    config = module.get_config('magnification=1.25')
    train.validate_config(config, 1)
    assert config.method in train.METHODS
  c = attn_kd.get_config()
  assert (c.loss.fm, c.loss.at, c.loss.kd) == (0.1, 10.0, 0.0)


def test_parse_seeds_and_default_workdir():
  assert train.parse_seeds(attn_kd.get_config('seeds=22,32,43')) == [22, 32, 43]
  assert train.parse_seeds(attn_kd.get_config()) == [22]
  assert workdir_lib.default_workdir('configs/attn_kd.py', attn_kd.get_config()) == os.path.join(
      'workdirs', 'attn_kd_m2.5')
  assert workdir_lib.default_workdir('configs/kd.py:magnification=1.25',
                               attn_kd.get_config('magnification=1.25,dataset=sicapv2')) == \
      os.path.join('workdirs', 'kd_m1.25_sicapv2')
  teacher = __import__('configs.teacher', fromlist=['get_config']).get_config()
  assert workdir_lib.default_workdir('configs/teacher.py', teacher) == os.path.join('workdirs',
                                                                              'teacher')


def test_workdir_of_a_different_config_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  workdir_lib.prepare_workdir(smoke_config(), workdir)
  # A checkpoint step: the workdir holds training (one without any is taken as fresh, below).
  keep = tmp_path / 'run' / 'checkpoints' / 'student' / '3'
  keep.mkdir(parents=True)
  # Same results-relevant config (only logging / checkpoint cadence changed): accepted.
  workdir_lib.prepare_workdir(smoke_config(log_every_steps=1, checkpoint_every_steps=2), workdir)
  with pytest.raises(ValueError, match=r"(?s)different config.*loss.at: 10.0 -> 5.0.*"
                                       r"--config.overwrite=True"):
    workdir_lib.prepare_workdir(smoke_config(**{'loss.at': 5.0}), workdir)
  assert keep.is_dir(), 'a refused run must not delete anything'
  workdir_lib.prepare_workdir(smoke_config(**{'loss.at': 5.0, 'overwrite': True}), workdir)
  assert not keep.exists()
  assert load_json(os.path.join(workdir, 'config.json'))['loss']['at'] == 5.0


def test_teacher_metadata_mismatch_is_refused():
  class FakeData:
    image_size, class_names, num_classes = 32, ['NC', 'G3', 'G4', 'G5'], 4
  config = smoke_config()
  meta = train.model_metadata(config, FakeData, None)
  train.check_teacher_metadata(meta, config, FakeData, '/t')  # matches: no error
  meta['model']['width'] = 0.5
  meta['class_names'] = ['a', 'b', 'c', 'd']
  with pytest.raises(ValueError, match=r"(?s)teacher in /t does not match.*model.width: teacher "
                                       r"0.5, this config 0.0625.*class_names"):
    train.check_teacher_metadata(meta, config, FakeData, '/t')
  meta = train.model_metadata(config, FakeData, None)
  meta['model']['input_std'] = []  # trained without input standardisation
  with pytest.raises(ValueError, match=r'model.input_std: teacher \[\], this config \[0.123'):
    train.check_teacher_metadata(meta, config, FakeData, '/t')


def test_combine_seeds_mean_and_std():
  def run(seed, tk, sk):
    return {'seeds': [seed],
            'teacher': {'val': {'kappa': tk, 'balanced_accuracy': 0.5},
                        'test': {'kappa': tk, 'balanced_accuracy': 0.5}, 'epoch': 1},
            'student': {'val': {'kappa': sk, 'balanced_accuracy': 0.4},
                        'test': {'kappa': sk / 2, 'balanced_accuracy': 0.4}, 'epoch': 2,
                        'magnification': 2.5, 'factor': 4}}
  out = reporting.combine_seeds({22: run(22, 0.6, 0.2), 32: run(32, 0.8, 0.4), 43: run(43, 0.7, 0.9)})
  assert out['seeds'] == [22, 32, 43]
  s = out['summary']['student']['test']
  want = np.asarray([0.1, 0.2, 0.45])
  assert s['kappa_mean'] == pytest.approx(want.mean()) and s['kappa_std'] == pytest.approx(
      want.std(ddof=1))
  assert out['student']['test']['kappa'] == pytest.approx(want.mean())
  assert out['teacher']['epoch'] == [1, 1, 1] and out['student']['magnification'] == 2.5
  table, rows = reporting.results_markdown(out)
  assert len(rows) == 8 and 'student (mean ± sample std)' in table


def test_missing_dataset_error_propagates_and_keeps_files(tmp_path):
  workdir = tmp_path / 'run'
  config = attn_kd.get_config(f'dataset=sicapv2,data_dir={tmp_path}/nowhere')
  config.data.synthetic_size = 'smoke'
  workdir_lib.prepare_workdir(config, str(workdir))
  marker = workdir / 'checkpoints' / 'teacher' / 'keep'
  marker.parent.mkdir(parents=True)
  marker.write_text('x')
  with pytest.raises(Exception) as info:
    train.run(config, str(workdir))
  assert 'nowhere' in str(info.value) or 'manual' in str(info.value).lower(), str(info.value)
  assert marker.read_text() == 'x' and (workdir / 'config.json').is_file()


# ----------------------------------------------------------------------------- end to end
# Teacher: 1 epoch of 8 steps; student: 2 epochs of 8 steps; checkpoints every 3 steps; 2 devices
# (the batch and the evaluation are sharded over a 2-device mesh).
E2E_ARGS = ['--config', SMOKE, '--config.max_steps=-1', '--config.num_epochs=2',
            '--config.checkpoint_every_steps=3', '--config.log_every_steps=2',
            '--config.num_figure_images=3']


@pytest.fixture(scope='module')
def e2e_env(cache_env):
  return dict(cache_env, XLA_FLAGS='--xla_force_host_platform_device_count=2')


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, e2e_env):
  """One uninterrupted CLI run: (workdir, completed process)."""
  workdir = tmp_path_factory.mktemp('e2e') / 'ref'
  proc = run_cli(E2E_ARGS + ['--workdir', str(workdir)], e2e_env)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  return workdir, proc


@pytest.mark.slow
def test_cli_end_to_end_outputs(reference_run):
  """The CLI on the smoke config over 2 CPU devices: every output of the workdir."""
  workdir, proc = reference_run
  assert '2 device(s)' in proc.stderr
  assert 'img/s | ETA' in proc.stderr  # progress lines
  assert load_json(workdir / 'config.json')['method'] == 'attn_kd'
  m = load_json(workdir / 'metrics.json')
  for model in ('teacher', 'student'):
    for split, n in (('val', 32), ('test', 32)):
      r = m[model][split]
      cm = np.asarray(r['confusion_matrix'])
      assert cm.shape == (4, 4) and cm.sum() == n == r['num_examples']
      # Balanced accuracy recomputed from the confusion matrix (classes present in the labels).
      rows = cm.sum(1)
      assert r['balanced_accuracy'] == pytest.approx(np.mean(np.diag(cm)[rows > 0] /
                                                             rows[rows > 0]))
      assert -1 <= r['kappa'] <= 1
  assert m['teacher']['epoch'] == 1 and m['student']['epoch'] in (1, 2)
  assert [h['epoch'] for h in m['student']['history']] == [1, 2]
  # The reported student metrics are those of the selected epoch.
  best = m['student']['history'][m['student']['epoch'] - 1]
  assert best['val'] == m['student']['val'] and best['test'] == m['student']['test']
  assert (m['student']['magnification'], m['student']['factor']) == (2.5, 4)
  assert m['seeds'] == [22]
  assert set(m['summary']['student']['test']) >= {'kappa_mean', 'kappa_std'}
  assert set(m['student']['history'][0]['train']) >= {'loss/ce', 'loss/fm', 'loss/at'}
  with open(workdir / 'figures' / 'gradcam.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(workdir / 'figures' / 'gradcam.png') as im:
    im.verify()
  for stage in ('teacher', 'student'):
    events = os.listdir(workdir / 'tensorboard' / stage)
    assert len(events) == 1 and 'tfevents' in events[0]
    with open(workdir / 'tensorboard' / stage / events[0], 'rb') as f:
      blob = f.read()
    for tag in (b'val/kappa', b'test/balanced_accuracy', b'train/loss/ce',
                b'train/learning_rate', b'train/images_per_sec'):
      assert tag in blob, tag
  assert b'train/loss/at' in blob
  table = (workdir / 'results.md').read_text()
  assert '| teacher (seed 22) | 10x |' in table and '| student (seed 22) | 2.5x |' in table
  assert f"{m['student']['test']['kappa']:.4f}" in table
  meta = checkpoints.read_metadata(str(workdir / 'teacher'))
  assert meta['class_names'] == ['NC', 'G3', 'G4', 'G5'] and meta['image_size'] == 32
  assert 'student (seed 22)' in proc.stdout  # the one-screen summary


KILL_PRELUDE = """
import os, signal
from camkd_jax import input_pipeline
_orig, _count = input_pipeline.Data.train_batches, [0]
def _train_batches(self, epoch, start_step=0):
  for batch in _orig(self, epoch, start_step):
    _count[0] += 1
    if _count[0] == {kill_at}:
      os.kill(os.getpid(), signal.SIGKILL)
    yield batch
input_pipeline.Data.train_batches = _train_batches
"""


def _params(path):
  """Exported parameters (saved from 2 devices) restored on this process's single device."""
  import jax  # pylint: disable=g-import-not-at-top
  from camkd_jax import models, sharding  # pylint: disable=g-import-not-at-top
  config = smoke_config()
  template = train.abstract_params(models.from_config(config.model, 4), config.image_size,
                                   sharding.make_mesh())
  tree, _ = checkpoints.load_model(path, template)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, reference_run, e2e_env):
  """Killed (SIGKILL) once in the teacher stage and once in the student stage, then resumed: the
  final metrics and parameters equal those of the uninterrupted run, bit for bit."""
  ref, run = reference_run[0], tmp_path / 'killed'
  args = E2E_ARGS + ['--workdir', str(run)]
  # 1) killed while fetching the teacher's 5th batch (latest checkpoint: teacher step 3).
  proc = run_cli(args, e2e_env, prelude=KILL_PRELUDE.format(kill_at=5))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert os.listdir(run / 'checkpoints' / 'teacher') == ['3']
  assert not (run / 'metrics.json').exists()
  # 2) resumed: teacher steps 4..8 (5 batches), student steps 1..10, killed while fetching the
  #    student's 11th batch (latest checkpoints: student 8 = epoch end, and 9).
  proc = run_cli(args, e2e_env, prelude=KILL_PRELUDE.format(kill_at=5 + 11))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert 'teacher: resumed from' in proc.stderr
  assert checkpoints.is_finished_model(str(run / 'teacher'))
  assert sorted(os.listdir(run / 'checkpoints' / 'student')) == ['8', '9']
  # 3) resumed to the end.
  proc = run_cli(args, e2e_env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'student: resumed from' in proc.stderr and 'teacher: loaded' in proc.stderr

  a, b = load_json(ref / 'metrics.json'), load_json(run / 'metrics.json')
  for model in ('teacher', 'student'):
    for key in ('val', 'test', 'epoch'):
      assert a[model][key] == b[model][key], (model, key)
  assert a['student']['history'] == b['student']['history']  # train loss means included
  for model in ('teacher', 'student'):
    pa, pb = _params(str(ref / model)), _params(str(run / model))
    assert pa.keys() == pb.keys() and len(pa) == 28
    for k in pa:
      np.testing.assert_array_equal(pa[k], pb[k], err_msg=f'{model} {k}')


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_term(tmp_path, cache_env):
  """An absurd learning rate: the run stops naming the step and the term; the last good
  checkpoint stays loadable and finite."""
  workdir = tmp_path / 'nan'
  proc = run_cli(['--config', 'configs/teacher.py:smoke=1', '--workdir', str(workdir),
                  '--config.optimizer.learning_rate=1e30', '--config.log_every_steps=1',
                  '--config.checkpoint_every_steps=1'], cache_env)
  assert proc.returncode != 0
  assert 'FloatingPointError: teacher: non-finite value(s) in ce' in proc.stderr, \
      proc.stderr[-3000:]
  assert 'at step 1 ' in proc.stderr and 'last good checkpoint is step 1' in proc.stderr
  assert not (workdir / 'teacher').exists() and not (workdir / 'metrics.json').exists()
  ckpt = checkpoints.StageCheckpoints(str(workdir / 'checkpoints' / 'teacher'))
  assert ckpt.latest_step() == 1
  import jax  # pylint: disable=g-import-not-at-top
  from camkd_jax import distill, models, sharding  # pylint: disable=g-import-not-at-top
  config = base.base_config('smoke=1')
  model = models.from_config(config.model, 4)
  params = train.init_params(model, 0, config.image_size)
  tx = distill.make_optimizer(config.optimizer)
  template = distill.create_train_state(params, tx, jax.random.PRNGKey(0))
  state, best, progress = ckpt.restore(1, template, params)
  ckpt.close()
  assert int(state['step']) == 1 and int(state['bad_step']) == -1
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state))
  assert progress['best'] is None and progress['history'] == []


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM
# Sends `signum` to the process itself while the {at}-th training batch is fetched: the step that
# batch feeds finishes, is checkpointed, and the run stops (camkd_jax.interrupts).
SIGNAL_PRELUDE = """
import os, signal
from camkd_jax import input_pipeline
_orig, _count = input_pipeline.Data.train_batches, [0]
def _train_batches(self, epoch, start_step=0):
  for batch in _orig(self, epoch, start_step):
    _count[0] += 1
    if _count[0] == {at}:
      os.kill(os.getpid(), {signum})
    yield batch
input_pipeline.Data.train_batches = _train_batches
"""


@pytest.mark.slow
def test_resume_after_sigint_and_sigterm_matches_uninterrupted_run(tmp_path, reference_run,
                                                                   e2e_env):
  """Ctrl-C in the teacher stage, SIGTERM in the student stage: each checkpoints the step it
  finished, prints one line naming the step to resume from (no traceback) and exits 130 / 143;
  the resumed run ends bit-identical to the uninterrupted one."""
  ref, run = reference_run[0], tmp_path / 'interrupted'
  args = E2E_ARGS + ['--workdir', str(run)]
  # 1) SIGINT while fetching the teacher's 5th batch: step 5 finishes and is checkpointed.
  proc = run_cli(args, e2e_env, prelude=SIGNAL_PRELUDE.format(at=5, signum=int(signal.SIGINT)))
  assert proc.returncode == 130, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last == ('error: interrupted at step 5; rerun the same command to resume from step 5 '
                  '(teacher stage, SIGINT)'), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert sorted(os.listdir(run / 'checkpoints' / 'teacher')) == ['3', '5']
  assert not (run / 'teacher').exists() and not (run / 'metrics.json').exists()
  # 2) resumed at 5: teacher steps 6..8 (3 batches), then SIGTERM while fetching the student's
  #    11th batch: step 11 is checkpointed beside 9 (every 3 steps); 8 (epoch end) rotates out.
  proc = run_cli(args, e2e_env, prelude=SIGNAL_PRELUDE.format(at=3 + 11,
                                                              signum=int(signal.SIGTERM)))
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert 'teacher: resumed from' in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: interrupted at step 11; rerun the same command to resume from step 11 '
      '(student stage, SIGTERM)'), proc.stderr[-3000:]
  assert sorted(os.listdir(run / 'checkpoints' / 'student')) == ['11', '9']
  # 3) resumed to the end.
  proc = run_cli(args, e2e_env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'student: resumed from' in proc.stderr
  a, b = load_json(ref / 'metrics.json'), load_json(run / 'metrics.json')
  for model in ('teacher', 'student'):
    for key in ('val', 'test', 'epoch'):
      assert a[model][key] == b[model][key], (model, key)
  assert a['student']['history'] == b['student']['history']
  for model in ('teacher', 'student'):
    pa, pb = _params(str(ref / model)), _params(str(run / model))
    assert pa.keys() == pb.keys() and len(pa) == 28
    for k in pa:
      np.testing.assert_array_equal(pa[k], pb[k], err_msg=f'{model} {k}')
  # No TensorBoard step twice (steps 6 and 10-12 were logged before the interrupts' resumes too).
  for stage in ('teacher', 'student'):
    steps = _tensorboard_steps(run / 'tensorboard' / stage)
    assert len(steps) == len(set(steps)), (stage, sorted(steps))
    assert set(steps) == set(_tensorboard_steps(ref / 'tensorboard' / stage)), stage


def _tensorboard_steps(logdir):
  """[(tag, step)] of every scalar in `logdir`'s event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(os.listdir(logdir)):
    for e in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      out += [(v.tag, e.step) for v in e.summary.value]
  return out
