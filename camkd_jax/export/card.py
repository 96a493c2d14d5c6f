"""model_card.md: what the exported model is, its metrics, the preprocessing baked in, the files
and the parity measured when they were written."""
import datetime
import os
from typing import Any, Dict, List

from camkd_jax.export.model import (BASE_MPP, ONNX_FILE, ONNX_OPSET, PARITY_ATOL, PARITY_TILES,
                                    TORCHSCRIPT_FILE, WSINFER_CONFIG, architecture, model_mpp,
                                    standardisation, upsampled)


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
