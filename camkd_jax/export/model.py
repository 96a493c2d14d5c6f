"""What an exported model is: the folder's file names and limits, the export's errors, and the
facts of a loaded run model every format writes (pixel size, standardisation, view, VGG layout,
torchvision state, the description stored in the ONNX metadata and the card). No onnx / torch."""
from typing import Any, Dict, List

import numpy as np

from camkd_jax import errors

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


def require(fmt: str):
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
