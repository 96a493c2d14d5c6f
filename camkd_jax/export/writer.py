"""Writing the export folder: every format run on the same random tiles as the JAX model and
refused beyond PARITY_ATOL (`check_parity`), then the card; the folder is written under a
temporary name and renamed, so an --out is complete or absent."""
import dataclasses
import json
import os
import shutil
from typing import Any, Dict, List

import numpy as np

from camkd_jax import errors
from camkd_jax import runs
from camkd_jax.export.card import model_card
from camkd_jax.export.model import (CARD_FILE, ONNX_FILE, ONNX_INPUTS, PARITY_ATOL, PARITY_TILES,
                                    TORCHSCRIPT_FILE, WSINFER_CONFIG, ExportError, conv_blocks,
                                    formats_of, require)
from camkd_jax.export.onnx_graph import onnx_model, onnx_probabilities
from camkd_jax.export.wsinfer import torchscript_probabilities, wsinfer_config, write_torchscript


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
    require(f)
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
