"""camkd_jax.workdir: default names, refusing another config's workdir, overwrite, old keys."""
import json
import os

import pytest

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
  keep = tmp_path / 'run' / 'checkpoints' / 'student'
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


def test_clear_workdir_keeps_a_teacher_inside_it(tmp_path):
  workdir = tmp_path / 'run'
  config = smoke_config(**{'teacher.checkpoint': str(workdir / 'teacher')})
  with pytest.raises(ValueError, match='lies inside .* copy the teacher elsewhere'):
    workdir_lib.clear_workdir(config, str(workdir))


def test_older_workdir_without_the_new_data_keys_resumes():
  new = workdir_lib.config_dict(base.base_config('smoke=1'))
  old = {**new, 'data': {k: v for k, v in new['data'].items()
                         if k not in ('class_names', 'val_fraction')}}
  assert workdir_lib.config_differences(old, new) == []
  changed = {**new, 'data': {**new['data'], 'class_names': 'NC,G3,G4,G5'}}
  assert workdir_lib.config_differences(old, changed) == [
      "data.class_names: '' -> 'NC,G3,G4,G5'"]
