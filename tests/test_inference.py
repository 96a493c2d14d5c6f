"""camkd_jax.inference: loading a finished run and the fixed-batch, sharded predict step."""
import json
import os
import shutil

import numpy as np
import pytest

from camkd_jax import inference
from helpers import xla_flags
import reference_np
import run_export


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  model, tparams, sparams = run_export.export_run(workdir, image_size=32, factor=4)
  return workdir, model, tparams, sparams


def _tiles(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference_probs(model, params, images01):
  """model.apply one image at a time on float images, softmax in float64."""
  out = []
  for img in images01:
    logits, _ = model.apply({'params': params}, np.asarray(img, np.float32)[None])
    z = np.asarray(logits, np.float64)[0]
    out.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
  return np.stack(out)


@pytest.mark.parametrize('which', ['teacher', 'student'])
def test_predict_matches_model_apply(run_dir, which):
  """Teacher: the tile itself; upsampled student (f=4): the 8 px tile upsampled to 32 px with an
  independent float64 bilinear (align_corners) reference. 11 tiles in batches of 4: two full and
  one padded batch, one compiled program."""
  workdir, model, tparams, sparams = run_dir
  rm = inference.load_run_model(workdir, which)
  want_f, params = (1, tparams) if which == 'teacher' else (4, sparams)
  assert (rm.factor, rm.image_size, rm.tile_size) == (want_f, 32, 32 // want_f)
  assert rm.magnification == 10.0 / want_f and rm.class_names == run_export.CLASS_NAMES
  tiles = _tiles(11, rm.tile_size)
  x = tiles.astype(np.float64) / 255.0
  if want_f > 1:
    assert rm.view == 'upsampled'
    x = reference_np.bilinear_align_corners(x, 32, 32)
  want = _reference_probs(model, params, x)
  predictor = inference.Predictor(rm, batch_size=4)
  got = predictor.predict(tiles)
  assert got.shape == (11, 4) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(predictor.predict(tiles[:3]), want[:3], atol=2e-5)
  assert predictor.predict(tiles[:0]).shape == (0, 4)
  assert predictor.compiled_programs() == 1


def test_full_resolution_patches_are_seen_as_in_evaluation(run_dir):
  """full_resolution=True (camkd_jax.predict): 32 px patches at the teacher's magnification;
  the f=4 student sees each average-pooled by 4 and upsampled back (align_corners), against a
  float64 NumPy reference of both; the teacher sees the patch itself (its tile predictions)."""
  workdir, model, _, sparams = run_dir
  patches = _tiles(5, 32, seed=2)
  rm = inference.load_run_model(workdir, 'student')
  pooled = patches.astype(np.float64).reshape(5, 8, 4, 8, 4, 3).mean((2, 4)) / 255.0
  want = _reference_probs(model, sparams, reference_np.bilinear_align_corners(pooled, 32, 32))
  predictor = inference.Predictor(rm, 2, full_resolution=True)
  np.testing.assert_allclose(predictor.predict(patches), want, atol=2e-5)
  with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\) at the teacher's magnification"):
    predictor.predict(patches[:, :8, :8])
  teacher = inference.load_run_model(workdir, 'teacher')
  np.testing.assert_array_equal(
      inference.Predictor(teacher, 2, full_resolution=True).predict(patches),
      inference.Predictor(teacher, 2).predict(patches))


def test_native_view_feeds_the_tile_itself(tmp_path):
  """A student exported with view 'native' runs on the 16 px tile itself (VGG's smallest input:
  a smaller one leaves no block5 map and gives NaN, which assert_allclose would take as equal)."""
  model, _, sparams = run_export.export_run(str(tmp_path), image_size=32, factor=2,
                                            config_extra={'student': {'view': 'native'}})
  rm = inference.load_run_model(str(tmp_path), 'student')
  assert (rm.view, rm.input_size) == ('native', 16)
  tiles = _tiles(3, 16, seed=1)
  want = _reference_probs(model, sparams, tiles / 255.0)
  got = inference.Predictor(rm, 2).predict(tiles)
  assert np.isfinite(want).all() and np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_wrong_tiles_are_named(run_dir):
  predictor = inference.Predictor(inference.load_run_model(run_dir[0], 'student'), 4)
  with pytest.raises(ValueError, match=r'uint8 of shape \(N, 8, 8, 3\).*float32 \(2, 32, 32, 3\)'):
    predictor.predict(np.zeros((2, 32, 32, 3), np.float32))


def test_load_errors_name_path_and_remedy(tmp_path, run_dir):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='nope does not exist'):
    inference.load_run_model(missing)
  unfinished = tmp_path / 'unfinished'
  shutil.copytree(run_dir[0], unfinished)
  os.remove(unfinished / 'student' / 'metadata.json')
  with pytest.raises(FileNotFoundError, match=r'no finished student in .*unfinished/student.*'
                                              r'has not finished; rerun the training command'):
    inference.load_run_model(str(unfinished))
  multi = tmp_path / 'multi'
  shutil.copytree(run_dir[0], multi / 'seed_22')
  with pytest.raises(FileNotFoundError, match=r'multi-seed run \(seed_22\).*multi/seed_22'):
    inference.load_run_model(str(multi))
  teacher_only = tmp_path / 'teacher_only'
  teacher_only.mkdir()
  (teacher_only / 'config.json').write_text(json.dumps({'method': 'teacher'}))
  with pytest.raises(FileNotFoundError, match='teacher-only run'):
    inference.load_run_model(str(teacher_only))
  with pytest.raises(ValueError, match="unknown model 'teachr'"):
    inference.load_run_model(run_dir[0], 'teachr')


def test_sharded_over_two_devices_equals_one(python_runner, run_dir):
  """Batch 4 split over 2 CPU devices gives the single-device probabilities."""
  workdir = run_dir[0]
  want = inference.Predictor(inference.load_run_model(workdir, 'student'), 4).predict(
      _tiles(5, 8, seed=3))
  out = python_runner(f'''
      import jax, numpy as np
      from camkd_jax import inference
      assert jax.local_device_count() == 2
      p = inference.Predictor(inference.load_run_model({workdir!r}, 'student'), 3)
      assert p.batch_size == 4 and p.mesh.size == 2
      tiles = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
      print(repr(p.predict(tiles).tolist()))
  ''', {'XLA_FLAGS': xla_flags(2)})
  got = np.array(eval(out.strip().splitlines()[-1]))  # pylint: disable=eval-used
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_teacher_from_config_teacher_checkpoint(tmp_path, run_dir):
  """A run that distilled from a teacher trained elsewhere has no RUN/teacher: the teacher is
  the one named by config teacher.checkpoint."""
  run = tmp_path / 'run'
  shutil.copytree(run_dir[0], run)
  shutil.move(str(run / 'teacher'), str(tmp_path / 'elsewhere'))
  cfg = json.loads((run / 'config.json').read_text())
  cfg['teacher'] = {'checkpoint': str(tmp_path / 'elsewhere')}
  (run / 'config.json').write_text(json.dumps(cfg))
  rm = inference.load_run_model(str(run), 'teacher')
  assert rm.path == str(tmp_path / 'elsewhere') and rm.factor == 1
