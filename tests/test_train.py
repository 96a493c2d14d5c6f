"""camkd_jax.train: start-up checks, evaluation on fixed logits, train_and_evaluate in process,
and the CLI end to end (outputs, resume after SIGINT, SIGKILL and SIGTERM, more epochs, a
non-finite loss).

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
from camkd_jax import config_checks
from camkd_jax import evaluation
from camkd_jax import ops
from camkd_jax import runs
from camkd_jax import stage as stage_lib
from camkd_jax import teacher as teacher_lib
from camkd_jax import train
from camkd_jax import workdir as workdir_lib
from helpers import FixedPredictionData
from helpers import load_json
from helpers import smoke_config
from helpers import xla_flags

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
  env['XLA_FLAGS'] = xla_flags()
  return env


def run_cli(args, env, timeout=600, prelude=''):
  """`python -m camkd_jax.main ARGS` (or `prelude` then main) in a fresh process."""
  code = '\n'.join([
      'import sys', textwrap.dedent(prelude), 'from absl import app',
      'from camkd_jax import main', f"sys.argv = ['camkd_jax.main'] + {list(args)!r}",
      'app.run(main.main)'])
  return subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


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
  from camkd_jax import errors  # pylint: disable=g-import-not-at-top
  config = smoke_config(**overrides)
  # A broken teacher export is a ModelExportError (a FileNotFoundError); the rest ConfigErrors.
  expected = errors.ModelExportError if 'teacher.checkpoint' in overrides else errors.ConfigError
  with pytest.raises(expected, match=pattern) as info:
    config_checks.validate_config(config, devices)
  assert type(info.value) is expected


def test_validate_config_accepts_the_shipped_configs():
  for name in ('teacher', 'ce_student', 'kd', 'fm', 'attn_kd'):
    module = __import__(f'configs.{name}', fromlist=['get_config'])
    config = module.get_config('magnification=1.25')
    config_checks.validate_config(config, 1)
    assert config.method in config_checks.METHODS
  c = attn_kd.get_config()
  assert (c.loss.fm, c.loss.at, c.loss.kd) == (0.1, 10.0, 0.0)


def test_parse_seeds():
  assert config_checks.parse_seeds(attn_kd.get_config('seeds=22,32,43')) == [22, 32, 43]
  assert config_checks.parse_seeds(attn_kd.get_config()) == [22]


def test_teacher_metadata_mismatch_is_refused():
  class FakeData:
    image_size, class_names, num_classes = 32, ['NC', 'G3', 'G4', 'G5'], 4
  config = smoke_config()
  meta = runs.model_metadata(config, FakeData, None)
  teacher_lib.check_teacher_metadata(meta, config, FakeData.class_names, '/t')  # no error
  meta['model']['width'] = 0.5
  meta['class_names'] = ['a', 'b', 'c', 'd']
  with pytest.raises(ValueError, match=r"(?s)teacher in /t does not match.*model.width: teacher "
                                       r"0.5, this config 0.0625.*class_names"):
    teacher_lib.check_teacher_metadata(meta, config, FakeData.class_names, '/t')
  meta = runs.model_metadata(config, FakeData, None)
  meta['model']['input_std'] = []  # trained without input standardisation
  with pytest.raises(ValueError, match=r'model.input_std: teacher \[\], this config \[0.123'):
    teacher_lib.check_teacher_metadata(meta, config, FakeData.class_names, '/t')


def test_missing_dataset_error_propagates_and_keeps_files(tmp_path):
  workdir = tmp_path / 'run'
  config = attn_kd.get_config(f'dataset=sicapv2,data_dir={tmp_path}/nowhere')
  config.data.synthetic_size = 'smoke'
  workdir_lib.prepare_workdir(config, str(workdir))
  marker = workdir / 'checkpoints' / 'teacher' / 'keep'
  marker.parent.mkdir(parents=True)
  marker.write_text('x')
  from camkd_jax.datasets import base as datasets_base  # pylint: disable=g-import-not-at-top
  with pytest.raises(datasets_base.DataNotFoundError) as info:
    train.run(config, str(workdir))
  assert str(info.value).startswith(
      "SICAPv2 (Val1) is not where it was expected; missing:\n  the manual directory "
      f"'{tmp_path}/nowhere' itself\nSICAPv2 must be downloaded by hand"), str(info.value)
  assert 'data_dir=DIR' in str(info.value)
  assert marker.read_text() == 'x' and (workdir / 'config.json').is_file()


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_on_fixed_logits_by_hand():
  import jax  # pylint: disable=g-import-not-at-top
  from camkd_jax import sharding  # pylint: disable=g-import-not-at-top
  # padded rows carry label 1 and predict 2
  data = FixedPredictionData({'validation': ([0, 1, 2, 2, 1], [0, 2, 2, 1, 1]),
                              'test': ([2, 2, 0], [2, 2, 0])}, 3, 1, 2)
  eval_step = lambda params, images: 5.0 * jax.nn.one_hot(images[:, 0, 0, 0], 3)
  out = evaluation.evaluate(eval_step, None, data, sharding.make_mesh())
  val, test = out['val'], out['test']
  assert val['confusion_matrix'] == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
  assert val['num_examples'] == 5 and val['accuracy'] == pytest.approx(3 / 5)
  assert val['balanced_accuracy'] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
  # Quadratic kappa: weights (i - j)^2 / 4; observed weighted disagreement 2 * 1/4 = 0.5 (counts);
  # expected sum_ij w_ij r_i c_j / n with row = column totals (1, 2, 2): 7 / 5. 1 - 0.5 / 1.4.
  assert val['kappa'] == pytest.approx(9 / 14)
  assert test['confusion_matrix'] == [[1, 0, 0], [0, 0, 0], [0, 0, 2]]
  assert (test['accuracy'], test['balanced_accuracy'], test['kappa']) == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- in process
def test_train_and_evaluate_in_process(tmp_path):
  """The smoke config for 3 steps per stage (like flax examples/imagenet/train_test.py)."""
  config = smoke_config(num_figure_images=0, log_every_steps=1, checkpoint_every_steps=0)
  workdir = tmp_path / 'run'
  out = train.train_and_evaluate(config, str(workdir))
  assert load_json(workdir / 'metrics.json') == json.loads(json.dumps(out))
  for model in ('teacher', 'student'):
    report = out[model]
    assert (report['epoch'], report['step']) == (1, 3)
    assert [h['step'] for h in report['history']] == [3]
    for split in ('val', 'test'):
      r = report[split]
      cm = np.asarray(r['confusion_matrix'])
      assert cm.shape == (4, 4) and cm.sum() == r['num_examples'] == 32
      assert r['accuracy'] == pytest.approx(np.trace(cm) / 32)
      assert out['summary'][model][split] == {
          'balanced_accuracy_mean': r['balanced_accuracy'], 'balanced_accuracy_std': 0.0,
          'kappa_mean': r['kappa'], 'kappa_std': 0.0, 'accuracy_mean': r['accuracy'],
          'accuracy_std': 0.0}
  assert set(out['teacher']['train']) == {'loss/ce', 'loss/total', 'grad_norm'}
  assert set(out['student']['train']) == {'loss/ce', 'loss/fm', 'loss/at', 'loss/total',
                                          'grad_norm'}
  train_losses = out['student']['train']
  assert train_losses['loss/total'] == pytest.approx(
      train_losses['loss/ce'] + 0.1 * train_losses['loss/fm'] + 10.0 * train_losses['loss/at'])
  assert (out['student']['magnification'], out['student']['factor']) == (2.5, 4)
  assert out['seeds'] == [22] and out['teacher']['checkpoint'] == str(workdir / 'teacher')
  for path in ('teacher', 'student', 'checkpoints/teacher', 'checkpoints/student',
               'tensorboard/teacher', 'tensorboard/student'):
    assert (workdir / path).is_dir(), path
  assert not (workdir / 'figures').exists()  # num_figure_images=0


# ----------------------------------------------------------------------------- end to end
# Teacher: 1 epoch of 8 steps; student: 2 epochs of 8 steps; checkpoints every 3 steps; 2 devices
# (the batch and the evaluation are sharded over a 2-device mesh).
E2E_ARGS = ['--config', SMOKE, '--config.max_steps=-1', '--config.num_epochs=2',
            '--config.checkpoint_every_steps=3', '--config.log_every_steps=2',
            '--config.num_figure_images=3']


@pytest.fixture(scope='module')
def e2e_env(cache_env):
  return dict(cache_env, XLA_FLAGS=xla_flags(2))


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
      # Quadratic kappa recomputed from the confusion matrix (closed form, float64).
      w = (np.arange(4)[:, None] - np.arange(4)[None, :]) ** 2 / 9.0
      expected = np.outer(cm.sum(1), cm.sum(0)) / n
      assert r['kappa'] == pytest.approx(1 - (w * cm).sum() / (w * expected).sum(), abs=1e-12)
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
  meta = runs.read_metadata(str(workdir / 'teacher'))
  assert meta['class_names'] == ['NC', 'G3', 'G4', 'G5'] and meta['image_size'] == 32
  assert 'student (seed 22)' in proc.stdout  # the one-screen summary


def _params(path):
  """Exported parameters (saved from 2 devices) restored on this process's single device."""
  import jax  # pylint: disable=g-import-not-at-top
  from camkd_jax import models, sharding  # pylint: disable=g-import-not-at-top
  config = smoke_config()
  template = teacher_lib.abstract_params(models.from_config(config.model, 4),
                                         config.image_size, sharding.make_mesh())
  tree, _ = checkpoints.load_model(path, template)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_term(tmp_path, cache_env):
  """An absurd learning rate: the run stops naming the step and the term; the last good
  checkpoint stays loadable and finite."""
  workdir = tmp_path / 'nan'
  proc = run_cli(['--config', 'configs/teacher.py:smoke=1', '--workdir', str(workdir),
                  '--config.optimizer.learning_rate=1e30', '--config.log_every_steps=1',
                  '--config.checkpoint_every_steps=1'], cache_env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: teacher: non-finite value(s) in ce'), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert 'at step 1 ' in proc.stderr and 'last good checkpoint is step 1' in proc.stderr
  assert not (workdir / 'teacher').exists() and not (workdir / 'metrics.json').exists()
  ckpt = checkpoints.StageCheckpoints(str(workdir / 'checkpoints' / 'teacher'))
  assert ckpt.latest_step() == 1
  import jax  # pylint: disable=g-import-not-at-top
  from camkd_jax import distill, models  # pylint: disable=g-import-not-at-top
  config = base.base_config('smoke=1')
  model = models.from_config(config.model, 4)
  params = stage_lib.init_params(model, 0, config.image_size)
  tx = distill.make_optimizer(config.optimizer)
  template = distill.create_train_state(params, tx, jax.random.PRNGKey(0))
  state, best, progress = ckpt.restore(1, template, params)
  ckpt.close()
  assert int(state['step']) == 1 and int(state['bad_step']) == -1
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state))
  assert progress['best'] is None and progress['history'] == []


