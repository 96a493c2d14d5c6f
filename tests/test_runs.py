"""camkd_jax.runs: the run directory's layout, config.json, atomic writes, export metadata and the
teacher comparison (no training, no JAX computation)."""
import json
import os
import re

import numpy as np
import pytest

from camkd_jax import errors
from camkd_jax import runs
from helpers import smoke_config


class FakeData:
  image_size, class_names, num_classes = 32, ['NC', 'G3', 'G4', 'G5'], 4


def test_seed_dirs_are_seed_directories_in_seed_order(tmp_path):
  for name in ('seed_100', 'seed_22', 'seed_3', 'seed_x', 'seeds', 'teacher'):
    (tmp_path / name).mkdir()
  (tmp_path / 'seed_5').write_text('a file, not a run')
  assert runs.seed_dirs(str(tmp_path)) == [str(tmp_path / f'seed_{s}') for s in (3, 22, 100)]
  assert runs.run_dirs(str(tmp_path))[0] == str(tmp_path)
  assert runs.seed_dirs(str(tmp_path / 'absent')) == []
  assert runs.seed_dir(str(tmp_path), 22) == str(tmp_path / 'seed_22')
  assert runs.seed_of(runs.seed_dir('/w', 7)) == 7 and runs.seed_of('/w/seed_7/') == 7
  assert runs.seed_of('/w/teacher') is None and runs.seed_of('/w/seed_') is None


def test_outputs_and_cleared():
  assert 'data_split.csv' in runs.OUTPUTS and 'data_split.csv' in runs.CLEARED
  assert runs.CLEARED[0] == runs.CONFIG_FILE
  assert {'figures', 'tensorboard', 'checkpoints', 'teacher', 'student'} <= set(runs.CLEARED)


def test_read_config_errors_name_the_file(tmp_path):
  path = tmp_path / 'config.json'
  p, w = re.escape(str(path)), re.escape(str(tmp_path))
  with pytest.raises(errors.WorkdirError, match=rf'^{p} not found; {w} is not a camkd_jax run'):
    runs.read_config(str(tmp_path))
  path.write_text('{"method": "at')
  with pytest.raises(errors.WorkdirError, match=rf'^{p} cannot be read \(JSONDecodeError'):
    runs.read_config(str(tmp_path))
  path.write_text('[1, 2]')
  with pytest.raises(errors.WorkdirError, match=rf'^{p} holds a JSON list, not an object'):
    runs.read_config(str(tmp_path))
  path.write_text('{"method": "ce", "model": {"width": 0.5}}')
  assert runs.read_config(str(tmp_path)) == {'method': 'ce', 'model': {'width': 0.5}}


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
  path = tmp_path / 'metrics.json'
  runs.write_json(str(path), {'kappa': np.float32(0.5), 'n': np.int64(3), 'bad': float('nan')})
  assert json.loads(path.read_text()) == {'kappa': 0.5, 'n': 3, 'bad': None}

  def half_then_fail(f):
    f.write('{"kappa": ')
    raise RuntimeError('writer died')
  with pytest.raises(RuntimeError, match='writer died'):
    runs.atomic_write(str(path), half_then_fail)
  assert json.loads(path.read_text())['kappa'] == 0.5
  assert os.listdir(tmp_path) == ['metrics.json']  # no temporary file left behind
  runs.atomic_write(str(tmp_path / 'sub' / 'b.bin'), lambda f: f.write(b'\x00\x01'), mode='wb')
  assert (tmp_path / 'sub' / 'b.bin').read_bytes() == b'\x00\x01'


def test_get_path_and_flatten_on_dicts_and_configdicts():
  config = smoke_config()
  assert runs.get_path(config, 'model.width') == 0.0625
  assert runs.get_path({'a': {'b': 1}}, 'a.b') == 1
  assert runs.get_path({'a': {'b': 1}}, 'a.c') is None
  assert runs.get_path({'a': 1}, 'a.b', '<absent>') == '<absent>'
  assert runs.flatten({'a': {'b': 1, 'c': {'d': 2}}, 'e': 3}) == {'a.b': 1, 'a.c.d': 2, 'e': 3}
  flat = runs.flatten(config)
  assert flat['model.width'] == 0.0625 and flat['loss.at'] == 10.0
  assert set(runs.flatten(runs.config_dict(config))) == set(flat)


def test_model_metadata_is_what_loaders_require(tmp_path):
  config = smoke_config(**{'student.view': 'native'})
  meta = runs.model_metadata(config, FakeData, {'epoch': 1}, 'student')
  assert set(runs.REQUIRED_METADATA) <= set(meta)
  assert meta['view'] == 'native' and meta['init'] == {'weights': '', 'head': 'normal'}
  assert runs.model_metadata(config, FakeData, None)['view'] == 'upsampled'  # the teacher's
  export = tmp_path / 'teacher'
  assert not runs.is_finished_model(str(export))
  with pytest.raises(errors.ModelExportError, match='the directory does not exist'):
    runs.read_metadata(str(export))
  export.mkdir()
  with pytest.raises(errors.ModelExportError, match='metadata.json not found'):
    runs.read_metadata(str(export))
  (export / runs.METADATA).write_text('{"model": {"na')
  assert runs.is_finished_model(str(export))  # the file marks it; reading it says what is wrong
  with pytest.raises(errors.ModelExportError, match='truncated or not JSON'):
    runs.read_metadata(str(export))
  runs.write_json(str(export / runs.METADATA), {k: v for k, v in meta.items() if k != 'model'})
  with pytest.raises(errors.ModelExportError, match=r"lacks the key\(s\) \['model'\]"):
    runs.read_metadata(str(export))
  runs.write_json(str(export / runs.METADATA), meta)
  assert runs.read_metadata(str(export)) == json.loads(json.dumps(meta))
  with pytest.raises(errors.ModelExportError, match='params/ not found'):
    runs.check_export(str(export))


def test_teacher_mismatches():
  config = smoke_config()
  meta = json.loads(json.dumps(runs.model_metadata(config, FakeData, None)))  # as read back
  assert runs.teacher_mismatches(meta, config, class_names=FakeData.class_names) == []
  assert runs.teacher_mismatches(meta, config, seed=32) == [
      f'seed: teacher {config.seed}, this config 32']
  meta.update(dataset='folder', class_names=['a', 'b', 'c', 'd'])
  meta['model'].update(width=0.5, input_std=[])
  want = ['model.width: teacher 0.5, this config 0.0625',
          'model.input_std: teacher [], this config [0.123, 0.12, 0.081]',
          "dataset: teacher 'folder', this config 'synthetic_histology'",
          "class_names: teacher ['a', 'b', 'c', 'd'], this config ['NC', 'G3', 'G4', 'G5']"]
  assert runs.teacher_mismatches(meta, config, class_names=FakeData.class_names) == want
  # A teacher trained elsewhere (config.teacher.checkpoint) may come from another seed and data
  # source; its architecture, inputs and classes must still fit.
  assert runs.teacher_mismatches(meta, config, seed=32, class_names=FakeData.class_names,
                                 external=True) == want[:2] + want[3:]
