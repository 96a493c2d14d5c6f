"""camkd_jax.checkpoints: atomic JSON writes, an export interrupted before its metadata.json (not
finished, replaced by the rerun), stage checkpoints' rotation and round trip.
(Disk faults and broken exports: tests/test_errors.py.)"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from camkd_jax import checkpoints
from camkd_jax import errors
from camkd_jax import runs

META = {'model': {'name': 'vgg16'}, 'image_size': 32, 'class_names': ['a', 'b'], 'num_classes': 2}


def test_write_json_is_atomic_and_plain_json(tmp_path, monkeypatch):
  path = str(tmp_path / 'metrics.json')
  checkpoints.write_json(path, {'kappa': np.float32(0.5), 'n': np.int64(3), 'nan': float('nan'),
                                'cm': np.eye(2, dtype=np.int32), 'inf': np.float64(np.inf)})
  with open(path) as f:
    assert json.load(f) == {'kappa': 0.5, 'n': 3, 'nan': None, 'cm': [[1, 0], [0, 1]],
                            'inf': None}

  def dump(obj, f, **kw):
    f.write('{"kappa": ')
    raise KeyboardInterrupt  # stopped half-way through the write
  monkeypatch.setattr(runs.json, 'dump', dump)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.write_json(path, {'kappa': 0.75})
  with open(path) as f:
    assert json.load(f)['kappa'] == 0.5  # the previous file, whole
  assert os.listdir(tmp_path) == ['metrics.json']  # no temporary file left


def test_atomic_write_binary_mode_replaces_the_file(tmp_path):
  path = str(tmp_path / 'sub' / 'x.bin')  # the folder is created
  runs.atomic_write(path, lambda f: f.write(b'\x00\x01'), mode='wb')
  runs.atomic_write(path, lambda f: f.write(b'\x02'), mode='wb')
  with open(path, 'rb') as f:
    assert f.read() == b'\x02'
  assert os.listdir(tmp_path / 'sub') == ['x.bin']


def test_export_stopped_before_metadata_is_not_finished_and_a_rerun_replaces_it(tmp_path,
                                                                                monkeypatch):
  path = tmp_path / 'teacher'
  real = checkpoints.write_json

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # the process stops after params/, before metadata.json
  monkeypatch.setattr(checkpoints, 'write_json', killed)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save_model(str(path), {'w': jnp.arange(4.0)}, META)
  assert (path / 'params').is_dir() and not (path / 'metadata.json').exists()
  assert not runs.is_finished_model(str(path))
  with pytest.raises(errors.ModelExportError, match='metadata.json not found \\(the export never '
                                                    'finished'):
    runs.check_export(str(path))
  (path / 'params' / 'stale_file').write_text('from the killed export')
  monkeypatch.setattr(checkpoints, 'write_json', real)
  checkpoints.save_model(str(path), {'w': jnp.arange(4.0) * 10}, META)  # the rerun
  assert runs.is_finished_model(str(path))
  assert not (path / 'params' / 'stale_file').exists()  # the partial params/ was replaced
  assert runs.check_export(str(path)) == META
  params, meta = checkpoints.load_model(str(path), {'w': jnp.zeros(4)})
  np.testing.assert_array_equal(np.asarray(params['w']), [0.0, 10.0, 20.0, 30.0])
  assert meta == META


def test_stage_checkpoints_round_trip_keep_the_latest_two(tmp_path):
  ckpt = checkpoints.StageCheckpoints(str(tmp_path / 'ckpt'))
  try:
    assert ckpt.latest_step() is None
    for step in (3, 6, 9):
      state = {'w': jnp.full(3, float(step)), 'step': jnp.asarray(step)}
      ckpt.save(step, state, {'w': jnp.full(3, -float(step))},
                {'history': [step], 'best': None, 'sum': np.float32(1.5)})
    # A step already on disk is left as it is (a resumed run reaching it again).
    ckpt.save(9, {'w': jnp.zeros(3), 'step': jnp.asarray(0)}, {'w': jnp.zeros(3)}, {})
    assert ckpt.latest_step() == 9
    assert sorted(int(n) for n in os.listdir(tmp_path / 'ckpt') if n.isdigit()) == [6, 9]
    template = {'w': jnp.zeros(3), 'step': jnp.asarray(0)}
    state, best, progress = ckpt.restore(9, template, {'w': jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(state['w']), [9.0, 9.0, 9.0])
    assert int(state['step']) == 9
    np.testing.assert_array_equal(np.asarray(best['w']), [-9.0, -9.0, -9.0])
    assert progress == {'history': [9], 'best': None, 'sum': 1.5}
  finally:
    ckpt.close()