# ----------------------------------------------------------------------------- native students
@pytest.mark.parametrize('mag,size,ok', [(5.0, 64, True), (2.5, 64, True), (1.25, 64, False),
                                         (0.3125, 512, True), (0.3125, 256, False)])
def test_native_input_under_16_px_is_refused_naming_the_sizes(mag, size, ok):
  c = attn_kd.get_config(f'magnification={mag}')
  c.image_size = size
  c.student.view = 'native'
  if ok:
    config_checks.validate_view(c, ops.magnification_factor(mag))
    return
  f = ops.magnification_factor(mag)
  with pytest.raises(ValueError, match=rf'{size // f}x{size // f} px inputs .*'
                                       rf'image_size={size} / factor {f}.*at least 16x16'):
    config_checks.validate_config(c, 1)


def test_native_one_pixel_block5_map_warns_for_fm_and_at(caplog):
  c = attn_kd.get_config('magnification=2.5')   # 64 px / 4 = 16 px: block5 is 1x1
  c.student.view = 'native'
  with caplog.at_level('WARNING'):
    config_checks.validate_view(c, 4)
  assert '16x16 px input leaves a 1x1 block5 map, so FM and AT+ compare' in caplog.text
  caplog.clear()
  c = attn_kd.get_config('magnification=5')     # 32 px: block5 is 2x2, no warning
  c.student.view = 'native'
  with caplog.at_level('WARNING'):
    config_checks.validate_view(c, 2)
  assert 'block5 map' not in caplog.text


