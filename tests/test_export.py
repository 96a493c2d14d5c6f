"""camkd_jax.export: ONNX and WSInfer (TorchScript) exports of finished runs, their parity with
the JAX model, the model card and the one-line errors. Runs are written by tests/run_export.py
(random parameters, no training)."""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest

from camkd_jax import errors
from camkd_jax import export
from camkd_jax import inference
from camkd_jax import weights
import run_export

onnx = pytest.importorskip('onnx')        # the `onnx` extra, part of `test`
ort = pytest.importorskip('onnxruntime')

METRICS = {'val': {'accuracy': 0.75, 'balanced_accuracy': 0.7, 'kappa': 0.8125,
                   'num_examples': 96},
           'test': {'accuracy': 0.5, 'balanced_accuracy': 0.4375, 'kappa': 0.6123,
                    'num_examples': 128}}


def _torch():
  """torch, or a skip when it is truly absent (CI installs it with the `test` extra)."""
  return pytest.importorskip('torch')


def _student_params(image_size, factor, view, seed):
  """Random trunk (run_export.random_params) with a head that spreads the classes: its N(0, 0.01)
  head gives probabilities 0.25 +- 1e-4 on every tile, which a 1e-4 parity check cannot tell
  apart. Here the head is random on the pooled features standardised over 32 tiles, so logits
  vary by ~1 from tile to tile (and the trunk's rounding errors are amplified as much)."""
  model = run_export.tiny_model()
  params = run_export.random_params(model, image_size, seed)
  t = image_size // factor
  x = _tiles(32, t, seed=99).astype(np.float32)
  x = np.asarray(inference.model_input(x, factor, view, image_size))
  _, acts = model.apply({'params': params}, x, stop='pooled')
  pooled = np.asarray(acts['pooled'], np.float64)
  rng = np.random.default_rng(seed)
  spread = pooled.std(0)
  spread = np.maximum(spread, 1e-3 * spread.max())  # a (near-)constant channel is not blown up
  kernel = rng.standard_normal((pooled.shape[1], 4)) / spread[:, None]
  kernel /= np.sqrt(pooled.shape[1])
  params['classifier'] = {'kernel': kernel.astype(np.float32),
                          'bias': (-pooled.mean(0) @ kernel).astype(np.float32)}
  return params


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """'upsampled': 32 px images, f = 4 (8 px tiles upsampled to 32 px), val / test metrics in
  its metadata; 'native': 64 px images, f = 4 (16 px tiles, the network runs on them)."""
  d = tmp_path_factory.mktemp('export_runs')
  up, nat = str(d / 'upsampled'), str(d / 'native')
  run_export.export_run(up, image_size=32, factor=4,
                        student_params=_student_params(32, 4, 'upsampled', 1))
  meta_path = os.path.join(up, 'student', 'metadata.json')
  with open(meta_path) as f:
    meta = json.load(f)
  meta['report'].update(METRICS)
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  run_export.export_run(nat, image_size=64, factor=4, seed=1,
                        student_params=_student_params(64, 4, 'native', 3),
                        config_extra={'student': {'view': 'native'}})
  return {'upsampled': up, 'native': nat}


def _has_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


@pytest.fixture(scope='module')
def exported(runs, tmp_path_factory):
  """Both runs exported with --format all (ONNX alone where torch is absent)."""
  d = tmp_path_factory.mktemp('exported')
  fmt = 'all' if _has_torch() else 'onnx'
  return {view: export.export(run, str(d / view), 'student', fmt)['out']
          for view, run in runs.items()}


def _tiles(n, t, seed):
  return np.random.default_rng([seed, 5]).integers(0, 256, (n, t, t, 3), dtype=np.uint8)


