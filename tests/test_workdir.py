"""camkd_jax.workdir: default names, refusing another config's workdir, old keys; a failed start
does not block the corrected rerun; config.overwrite keeps a trained teacher that fits (and refuses
one that does not) unless config.overwrite_teacher."""
import json
import logging
import os

import pytest

from camkd_jax import errors
from camkd_jax import runs
from camkd_jax import teacher as teacher_lib
from camkd_jax import workdir as workdir_lib
from configs import attn_kd
from configs import base
from configs import teacher
from helpers import load_json
from helpers import smoke_config


def test_default_workdir():
  assert workdir_lib.default_workdir('configs/attn_kd.py', attn_kd.get_config()) == os.path.join(
      'workdirs', 'attn_kd_m2.5')
  assert workdir_lib.default_workdir(
      'configs/kd.py:magnification=1.25',
      attn_kd.get_config('magnification=1.25,dataset=sicapv2')) == os.path.join(
          'workdirs', 'kd_m1.25_sicapv2')
  assert workdir_lib.default_workdir('configs/teacher.py', teacher.get_config()) == os.path.join(
      'workdirs', 'teacher')
  assert workdir_lib.default_workdir(None, attn_kd.get_config('smoke=1')) == os.path.join(
      'workdirs', 'run_m2.5_smoke')


def test_workdir_of_a_different_config_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  workdir_lib.prepare_workdir(smoke_config(), workdir)
  # A checkpoint step: the workdir holds training (one without any is taken as fresh).
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


def test_config_differences_lists_changed_added_and_removed_keys():
  old = {'a': 1, 'loss': {'at': 10.0, 'fm': 0.1}, 'log_every_steps': 20}
  new = {'a': 1, 'loss': {'at': 5.0}, 'log_every_steps': 1, 'b': 'x'}
  assert workdir_lib.config_differences(old, new) == [
      "b: '<absent>' -> 'x'", 'loss.at: 10.0 -> 5.0', "loss.fm: 0.1 -> '<absent>'"]


