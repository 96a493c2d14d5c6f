r"""Export a finished run's model for use outside this package: ONNX, and a WSInfer model directory.

  python -m camkd_jax.export --workdir workdirs/attn_kd_m2.5 --format all --out exported/
  python -m camkd_jax.export --workdir RUN --model teacher --format onnx --out teacher_onnx/

The model is read exactly as camkd_jax.inference.load_run_model reads it (class names,
magnification, view, tile size, input standardisation). --out becomes a self-contained folder:

  model_card.md           what the model is (run, classes, magnification, MPP, tile size, view),
                          its validation / test metrics, the preprocessing it bakes in, and the
                          parity measured when it was written
  model.onnx              (onnx, all) tiles -> class probabilities: input `tiles`, uint8 (or
                          float32 in [0, 255] with --onnx_input=float32) of shape
                          (N, t, t, 3), t = the tile size at the model's magnification, N any;
                          outputs `probabilities` (N, C) and `logits` (N, C). Inside: / 255, the
                          student view (align-corners bilinear upsampling by f for an upsampled
                          student), the input standardisation, the VGG, softmax.
  config.json +           (wsinfer, all) a WSInfer model: TorchScript module (N, 3, t, t) float
  torchscript_model.pt    -> logits (WSInfer and QuPath apply softmax), config.json in WSInfer's
                          model-config schema 1.0 (patch size, spacing in um/px, class names,
                          Resize / ToTensor / Normalize transforms).

The pooling of the student view (avg-pool f of the 10x image) is what reading the slide at the
model's magnification does, so every format takes tiles at that magnification, as
camkd_jax.inference.Predictor and camkd_jax.slide do.

Before anything is moved to --out, the exported files are run on the same tiles as the JAX
model (onnxruntime; TorchScript reloaded by torch.jit.load behind the config's transforms) and
refused when a probability differs by more than PARITY_ATOL; the differences go in the card.
The folder is written under a temporary name and renamed: an --out is complete or absent.
Needs `pip install -e ".[onnx]"` for ONNX and `.[export]` (adds torch) for WSInfer; no TensorFlow.
"""
import dataclasses
import datetime
import json
import os
import shutil
import sys
import warnings
from typing import Any, Dict, List

import numpy as np

from camkd_jax import errors
from camkd_jax import runs

FORMATS = ('onnx', 'wsinfer', 'all')
ONNX_INPUTS = ('uint8', 'float32')
ONNX_FILE = 'model.onnx'
WSINFER_CONFIG = 'config.json'
TORCHSCRIPT_FILE = 'torchscript_model.pt'   # the name QuPath's WSInfer extension 0.3 requires
CARD_FILE = 'model_card.md'
ONNX_OPSET = 17
PARITY_ATOL = 1e-4
PARITY_TILES = 8
PIL_BOX = 4                                 # PIL.Image.BOX, torchvision's InterpolationMode.BOX
BASE_MPP = 1.0                              # um/px at 10x (the convention of camkd_jax.wsi)
INSTALL = {'onnx': 'pip install -e ".[onnx]"', 'wsinfer': 'pip install -e ".[export]"'}


class MissingExtraError(errors.UserError, ImportError):
  """A format needs packages of an optional extra that is not installed."""


class ExportError(errors.UserError, ValueError):
  """The model or --out cannot be exported as asked."""