def _torchscript_probs(directory, tiles):
  """What WSInfer computes, written here from config.json: ToTensor (/ 255), Normalize, the
  TorchScript logits, softmax (in float64)."""
  torch = _torch()
  with open(os.path.join(directory, 'config.json')) as f:
    cfg = json.load(f)
  norm = [s for s in cfg['transform'] if s['name'] == 'Normalize'][0]['arguments']
  x = tiles.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
  x = (x - np.reshape(norm['mean'], (1, 3, 1, 1))) / np.reshape(norm['std'], (1, 3, 1, 1))
  module = torch.jit.load(os.path.join(directory, 'torchscript_model.pt'))
  with torch.no_grad():
    z = module(torch.from_numpy(x.astype(np.float32))).numpy().astype(np.float64)
  e = np.exp(z - z.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def _onnx_probs(directory, tiles):
  session = ort.InferenceSession(os.path.join(directory, 'model.onnx'),
                                 providers=['CPUExecutionProvider'])
  return session.run(['probabilities'], {'tiles': tiles})[0]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize('view', ['upsampled', 'native'])
def test_jax_onnx_torchscript_agree(runs, exported, view):
  """Same tiles, three runtimes: probabilities within 1e-4 (float32); ONNX at batch 1 and 7
  (dynamic batch); TorchScript behind the config's transforms at batch 7 (traced at 2)."""
  rm = inference.load_run_model(runs[view], 'student')
  t = rm.tile_size
  assert (t, rm.view, rm.input_size) == ((8, 'upsampled', 32) if view == 'upsampled' else
                                         (16, 'native', 16))
  tiles = _tiles(7, t, seed=3)
  want = inference.Predictor(rm, batch_size=8).predict(tiles)
  assert np.isfinite(want).all() and want.std() > 0.05  # the classes differ between tiles
  got_onnx = np.concatenate([_onnx_probs(exported[view], tiles[:1]),
                             _onnx_probs(exported[view], tiles[1:])])
  assert got_onnx.shape == (7, 4)
  np.testing.assert_allclose(got_onnx, want, atol=1e-4, rtol=0)
  # the argmax is the same class (a tile whose top two differ by < 1e-4 would be a tie)
  assert (got_onnx.argmax(1) == want.argmax(1)).all()
  got_ts = _torchscript_probs(exported[view], tiles)
  assert got_ts.shape == (7, 4)
  np.testing.assert_allclose(got_ts, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got_onnx, got_ts, atol=1e-4, rtol=0)


def test_onnx_graph_interface(exported):
  model = onnx.load(os.path.join(exported['upsampled'], 'model.onnx'))
  (inp,) = model.graph.input
  dims = inp.type.tensor_type.shape.dim
  assert inp.name == 'tiles' and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  assert dims[0].dim_param == 'N' and [d.dim_value for d in dims[1:]] == [8, 8, 3]
  assert [o.name for o in model.graph.output] == ['probabilities', 'logits']
  ops = [n.op_type for n in model.graph.node]
  assert ops.count('Conv') == 13 and ops.count('MaxPool') == 4 and ops.count('Relu') == 12
  resize = [n for n in model.graph.node if n.op_type == 'Resize']
  assert len(resize) == 1
  attrs = {a.name: a.s.decode() for a in resize[0].attribute}
  assert attrs == {'mode': 'linear', 'coordinate_transformation_mode': 'align_corners'}
  props = {p.key: json.loads(p.value) for p in model.metadata_props}
  assert props['class_names'] == list(run_export.CLASS_NAMES)
  assert props['tile_size'] == 8 and props['magnification'] == 2.5 and props['view'] == 'upsampled'
  native = onnx.load(os.path.join(exported['native'], 'model.onnx'))
  assert 'Resize' not in [n.op_type for n in native.graph.node]


def test_float_input_and_onnx_without_torch(runs, tmp_path, monkeypatch):
  """--onnx_input float32 takes the tiles as floats 0..255; the ONNX path imports no torch
  (torch made unimportable here)."""
  monkeypatch.setitem(sys.modules, 'torch', None)
  out = str(tmp_path / 'float')
  result = export.export(runs['upsampled'], out, 'student', 'onnx', onnx_input='float32')
  assert sorted(os.listdir(out)) == ['model.onnx', 'model_card.md']
  assert result['parity']['ONNX (onnxruntime)'] <= 1e-4
  rm = inference.load_run_model(runs['upsampled'], 'student')
  tiles = _tiles(3, 8, seed=4)
  np.testing.assert_allclose(_onnx_probs(out, tiles.astype(np.float32)),
                             inference.Predictor(rm, 4).predict(tiles), atol=1e-4, rtol=0)


def test_teacher_export(runs, tmp_path):
  """--model teacher: 10x, 1 um/px, the 32 px tile itself; ONNX = JAX."""
  out = str(tmp_path / 'teacher')
  export.export(runs['upsampled'], out, 'teacher', 'onnx')
  rm = inference.load_run_model(runs['upsampled'], 'teacher')
  tiles = _tiles(3, 32, seed=6)
  np.testing.assert_allclose(_onnx_probs(out, tiles), inference.Predictor(rm, 4).predict(tiles),
                             atol=1e-4, rtol=0)
  with open(os.path.join(out, 'model_card.md')) as f:
    card = f.read()
  assert '| magnification | 10x |' in card and '| view | the tile itself (32 px) |' in card
  assert '1 um/px' in card and 'align_corners' not in card


def test_exported_student_on_a_slide_tile_gives_camkd_jax_slide(runs, exported, tmp_path):
  """camkd_jax.slide's tiles.csv probabilities for a synthetic slide = the ONNX and TorchScript
  files fed the same tiles, read from the slide by the real OpenSlide at the model's 2.5x."""
  openslide = pytest.importorskip('openslide')
  from camkd_jax import slide as slide_cli  # pylint: disable=g-import-not-at-top
  from camkd_jax import slide_testdata  # pylint: disable=g-import-not-at-top
  from camkd_jax import wsi  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 's.svs')
  slide_testdata.write_slide(path, 32, ((0, 2),), cells=3, gap=1)
  results = slide_cli.run_slides(runs['upsampled'], 'student', [path], str(tmp_path / 'out'),
                                 slide_cli.Options(batch_size=16, readers=1))
  assert results[0]['status'] == 'ok'
  with open(tmp_path / 'out' / 's' / 'tiles.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) >= 10
  want = np.array([[float(r[f'prob_{c}']) for c in run_export.CLASS_NAMES] for r in rows])
  plan = wsi.plan_slide(path, 2.5, 8, 8)
  assert plan.level == 1  # the 4x-downsampled level is 2.5x: the pooling is the reading
  handle = openslide.OpenSlide(path)
  tiles = np.stack([wsi.read_tile(handle, plan, int(r['x']), int(r['y'])) for r in rows])
  handle.close()
  np.testing.assert_allclose(_onnx_probs(exported['upsampled'], tiles), want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(_torchscript_probs(exported['upsampled'], tiles), want, atol=1e-4,
                             rtol=0)


# ----------------------------------------------------------------------------- the torch layout
def test_torch_module_has_torchvision_layout_and_the_mapping_inverts(runs):
  """flax_to_torchvision is the inverse of the import mapping; the TorchScript module's state
  dict is torchvision's VGG16 `features.N` layout with the same arrays."""
  torch = _torch()
  from camkd_jax.models import vgg  # pylint: disable=g-import-not-at-top
  rm = inference.load_run_model(runs['upsampled'], 'student')
  params = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in rm.params.items()}
  state = weights.flax_to_torchvision(params)
  back = weights.torchvision_to_flax(state, params)
  for name in params:
    for key in params[name]:
      np.testing.assert_array_equal(back[name][key], params[name][key])
  conv_idx = [i for block in vgg.torchvision_indices() for i in block]
  assert conv_idx == list(weights.VGG16_CONV_INDICES)
  module = export.torch_module(rm)
  sd = module.state_dict()
  assert sorted(sd) == sorted([f'features.{i}.{s}' for i in conv_idx for s in ('weight', 'bias')]
                              + ['classifier.weight', 'classifier.bias'])
  k = np.asarray(params['features_28']['kernel'])  # HWIO
  np.testing.assert_array_equal(sd['features.28.weight'].numpy()[2, 1], k[:, :, 1, 2])  # OIHW
  np.testing.assert_array_equal(sd['classifier.weight'].numpy(), params['classifier']['kernel'].T)
  assert isinstance(module.features[28], torch.nn.Conv2d)  # block5 ends with it, no ReLU after
  assert len(module.features) == 29


# ----------------------------------------------------------------------------- WSInfer config
def test_wsinfer_config_follows_the_schema(exported):
  """wsinfer-zoo's model-config schema 1.0: required keys and types, unique class names, one
  Resize size (QuPath reads one int), Normalize mean / std; spacing from the magnification."""
  _torch()
  with open(os.path.join(exported['upsampled'], 'config.json')) as f:
    cfg = json.load(f)
  assert set(cfg) == {'spec_version', 'architecture', 'num_classes', 'class_names',
                      'patch_size_pixels', 'spacing_um_px', 'transform'}
  assert cfg['spec_version'] == '1.0' and isinstance(cfg['architecture'], str)
  assert cfg['num_classes'] == 4 and cfg['class_names'] == list(run_export.CLASS_NAMES)
  assert isinstance(cfg['patch_size_pixels'], int) and cfg['patch_size_pixels'] == 8
  assert cfg['spacing_um_px'] == 4.0  # 2.5x at 1 um/px for 10x
  names = [s['name'] for s in cfg['transform']]
  assert names == ['Resize', 'ToTensor', 'Normalize']
  assert cfg['transform'][0]['arguments'] == {'size': 8, 'interpolation': 4}  # PIL's BOX
  assert cfg['transform'][2]['arguments'] == {'mean': list(run_export.MEAN),
                                              'std': list(run_export.STD)}
  with open(os.path.join(exported['native'], 'config.json')) as f:
    assert json.load(f)['patch_size_pixels'] == 16


def test_model_card(exported):
  _torch()
  with open(os.path.join(exported['upsampled'], 'model_card.md')) as f:
    card = f.read()
  for text in ('NC, G3, G4, G5', '| magnification | 2.5x', '4 um/px', '8 x 8 px at 2.5x',
               'upsampled: the network runs on the tile upsampled to 32 x 32 px',
               '| validation | 96 | 0.7500 | 0.7000 | 0.8125 |',
               '| test | 128 | 0.5000 | 0.4375 | 0.6123 |',
               'align_corners=True by 4', 'mean = [0.842, 0.582, 0.733]',
               'model.onnx', 'torchscript_model.pt', 'ONNX (onnxruntime): '):
    assert text in card, text
  with open(os.path.join(exported['native'], 'model_card.md')) as f:
    native = f.read()
  assert 'native: the network runs on the 16 px tile itself' in native
  assert 'Not recorded in the export.' in native and 'align_corners' not in native


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_fix(runs, tmp_path, monkeypatch):
  up = runs['upsampled']
  out = str(tmp_path / 'out')
  unfinished = tmp_path / 'unfinished'
  shutil.copytree(up, unfinished)
  os.remove(unfinished / 'student' / 'metadata.json')
  with pytest.raises(FileNotFoundError, match='has not finished; rerun the training command'):
    export.export(str(unfinished), out, 'student', 'onnx')
  teacher_only = tmp_path / 'teacher_only'
  shutil.copytree(up, teacher_only)
  shutil.rmtree(teacher_only / 'student')
  (teacher_only / 'config.json').write_text(json.dumps({'method': 'teacher'}))
  with pytest.raises(FileNotFoundError, match=r'teacher-only run .*\(--model teacher\)'):
    export.export(str(teacher_only), out, 'student', 'onnx')
  multi = tmp_path / 'multi'
  shutil.copytree(up, multi / 'seed_22')
  with pytest.raises(FileNotFoundError, match=r'multi-seed run \(seed_22\): pass one seed'):
    export.export(str(multi), out, 'student', 'onnx')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(export.MissingExtraError,
                     match=r'--format wsinfer needs the package\(s\) torch.*pip install -e '
                           r'"\.\[export\]"'):
    export.export(up, out, 'student', 'wsinfer')
  monkeypatch.setitem(sys.modules, 'onnxruntime', None)
  with pytest.raises(export.MissingExtraError, match=r'onnxruntime.*pip install -e "\.\[onnx\]"'):
    export.export(up, out, 'student', 'onnx')
  assert not os.path.exists(out)  # nothing written by any of them
  monkeypatch.undo()
  with pytest.raises(export.ExportError, match=r"--format 'tflite': choose one of"):
    export.export(up, out, 'student', 'tflite')
  os.makedirs(out)
  (tmp_path / 'out' / 'notes.txt').write_text('mine')
  with pytest.raises(export.ExportError, match=r'out exists; choose another folder or pass '
                                               r'--overwrite'):
    export.export(up, out, 'student', 'onnx')
  with pytest.raises(export.ExportError, match=r'not an earlier export \(no model_card.md\)'):
    export.export(up, out, 'student', 'onnx', overwrite=True)
  assert os.listdir(out) == ['notes.txt']
  for e in (export.MissingExtraError('x'), export.ExportError('x')):
    assert errors.is_user_error(e)


def test_parity_failure_is_refused():
  with pytest.raises(export.ExportError, match=r'differs from the JAX model by 2.00e-03'):
    export.check_parity('ONNX', np.array([[0.5, 0.5]]), np.array([[0.502, 0.498]]), 'RUN')
  with pytest.raises(export.ExportError, match='by nan'):
    export.check_parity('ONNX', np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]), 'RUN')


def test_cli_writes_then_refuses_an_existing_out(runs, tmp_path):
  """The command prints one line; the same command again ends in one `error:` line, exit 2;
  overwrite=True replaces the earlier export (no temporary folder left)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'cli')
  cmd = [sys.executable, '-m', 'camkd_jax.export', f'--workdir={runs["upsampled"]}',
         '--format=onnx', f'--out={out}']
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert first.returncode == 0, first.stderr
  assert first.stdout.startswith(f'wrote model.onnx, model_card.md to {out}: student at 2.5x '
                                 '(4 um/px), 8 px tiles, view upsampled')
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert again.returncode == errors.EXIT_USER_ERROR
  assert again.stderr.strip().splitlines()[-1] == (
      f'error: --out {out} exists; choose another folder or pass --overwrite to replace it')
  os.remove(os.path.join(out, 'model.onnx'))  # --overwrite replaces an earlier export
  export.export(runs['upsampled'], out, 'student', 'onnx', overwrite=True)
  assert sorted(os.listdir(out)) == ['model.onnx', 'model_card.md']
  assert not [n for n in os.listdir(tmp_path) if '.tmp' in n]