def test_more_student_epochs_continue_the_run_and_fewer_are_refused(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  workdir_lib.prepare_workdir(smoke_config(num_epochs=2), workdir)
  (tmp_path / 'run' / 'checkpoints' / 'student' / '16').mkdir(parents=True)
  old = load_json(os.path.join(workdir, 'config.json'))
  assert workdir_lib.extends(old, runs.config_dict(smoke_config(num_epochs=5)))
  assert not workdir_lib.extends(old, runs.config_dict(smoke_config(num_epochs=1)))
  assert not workdir_lib.extends(old, runs.config_dict(smoke_config(
      num_epochs=5, **{'loss.at': 5.0})))
  with caplog.at_level(logging.INFO):
    workdir_lib.prepare_workdir(smoke_config(num_epochs=5), workdir)
  assert 'continuing the run to 5 student epochs (it was configured for 2)' in caplog.text
  assert load_json(os.path.join(workdir, 'config.json'))['num_epochs'] == 5
  with pytest.raises(ValueError, match=r'num_epochs: 5 -> 3'):
    workdir_lib.prepare_workdir(smoke_config(num_epochs=3), workdir)
  with pytest.raises(ValueError, match=r'teacher.num_epochs'):
    workdir_lib.prepare_workdir(smoke_config(num_epochs=6, **{'teacher.num_epochs': 9}), workdir)
  assert (tmp_path / 'run' / 'checkpoints' / 'student' / '16').is_dir()


def test_workdir_of_an_older_config_with_a_retired_key_resumes(tmp_path):
  """config.json written before a key was removed (shuffle_buffer) still matches."""
  workdir = str(tmp_path / 'run')
  workdir_lib.prepare_workdir(smoke_config(), workdir)
  path = os.path.join(workdir, 'config.json')
  old = load_json(path)
  old['shuffle_buffer'] = 4096
  with open(path, 'w') as f:
    json.dump(old, f)
  workdir_lib.prepare_workdir(smoke_config(), workdir)  # no error
  assert 'shuffle_buffer' not in load_json(path)


def test_overwrite_teacher_refuses_a_configured_teacher_inside_the_workdir(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = smoke_config(**{'teacher.checkpoint': str(workdir / 'teacher'),
                           'overwrite_teacher': True})
  with pytest.raises(ValueError, match='lies inside .* copy the teacher elsewhere'):
    workdir_lib.clear_workdir(config, str(workdir))


def test_older_workdir_without_the_new_data_keys_resumes():
  new = runs.config_dict(base.base_config('smoke=1'))
  old = {**new, 'data': {k: v for k, v in new['data'].items()
                         if k not in ('class_names', 'val_fraction')}}
  assert workdir_lib.config_differences(old, new) == []
  changed = {**new, 'data': {**new['data'], 'class_names': 'NC,G3,G4,G5'}}
  assert workdir_lib.config_differences(old, changed) == [
      "data.class_names: '' -> 'NC,G3,G4,G5'"]


class FakeData:
  image_size, class_names, num_classes = 32, ['NC', 'G3', 'G4', 'G5'], 4


def fake_teacher(run_dir, config):
  """A finished teacher export (metadata.json of `config`; the loader is not exercised here)."""
  t = run_dir / 'teacher'
  (t / 'params').mkdir(parents=True)
  (t / 'params' / 'weights').write_text('w')
  (t / 'metadata.json').write_text(json.dumps(runs.model_metadata(config, FakeData, None)))
  return t


def config_json(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)


def test_failed_start_is_fresh_and_the_fix_is_accepted(tmp_path, caplog):
  """A start that failed before its first checkpoint left config.json (and empty folders): the
  rerun with the typo fixed and skip_corrupt added starts, logging the differences."""
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(**{'data.root': '/data/patchs'}), str(workdir))
  (workdir / 'tensorboard' / 'teacher').mkdir(parents=True)   # left by the failed start
  (workdir / 'checkpoints' / 'teacher').mkdir(parents=True)   # created, no step in it
  fixed = smoke_config(**{'data.root': '/data/patches', 'data.skip_corrupt': True})
  with caplog.at_level(logging.WARNING):
    workdir_lib.prepare_workdir(fixed, str(workdir))
  assert config_json(workdir)['data']['root'] == '/data/patches'
  assert config_json(workdir)['data']['skip_corrupt'] is True
  assert "data.root: '/data/patchs' -> '/data/patches'" in caplog.text
  assert 'data.skip_corrupt: False -> True' in caplog.text
  assert 'holds no checkpoint or trained model' in caplog.text
  assert not (workdir / 'tensorboard').exists()


@pytest.mark.parametrize('state', ['checkpoints/teacher/3', 'teacher', 'metrics.json',
                                   'seed_22/checkpoints/student/8'])
def test_a_workdir_with_training_is_refused(tmp_path, state):
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(), str(workdir))
  if state == 'teacher':
    fake_teacher(workdir, smoke_config())
  elif state.endswith('.json'):
    (workdir / state).write_text('{}')
  else:
    (workdir / state).mkdir(parents=True)
  with pytest.raises(errors.WorkdirError) as info:
    workdir_lib.prepare_workdir(smoke_config(**{'loss.at': 5.0}), str(workdir))
  msg = str(info.value)
  assert 'holds a run of a different config (1 key(s) differ)' in msg
  assert 'loss.at: 10.0 -> 5.0' in msg and '--config.overwrite=True' in msg
  assert state.split('/')[0] in msg  # names what it holds
  assert config_json(workdir)['loss']['at'] == 10.0


def test_overwrite_keeps_and_reuses_a_fitting_teacher(tmp_path):
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(), str(workdir))
  teacher = fake_teacher(workdir, smoke_config())
  (workdir / 'checkpoints' / 'student' / '8').mkdir(parents=True)
  (workdir / 'student').mkdir()
  (workdir / 'metrics.json').write_text('{}')
  workdir_lib.prepare_workdir(smoke_config(**{'loss.at': 5.0, 'overwrite': True}), str(workdir))
  assert (teacher / 'metadata.json').is_file() and (teacher / 'params' / 'weights').is_file()
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'student').exists()
  assert not (workdir / 'metrics.json').exists()
  assert config_json(workdir)['loss']['at'] == 5.0
  # The kept teacher is what a run loads (workdir/teacher is a finished export).
  assert workdir_lib.trained_teachers(str(workdir)) == [str(teacher)]