def test_unknown_view_is_refused():
  c = attn_kd.get_config()
  c.student.view = 'full'
  with pytest.raises(ValueError, match=r"unknown config.student.view 'full'"):
    config_checks.validate_config(c, 1)


@pytest.mark.slow
def test_native_student_end_to_end(tmp_path):
  """The driver with a native 5x student (16 px inputs from 32 px smoke images): report, exported
  metadata and figure say native, and the student was evaluated on its own view."""
  import json  # pylint: disable=g-import-not-at-top
  from camkd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  c = attn_kd.get_config('smoke=1,magnification=5')
  c.student.view = 'native'
  c.num_figure_images = 2
  out = train.run(c, str(tmp_path))
  assert out['student']['view'] == 'native' and out['student']['factor'] == 2
  meta = runs.read_metadata(str(tmp_path / 'student'))
  assert meta['view'] == 'native' and meta['report']['view'] == 'native'
  assert runs.read_metadata(str(tmp_path / 'teacher'))['view'] == 'upsampled'
  with open(tmp_path / 'figures' / 'gradcam.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['student']['view'] == 'native'
  cm = np.asarray(out['student']['test']['confusion_matrix'])
  assert cm.sum() == out['student']['test']['num_examples'] == 32


# ------------------------------------------------------------------------- Ctrl-C, SIGKILL, SIGTERM
# Sends `signum` to the process itself while the {at}-th training batch is fetched. SIGINT and
# SIGTERM: the step that batch feeds finishes, is checkpointed, and the run stops
# (camkd_jax.interrupts); SIGKILL: the process dies at once.
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
def test_run_stopped_three_ways_resumes_bit_identical(tmp_path, reference_run, e2e_env):
  """One run stopped three ways: Ctrl-C in the teacher stage, SIGKILL and then SIGTERM in the
  student stage. Ctrl-C and SIGTERM checkpoint the step they finished, print one line naming the
  step to resume from (no traceback) and exit 130 / 143; SIGKILL leaves the last periodic
  checkpoint. Resumed each time, the run ends bit-identical to the uninterrupted one."""
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
  # 2) resumed at 5: teacher steps 6..8 (3 batches), student steps 1..10, killed (SIGKILL) while
  #    fetching the student's 11th batch: the latest checkpoints are 8 (epoch end) and 9.
  proc = run_cli(args, e2e_env, prelude=SIGNAL_PRELUDE.format(at=3 + 11,
                                                              signum=int(signal.SIGKILL)))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert 'teacher: resumed from' in proc.stderr
  assert runs.is_finished_model(str(run / 'teacher'))
  assert sorted(os.listdir(run / 'checkpoints' / 'student')) == ['8', '9']
  assert not (run / 'metrics.json').exists()
  # 3) resumed at 9, SIGTERM while fetching its 2nd batch: step 11 is checkpointed beside 9
  #    (every 3 steps); 8 rotates out.
  proc = run_cli(args, e2e_env, prelude=SIGNAL_PRELUDE.format(at=2, signum=int(signal.SIGTERM)))
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert 'teacher: loaded' in proc.stderr and 'student: resumed from' in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: interrupted at step 11; rerun the same command to resume from step 11 '
      '(student stage, SIGTERM)'), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert sorted(os.listdir(run / 'checkpoints' / 'student')) == ['11', '9']
  # 4) resumed to the end.
  proc = run_cli(args, e2e_env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'student: resumed from' in proc.stderr
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
  # No TensorBoard step twice (steps logged before an interrupt are not logged again on resume).
  for stage in ('teacher', 'student'):
    steps = _tensorboard_steps(run / 'tensorboard' / stage)
    assert len(steps) == len(set(steps)), (stage, sorted(steps))
    assert set(steps) == set(_tensorboard_steps(ref / 'tensorboard' / stage)), stage


@pytest.mark.slow
def test_finished_run_extended_to_more_epochs_matches_the_longer_run(tmp_path, reference_run,
                                                                     e2e_env):
  """A run finished at 1 student epoch, rerun with num_epochs=2: it continues from its last
  checkpoint and ends bit-identical to the run configured for 2 epochs from the start (the
  optimizer has no schedule); selection covers both epochs. (Fewer epochs are refused:
  tests/test_workdir.py.)"""
  ref, run = reference_run[0], tmp_path / 'extended'
  # The reference run's teacher (the same parameters it would train again): only students train.
  args = [a for a in E2E_ARGS if not a.startswith('--config.num_epochs=')] + [
      f'--config.teacher.checkpoint={ref / "teacher"}']
  proc = run_cli(args + ['--config.num_epochs=1', '--workdir', str(run)], e2e_env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  one = load_json(run / 'metrics.json')
  assert len(one['student']['history']) == 1
  assert 0 < one['student']['train_wall_time_s'] <= one['wall_time_s']
  # The stage's time travels in the checkpoint: mark the one the continuation resumes from.
  ckpt = run / 'checkpoints' / 'student'
  last = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  progress = ckpt / str(last) / 'progress' / 'metadata'
  saved = load_json(progress)
  assert saved['train_wall_time_s'] == one['student']['train_wall_time_s']
  progress.write_text(json.dumps(dict(saved, train_wall_time_s=1e6)))
  proc = run_cli(args + ['--config.num_epochs=2', '--workdir', str(run)], e2e_env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'continuing the run to 2 student epochs (it was configured for 1)' in proc.stderr
  assert 'student: resumed from' in proc.stderr and 'teacher: loaded' in proc.stderr
  assert load_json(run / 'config.json')['num_epochs'] == 2
  a, b = load_json(ref / 'metrics.json'), load_json(run / 'metrics.json')
  assert b['student']['history'][0] == one['student']['history'][0]
  assert a['student']['history'] == b['student']['history']
  for key in ('val', 'test', 'epoch'):
    assert a['student'][key] == b['student'][key], key
  # the continued run's stage time = the time before (from its checkpoint) + this invocation's
  assert 1e6 < b['student']['train_wall_time_s'] <= 1e6 + b['wall_time_s']
  pa, pb = _params(str(ref / 'student')), _params(str(run / 'student'))
  assert pa.keys() == pb.keys() and len(pa) == 28
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def _tensorboard_steps(logdir):
  """[(tag, step)] of every scalar in `logdir`'s event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(os.listdir(logdir)):
    for e in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      out += [(v.tag, e.step) for v in e.summary.value]
  return out
