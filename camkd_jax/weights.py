"""Load torchvision-layout VGG16 weights (ImageNet) into the Flax parameters, without PyTorch.

The file is a `.safetensors` or `.npz` holding torchvision's `features.N.weight` (O, I, kH, kW) and
`features.N.bias` (O,) arrays. Convolution kernels are transposed OIHW -> HWIO. Only the
convolutional trunk is loaded: the reference replaces torchvision's classifier by a new
Linear(512, num_classes), so `classifier` keeps its fresh initialisation.

To produce the file on a machine that has PyTorch and torchvision (see README):

    import numpy as np, torchvision
    m = torchvision.models.vgg16(weights='IMAGENET1K_V1')
    np.savez('vgg16_imagenet.npz', **{k: v.numpy() for k, v in m.state_dict().items()
                                      if k.startswith('features.')})
"""
import logging
import os
from typing import Any, Dict, Mapping

import numpy as np


class WeightLoadError(ValueError):
  """A weight file does not match the model (missing key, wrong shape, unreadable file)."""


def read_weight_file(path: str) -> Dict[str, np.ndarray]:
  """{name: array} from a .npz or .safetensors file."""
  if not os.path.exists(path):
    raise WeightLoadError(f'weight file {path!r} does not exist (config.model.init_weights); '
                          'see the README section "Pretrained weights" to create it.')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in f.files}
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  raise WeightLoadError(f'weight file {path!r}: unknown format; use .npz or .safetensors')


def torchvision_to_flax(state: Mapping[str, np.ndarray], params: Mapping[str, Any],
                        path: str = '<weights>') -> Dict[str, Any]:
  """Returns a copy of `params` with every `features_N` conv replaced by torchvision's
  `features.N` arrays. Raises WeightLoadError naming the key and both shapes on a mismatch."""
  out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in params.items()}
  for name, leaf in params.items():
    if not name.startswith('features_'):
      continue
    idx = name.split('_', 1)[1]
    for tv_suffix, flax_key in (('weight', 'kernel'), ('bias', 'bias')):
      key = f'features.{idx}.{tv_suffix}'
      if key not in state:
        raise WeightLoadError(f'{path}: missing key {key!r} (needed for params[{name!r}]'
                              f'[{flax_key!r}] of shape {tuple(leaf[flax_key].shape)})')
      arr = np.asarray(state[key], np.float32)
      if tv_suffix == 'weight':
        if arr.ndim != 4:
          raise WeightLoadError(f'{path}: {key!r} has shape {arr.shape}; expected a 4-D OIHW '
                                f'kernel matching {tuple(leaf[flax_key].shape)} (HWIO)')
        arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      want = tuple(leaf[flax_key].shape)
      if arr.shape != want:
        got = arr.shape if tv_suffix == 'bias' else tuple(np.asarray(state[key]).shape)
        raise WeightLoadError(
            f'{path}: {key!r} has shape {got} but the model expects {want} '
            f'({"HWIO" if tv_suffix == "weight" else "O"}) for params[{name!r}][{flax_key!r}]; '
            'pretrained VGG16 weights need config.model.width = 1.0')
      out[name][flax_key] = arr
  return out


def load_pretrained(path: str, params, log=logging.info):
  """Params with the trunk from `path`; with an empty path, returns params unchanged and logs
  that the model starts from random initialisation."""
  if not path:
    log('No pretrained weights configured (config.model.init_weights): random initialisation.')
    return params
  state = read_weight_file(path)
  out = torchvision_to_flax(state, params, path)
  log(f'Loaded {sum(1 for k in params if k.startswith("features_"))} conv layers from {path}.')
  return out