def _require(fmt: str):
  """Imports what `fmt` needs, or one line naming the extra to install."""
  need = {'onnx': ('onnx', 'onnxruntime'), 'wsinfer': ('torch',)}[fmt]
  missing = []
  for name in need:
    try:
      __import__(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise MissingExtraError(
        f'--format {fmt} needs the package(s) {", ".join(missing)}, which are not installed: '
        f'install them with {INSTALL[fmt]}')


def formats_of(fmt: str) -> List[str]:
  if fmt not in FORMATS:
    raise ExportError(f'--format {fmt!r}: choose one of {list(FORMATS)}')
  return ['onnx', 'wsinfer'] if fmt == 'all' else [fmt]


# ----------------------------------------------------------------------------- what the model is
def model_mpp(run_model) -> float:
  """um/px of the tiles the model takes (10x ~ 1 um/px)."""
  return BASE_MPP * 10.0 / run_model.magnification


def standardisation(run_model):
  """(mean, std) of the [0, 1] input, or ((0, 0, 0), (1, 1, 1)) for a run without one."""
  m = run_model.model
  if m.input_mean is None:
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return tuple(map(float, m.input_mean)), tuple(map(float, m.input_std))


def upsampled(run_model) -> bool:
  return run_model.view == 'upsampled' and run_model.factor > 1


def conv_blocks(run_model):
  """Torchvision `features.N` index of every conv, per block, for a VGG model."""
  from camkd_jax.models import vgg  # pylint: disable=g-import-not-at-top
  if not isinstance(run_model.model, vgg.VGG):
    raise ExportError(f'{run_model.path}: export supports the VGG models of camkd_jax.models; '
                      f'this one is {type(run_model.model).__name__}')
  return vgg.torchvision_indices(run_model.model.channels)


def torchvision_state(run_model) -> Dict[str, np.ndarray]:
  """The parameters in torchvision's layout (camkd_jax.weights' mapping, reversed)."""
  from camkd_jax import weights  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return weights.flax_to_torchvision(jax.device_get(run_model.params))


# ----------------------------------------------------------------------------- ONNX
def onnx_model(run_model, input_dtype: str = 'uint8'):
  """onnx.ModelProto: tiles (N, t, t, 3) at the model's magnification -> probabilities, logits.

  Built node by node from the parameters (a VGG is 13 Conv + Relu, 4 MaxPool, a global average
  pool and a Gemm), in the JAX model's order: / 255, the view's upsampling, (x - mean) / std."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=g-import-not-at-top
  if input_dtype not in ONNX_INPUTS:
    raise ExportError(f'--onnx_input {input_dtype!r}: choose one of {list(ONNX_INPUTS)}')
  t, c = run_model.tile_size, len(run_model.class_names)
  state = torchvision_state(run_model)
  nodes, inits = [], []

  def const(name, value):
    inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name

  def node(op, inputs, name, **attrs):
    nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
    return name

  x = 'tiles'
  if input_dtype == 'uint8':
    x = node('Cast', [x], 'as_float', to=TensorProto.FLOAT)
  x = node('Transpose', [x], 'nchw', perm=[0, 3, 1, 2])
  x = node('Div', [x, const('c255', 255.0)], 'unit_range')
  if upsampled(run_model):
    f = float(run_model.factor)
    x = node('Resize', [x, '', const('view_scales', [1.0, 1.0, f, f])], 'student_view',
             mode='linear', coordinate_transformation_mode='align_corners')
  if run_model.model.input_mean is not None:
    mean, std = standardisation(run_model)
    x = node('Sub', [x, const('input_mean', np.reshape(mean, (1, 3, 1, 1)))], 'centred')
    x = node('Div', [x, const('input_std', np.reshape(std, (1, 3, 1, 1)))], 'standardised')
  blocks = conv_blocks(run_model)
  for b, indices in enumerate(blocks):
    for j, idx in enumerate(indices):
      w = const(f'features.{idx}.weight', state[f'features.{idx}.weight'])
      bias = const(f'features.{idx}.bias', state[f'features.{idx}.bias'])
      x = node('Conv', [x, w, bias], f'features.{idx}', kernel_shape=[3, 3], pads=[1, 1, 1, 1])
      if not (b == len(blocks) - 1 and j == len(indices) - 1):  # block5 ends without a ReLU
        x = node('Relu', [x], f'features.{idx + 1}')
    if b < len(blocks) - 1:
      x = node('MaxPool', [x], f'features.{indices[-1] + 2}', kernel_shape=[2, 2],
               strides=[2, 2])
  x = node('GlobalAveragePool', [x], 'gap')
  x = node('Flatten', [x], 'pooled', axis=1)
  head_w = const('classifier.weight', state['classifier.weight'])
  logits = node('Gemm', [x, head_w, const('classifier.bias', state['classifier.bias'])],
                'logits', transB=1)
  node('Softmax', [logits], 'probabilities', axis=-1)
  elem = TensorProto.UINT8 if input_dtype == 'uint8' else TensorProto.FLOAT
  graph = helper.make_graph(
      nodes, 'camkd_jax', [helper.make_tensor_value_info('tiles', elem, ['N', t, t, 3])],
      [helper.make_tensor_value_info('probabilities', TensorProto.FLOAT, ['N', c]),
       helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['N', c])], inits)
  model = helper.make_model(graph, producer_name='camkd_jax',
                            opset_imports=[helper.make_opsetid('', ONNX_OPSET)])
  model.ir_version = 8  # onnxruntime >= 1.14 and the other runtimes of opset 17 read IR 8
  helper.set_model_props(model, {k: json.dumps(v) for k, v in description(run_model).items()})
  onnx.checker.check_model(model, full_check=True)
  return model


def onnx_probabilities(path: str, tiles: np.ndarray) -> np.ndarray:
  """Probabilities of `tiles` under onnxruntime (CPU)."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  ort_session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  want = ort_session.get_inputs()[0].type
  x = tiles if want == 'tensor(uint8)' else tiles.astype(np.float32)
  return ort_session.run(['probabilities'], {'tiles': x})[0]


# ----------------------------------------------------------------------------- WSInfer / TorchScript
def torch_module(run_model):
  """A torch.nn.Module (N, 3, t, t) standardised float -> logits, built from the parameters:
  `features` is torchvision's VGG layout (Conv2d / ReLU / MaxPool2d at torchvision's indices,
  loaded with load_state_dict(strict=True) from weights.flax_to_torchvision), then global
  average pooling and the Linear head."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  state = torchvision_state(run_model)
  blocks = conv_blocks(run_model)
  layers, in_ch = [], 3
  for b, indices in enumerate(blocks):
    for j, idx in enumerate(indices):
      assert len(layers) == idx, (len(layers), idx)
      out_ch = state[f'features.{idx}.weight'].shape[0]
      layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
      in_ch = out_ch
      if not (b == len(blocks) - 1 and j == len(indices) - 1):
        layers.append(nn.ReLU())
    if b < len(blocks) - 1:
      layers.append(nn.MaxPool2d(2, 2))
  size = run_model.image_size if upsampled(run_model) else 0

  class Classifier(nn.Module):
    """Upsampling of the student view (align-corners, fixed size), VGG trunk, GAP, head."""

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      self.classifier = nn.Linear(in_ch, len(run_model.class_names))

    def forward(self, x):
      if size:
        x = nn.functional.interpolate(x, size=(size, size), mode='bilinear', align_corners=True)
      return self.classifier(self.features(x).mean(dim=(2, 3)))

  module = Classifier()
  module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                          for k, v in state.items()}, strict=True)
  return module.eval()


def write_torchscript(run_model, path: str):
  """Traces the module on a (2, 3, t, t) example (the batch stays free) and saves it."""
  import torch  # pylint: disable=g-import-not-at-top
  t = run_model.tile_size
  example = torch.zeros(2, 3, t, t)
  with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; WSInfer needs it
    warnings.simplefilter('ignore')
    with torch.no_grad():
      traced = torch.jit.trace(torch_module(run_model), example)
    torch.jit.save(traced, path)


def wsinfer_config(run_model) -> Dict[str, Any]:
  """WSInfer's model config (wsinfer-zoo schema, spec_version 1.0)."""
  mean, std = standardisation(run_model)
  t = run_model.tile_size
  return {
      'spec_version': '1.0',
      'architecture': architecture(run_model),
      'num_classes': len(run_model.class_names),
      'class_names': list(run_model.class_names),
      'patch_size_pixels': t,
      'spacing_um_px': model_mpp(run_model),
      'transform': [
          # PIL's BOX filter (torchvision takes PIL's 4): the area average the student's view
          # pools with; WSInfer reads level 0 and resizes, and its default, bilinear, is not
          # what the model saw. QuPath's extension reads only `size`.
          {'name': 'Resize', 'arguments': {'size': t, 'interpolation': PIL_BOX}},
          {'name': 'ToTensor'},
          {'name': 'Normalize', 'arguments': {'mean': list(mean), 'std': list(std)}},
      ],
  }


def torchscript_probabilities(path: str, config: Dict[str, Any], tiles: np.ndarray) -> np.ndarray:
  """Probabilities as WSInfer computes them: the config's ToTensor + Normalize (Resize to the
  tile's own size is the identity), the TorchScript logits, softmax."""
  import torch  # pylint: disable=g-import-not-at-top
  norm = next(s['arguments'] for s in config['transform'] if s['name'] == 'Normalize')
  mean = torch.tensor(norm['mean']).reshape(1, 3, 1, 1)
  std = torch.tensor(norm['std']).reshape(1, 3, 1, 1)
  x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    module = torch.jit.load(path, map_location='cpu')
  with torch.no_grad():
    return torch.softmax(module((x - mean) / std), dim=1).numpy()


# ----------------------------------------------------------------------------- parity
def parity_tiles(run_model, n: int = PARITY_TILES, seed: int = 0) -> np.ndarray:
  t = run_model.tile_size
  return np.random.default_rng(seed).integers(0, 256, (n, t, t, 3), dtype=np.uint8)


def jax_probabilities(run_model, tiles: np.ndarray) -> np.ndarray:
  """camkd_jax.inference.Predictor's probabilities, the model computing in float32 (the
  exported files do, whatever dtype the run trained in)."""
  from camkd_jax import inference  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rm = run_model
  if rm.model.dtype != jnp.float32:
    rm = dataclasses.replace(rm, model=rm.model.clone(dtype=jnp.float32))
  return inference.Predictor(rm, batch_size=len(tiles)).predict(tiles)


def check_parity(name: str, got: np.ndarray, want: np.ndarray, path: str) -> float:
  diff = float(np.max(np.abs(got - want)))
  if not diff <= PARITY_ATOL:
    raise ExportError(f'{path}: the exported {name} model differs from the JAX model by {diff:.2e}'
                      f' (> {PARITY_ATOL:g}) in a class probability; nothing was written. '
                      'Please report this with the run\'s config.json')
  return diff


# ----------------------------------------------------------------------------- the card
def architecture(run_model) -> str:
  m = run_model.model
  return f'camkd_jax VGG16, width {m.width:g}'


def description(run_model) -> Dict[str, Any]:
  """What a user of the files must know, also stored in the ONNX file's metadata."""
  mean, std = standardisation(run_model)
  return {'class_names': list(run_model.class_names),
          'magnification': run_model.magnification, 'mpp_um_per_px': model_mpp(run_model),
          'tile_size': run_model.tile_size, 'view': run_model.view,
          'factor': run_model.factor, 'network_input_size': run_model.input_size,
          'input_mean': list(mean), 'input_std': list(std),
          'architecture': architecture(run_model)}


def _metric_rows(report: Dict[str, Any]) -> List[str]:
  rows = []
  for key, name in (('val', 'validation'), ('test', 'test')):
    m = report.get(key)
    if isinstance(m, dict) and 'kappa' in m:
      rows.append(f'| {name} | {m.get("num_examples", "")} | {m.get("accuracy", float("nan")):.4f} '
                  f'| {m.get("balanced_accuracy", float("nan")):.4f} | {m["kappa"]:.4f} |')
  return rows


def model_card(run_model, which: str, workdir: str, files: List[str],
               parity: Dict[str, float], input_dtype: str) -> str:
  rm, meta = run_model, run_model.metadata
  report = meta.get('report') or {}
  mean, std = standardisation(rm)
  t, s = rm.tile_size, rm.image_size
  model = meta.get('model') or {}
  lines = [
      f'# {which.capitalize()} of {os.path.abspath(workdir)}', '',
      f'Exported by `python -m camkd_jax.export` on {datetime.date.today().isoformat()} from '
      f'`{rm.path}`.', '',
      '| | |', '|---|---|',
      f'| classes ({len(rm.class_names)}) | {", ".join(rm.class_names)} |',
      f'| magnification | {rm.magnification:g}x' + (
          f' (factor {rm.factor} below {rm.magnification * rm.factor:g}x)' if rm.factor > 1
          else '') + ' |',
      f'| pixel size it expects | {model_mpp(rm):g} um/px (10x = {BASE_MPP:g} um/px) |',
      f'| tile | {t} x {t} px at {rm.magnification:g}x' + (
          f' ({s} x {s} px at {rm.magnification * rm.factor:g}x)' if rm.factor > 1 else '')
      + ' |',
      (f'| view | {rm.view}' + (f': the network runs on the tile upsampled to {s} x {s} px' if
                                upsampled(rm) else f': the network runs on the {rm.input_size} '
                                'px tile itself') + ' |') if which == 'student' else
      f'| view | the tile itself ({rm.input_size} px) |',
      f'| network | {architecture(rm)} ({model.get("dtype", "float32")} in training, float32 '
      'here) |',
      f'| method | {report.get("method") or which} |',
      f'| dataset, seed | {meta.get("dataset", "")}, {meta.get("seed", "")} |',
      f'| selected epoch | {report.get("epoch", "")} |',
      '', '## Metrics (the run\'s own evaluation, selected epoch)', '']
  rows = _metric_rows(report)
  lines += (['| split | patches | accuracy | balanced accuracy | quadratic kappa |',
             '|---|---|---|---|---|'] + rows) if rows else ['Not recorded in the export.']
  lines += [
      '', '## Preprocessing baked in', '',
      f'Give RGB tiles of {t} x {t} px read at {rm.magnification:g}x ({model_mpp(rm):g} um/px), '
      'as read from the slide' + (' (the average pooling of the student view is the reading at '
                                  'this magnification)' if rm.factor > 1 else '') + '. Then:', '',
      '1. x = tile / 255 (values in [0, 1]);']
  if upsampled(rm):
    lines.append(f'2. bilinear upsampling with align_corners=True by {rm.factor}, to {s} x {s} px '
                 '(the upsampled student view);')
  lines += [
      f'{3 if upsampled(rm) else 2}. (x - mean) / std per channel, mean = '
      f'{[round(v, 6) for v in mean]}, std = {[round(v, 6) for v in std]};',
      f'{4 if upsampled(rm) else 3}. the network; softmax over the {len(rm.class_names)} classes.',
      '', '## Files', '']
  if ONNX_FILE in files:
    lines.append(f'- `{ONNX_FILE}`: ONNX opset {ONNX_OPSET}, steps 1-{4 if upsampled(rm) else 3} '
                 f'inside. Input `tiles` {input_dtype} (N, {t}, {t}, 3) NHWC'
                 + (' (values 0..255)' if input_dtype == 'float32' else '') +
                 f', N free; outputs `probabilities` and `logits` (N, {len(rm.class_names)}), '
                 'classes in the order above. The same facts are in its metadata_props.')
  if TORCHSCRIPT_FILE in files:
    lines.append(f'- `{WSINFER_CONFIG}` + `{TORCHSCRIPT_FILE}`: a WSInfer model (`wsinfer run '
                 f'--model-path {TORCHSCRIPT_FILE} --config {WSINFER_CONFIG}`, or QuPath\'s WSInfer '
                 'extension as a local model). The config\'s Resize brings what WSInfer reads to '
                 f'{t} px with PIL\'s box filter (area average), ToTensor is step 1, Normalize '
                 'the standardisation; the TorchScript module takes (N, 3, '
                 f'{t}, {t}), ' + ('upsamples inside (after Normalize: the same, the '
                                   'bilinear weights sum to 1), ' if upsampled(rm) else '') +
                 'and returns logits (WSInfer and QuPath apply the softmax).')
  lines += ['', '## Parity when written', '',
            f'Largest absolute difference of a class probability from camkd_jax.inference.Predictor '
            f'(JAX, float32) on {PARITY_TILES} random tiles (limit {PARITY_ATOL:g}):', '']
  lines += [f'- {name}: {diff:.1e}' for name, diff in parity.items()]
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- the command
def _check_out(out: str, overwrite: bool):
  if not out:
    raise ExportError('--out is required: the folder to write the exported model to')
  if os.path.exists(out):
    if not overwrite:
      raise ExportError(f'--out {out} exists; choose another folder or pass --overwrite to '
                        'replace it')
    if not os.path.isdir(out) or (os.listdir(out) and
                                  not os.path.isfile(os.path.join(out, CARD_FILE))):
      raise ExportError(f'--out {out} is not an earlier export (no {CARD_FILE}); --overwrite '
                        'replaces only those: choose another folder')


def export(workdir: str, out: str, which: str = 'student', fmt: str = 'all',
           overwrite: bool = False, onnx_input: str = 'uint8') -> Dict[str, Any]:
  """Writes the export folder `out`; returns {files, parity, ...}."""
  from camkd_jax import inference  # pylint: disable=g-import-not-at-top
  formats = formats_of(fmt)
  if onnx_input not in ONNX_INPUTS:
    raise ExportError(f'--onnx_input {onnx_input!r}: choose one of {list(ONNX_INPUTS)}')
  _check_out(out, overwrite)
  for f in formats:
    _require(f)
  rm = inference.load_run_model(workdir, which)
  conv_blocks(rm)
  from camkd_jax.models import vgg  # pylint: disable=g-import-not-at-top
  if rm.input_size < vgg.MIN_INPUT_SIZE:
    raise ExportError(f'{rm.path}: the network runs on {rm.input_size} px, under the VGG\'s '
                      f'minimum of {vgg.MIN_INPUT_SIZE} px (no block5 map): not a usable model')
  out = os.path.abspath(out)
  tmp = f'{out}.tmp{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    with errors.disk_writes(out, 'the exported model'):
      files, parity = _write_formats(rm, tmp, formats, onnx_input)
      card = model_card(rm, which, workdir, files, parity, onnx_input)
      runs.atomic_write(os.path.join(tmp, CARD_FILE), lambda f: f.write(card))
      if os.path.exists(out):
        shutil.rmtree(out)
      os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {'out': out, 'files': files + [CARD_FILE], 'parity': parity, 'model': rm}


def _write_formats(rm, tmp: str, formats: List[str], onnx_input: str):
  tiles = parity_tiles(rm)
  want = jax_probabilities(rm, tiles)
  files, parity = [], {}
  if 'onnx' in formats:
    import onnx  # pylint: disable=g-import-not-at-top
    path = os.path.join(tmp, ONNX_FILE)
    onnx.save(onnx_model(rm, onnx_input), path)
    parity['ONNX (onnxruntime)'] = check_parity('ONNX', onnx_probabilities(path, tiles), want,
                                                rm.path)
    files.append(ONNX_FILE)
  if 'wsinfer' in formats:
    config = wsinfer_config(rm)
    path = os.path.join(tmp, TORCHSCRIPT_FILE)
    write_torchscript(rm, path)
    runs.atomic_write(os.path.join(tmp, WSINFER_CONFIG),
                        lambda f: f.write(json.dumps(config, indent=2) + '\n'))
    parity['TorchScript (torch.jit.load + the config\'s transforms)'] = check_parity(
        'TorchScript', torchscript_probabilities(path, config, tiles), want, rm.path)
    files += [WSINFER_CONFIG, TORCHSCRIPT_FILE]
  return files, parity


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A finished run (for a multi-seed run: RUN/seed_<n>).')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which model of the run.')
  flags.DEFINE_string('format', 'all', f'One of {list(FORMATS)}.')
  flags.DEFINE_string('out', None, 'Folder to write (must not exist unless --overwrite).')
  flags.DEFINE_string('onnx_input', 'uint8', 'Element type of the ONNX input: uint8, or float32 '
                      '(values 0..255).')
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier export in --out.')


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  fl = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's restore lines are not news here
  try:
    result = export(fl.workdir, fl.out, fl.model, fl.format, fl.overwrite, fl.onnx_input)
  except (errors.UserError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  rm = result['model']
  worst = max(result['parity'].values())
  print(f'wrote {", ".join(result["files"])} to {result["out"]}: {fl.model} at '
        f'{rm.magnification:g}x ({model_mpp(rm):g} um/px), {rm.tile_size} px tiles'
        + (f', view {rm.view}' if fl.model == 'student' else '') +
        f'; largest probability difference from JAX {worst:.1e}')


if __name__ == '__main__':
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  define_flags()
  _flags.mark_flags_as_required(['workdir', 'out'])
  _app.run(main)