def test_overwrite_clears_every_output_the_summary_lists(tmp_path):
  """config.overwrite deletes each of runs.OUTPUTS (data_split.csv included: a stale split
  record must not survive into the new run), in the run and its seed directories; other files
  stay."""
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(seeds='22,32'), str(workdir))
  for run in (workdir, workdir / 'seed_22'):
    (run / 'checkpoints' / 'student' / '3').mkdir(parents=True)
    (run / 'data_split.csv').write_text('path,split\n')
    (run / 'figures').mkdir()
    (run / 'figures' / 'gradcam.png').write_bytes(b'png')
    for name in ('metrics.json', 'results.md'):
      (run / name).write_text('{}')
  (workdir / 'notes.txt').write_text('mine')
  workdir_lib.prepare_workdir(smoke_config(**{'seeds': '22,32', 'loss.at': 5.0,
                                             'overwrite': True}), str(workdir))
  for run in (workdir, workdir / 'seed_22'):
    for name in ('data_split.csv', 'checkpoints', 'figures', 'metrics.json', 'results.md'):
      assert not (run / name).exists(), run / name
  assert (workdir / 'notes.txt').read_text() == 'mine'
  assert 'data_split.csv' in runs.OUTPUTS and 'data_split.csv' in runs.CLEARED


def test_overwrite_refuses_a_teacher_that_does_not_fit(tmp_path):
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(), str(workdir))
  teacher = fake_teacher(workdir, smoke_config())
  (workdir / 'checkpoints' / 'student' / '8').mkdir(parents=True)
  with pytest.raises(errors.WorkdirError) as info:
    workdir_lib.prepare_workdir(
        smoke_config(**{'model.width': 0.125, 'overwrite': True}), str(workdir))
  msg = str(info.value)
  assert f'would keep the trained teacher in {teacher}' in msg
  assert 'model.width: teacher 0.0625, this config 0.125' in msg
  assert '--config.overwrite_teacher=True' in msg
  assert (workdir / 'checkpoints' / 'student' / '8').is_dir(), 'nothing deleted on refusal'
  assert config_json(workdir)['model']['width'] == 0.0625


def test_overwrite_teacher_deletes_it(tmp_path):
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(seeds='22,32'), str(workdir))
  for seed in ('seed_22', 'seed_32'):
    fake_teacher(workdir / seed, smoke_config())
  new = smoke_config(**{'seeds': '22,32', 'model.width': 0.125, 'overwrite': True,
                        'overwrite_teacher': True})
  workdir_lib.prepare_workdir(new, str(workdir))
  assert workdir_lib.trained_teachers(str(workdir)) == []
  assert config_json(workdir)['overwrite_teacher'] is True


def test_overwrite_keeps_seed_teachers(tmp_path):
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(seeds='22,32'), str(workdir))
  for seed in ('seed_22', 'seed_32'):  # each seed's teacher carries its own seed
    fake_teacher(workdir / seed, smoke_config(seed=int(seed[5:])))
    (workdir / seed / 'checkpoints' / 'student' / '3').mkdir(parents=True)
  workdir_lib.prepare_workdir(smoke_config(**{'seeds': '22,32', 'loss.fm': 0.5,
                                             'overwrite': True}), str(workdir))
  assert len(workdir_lib.trained_teachers(str(workdir))) == 2
  assert not (workdir / 'seed_22' / 'checkpoints').exists()


def test_teacher_mismatch_found_later_names_overwrite_teacher():
  """The classes are only known with the data: the driver's check names the remedy too."""
  config = smoke_config()
  meta = runs.model_metadata(config, FakeData, None)
  meta['class_names'] = ['a', 'b', 'c', 'd']
  with pytest.raises(errors.WorkdirError, match=r'(?s)class_names.*overwrite_teacher=True'):
    teacher_lib.check_teacher_metadata(meta, config, FakeData.class_names, '/w/teacher')


def test_truncated_config_json_is_replaced(tmp_path, caplog):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"method": "attn')
  with caplog.at_level(logging.WARNING):
    workdir_lib.prepare_workdir(smoke_config(), str(workdir))
  assert config_json(workdir)['method'] == 'attn_kd' and 'not valid JSON' in caplog.text


def test_overwrite_refuses_a_teacher_of_another_seed(tmp_path):
  workdir = tmp_path / 'run'
  workdir_lib.prepare_workdir(smoke_config(), str(workdir))
  fake_teacher(workdir, smoke_config())  # seed 22
  with pytest.raises(errors.WorkdirError, match=r'seed: teacher 22, this config 7'):
    workdir_lib.prepare_workdir(smoke_config(seed=7, overwrite=True), str(workdir))
