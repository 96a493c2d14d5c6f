"""Inference with a finished run: load an exported model and predict class probabilities of tiles.

  run_model = inference.load_run_model('workdirs/attn_kd_m2.5', which='student')
  predictor = inference.Predictor(run_model, batch_size=64)
  probs = predictor.predict(tiles)      # uint8 (N, t, t, 3) -> float32 (N, num_classes)

Tiles are given AT THE MODEL'S MAGNIFICATION, t = run_model.tile_size = image_size / factor pixels
(image_size: the training image size at the teacher's magnification; factor f = 10x / the model's
magnification; the teacher has f = 1). What the network then sees depends on the student's view:
  'upsampled'  the tile bilinearly upsampled (align_corners=True) by f to image_size, as the
               reference's students are trained (ops.student_view = avg-pool f, then this);
  'native'     the tile itself (a student trained on the f x f average-pooled image at its size).
With f = 1 (the teacher) both views are the tile itself.

Patches of the training data (at the teacher's magnification, image_size pixels) are predicted
with `Predictor(run_model, batch_size, full_resolution=True)`: the step then forms the model's
input from the full-resolution patch exactly as the run's evaluation does (ops.student_view:
average-pool by f in float, then the view), so its probabilities are those of the run's metrics.

The compiled step has one fixed batch shape: the last, partial batch is padded and its padding
dropped from the output, so any number of tiles, slide after slide, runs one program (no
recompiles). The step is sharded on the batch axis over a mesh of this process's devices: under
jax.distributed each process predicts its own tiles independently (no cross-process collective).

Needs only JAX (no TensorFlow).
"""
import dataclasses
import os
from collections import deque
from typing import Any, Dict, Iterable, Iterator, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from camkd_jax import checkpoints
from camkd_jax import distill
from camkd_jax import models
from camkd_jax import ops
from camkd_jax import runs
from camkd_jax import sharding

WHICH = ('student', 'teacher')


@dataclasses.dataclass(frozen=True)
class RunModel:
  """An exported model of a finished run and how to feed it.

  magnification is the model's (10x / factor for the default base); tile_size is the side of its
  input tile at that magnification, image_size / factor.
  """
  model: Any
  params: Any
  metadata: Dict[str, Any]
  class_names: Tuple[str, ...]
  image_size: int
  factor: int
  magnification: float
  view: str
  path: str

  @property
  def tile_size(self) -> int:
    return self.image_size // self.factor

  @property
  def input_size(self) -> int:
    """Side of the image the network itself runs on."""
    return self.image_size if self.view == 'upsampled' else self.tile_size


def _model_dir(workdir: str, which: str) -> str:
  """workdir/<which>, with errors that say why it is not there."""
  if which not in WHICH:
    raise ValueError(f'unknown model {which!r}; choose one of {list(WHICH)}')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'run directory {workdir} does not exist; pass the --workdir of a '
                            'finished training run')
  path = os.path.join(workdir, which)
  if runs.is_finished_model(path):
    return path
  seeds = runs.seed_dirs(workdir)
  if seeds and not os.path.exists(path):
    raise FileNotFoundError(
        f'{workdir} is a multi-seed run ({", ".join(map(os.path.basename, seeds))}): pass one '
        f'seed\'s directory, e.g. {seeds[0]}')
  cfg = runs.read_config(workdir)
  external = (cfg.get('teacher') or {}).get('checkpoint') or ''
  if which == 'teacher' and external:  # the run used a teacher trained elsewhere
    if runs.is_finished_model(external):
      return external
    raise FileNotFoundError(f'the teacher of {workdir} (config teacher.checkpoint) is '
                            f'{external}, which is not a finished export')
  if which == 'student' and cfg.get('method') == 'teacher':
    raise FileNotFoundError(f'{workdir} is a teacher-only run (config method "teacher"): it has '
                            'no student; use which="teacher" (--model teacher)')
  raise FileNotFoundError(
      f'no finished {which} in {path} (no {runs.METADATA}): the run has not finished; '
      'rerun the training command with the same --workdir to resume it')


def _view(metadata, config) -> str:
  report = metadata.get('report') or {}
  view = report.get('view') or (config.get('student') or {}).get('view') or 'upsampled'
  return ops.check_view(view)


def load_run_model(workdir: str, which: str = 'student') -> RunModel:
  """The exported `which` ('student' | 'teacher') model of the finished run in `workdir`.

  Reads workdir/<which>/ (checkpoints.save_model: params/ + metadata.json) and workdir/config.json
  (base magnification, student view). For a multi-seed run pass workdir/seed_<n>.
  """
  path = _model_dir(workdir, which)
  meta = runs.read_metadata(path)
  config = runs.read_config(workdir)
  base = float(config.get('base_magnification', 10.0))
  factor, view = 1, 'native'
  if which == 'student':
    report = meta.get('report') or {}
    if 'factor' not in report:
      raise ValueError(f'{path}/{runs.METADATA} has no report.factor: not a student export')
    factor, view = int(report['factor']), _view(meta, config)
  image_size = int(meta['image_size'])
  if image_size % factor:
    raise ValueError(f'{path}: image_size {image_size} is not divisible by the factor {factor}')
  m = meta['model']
  model = models.get_model(m['name'], int(meta['num_classes']), m['width'], m['dtype'],
                           m.get('input_mean') or None, m.get('input_std') or None)
  params = _restore_params(path, model, image_size)
  return RunModel(model, params, meta, tuple(meta['class_names']), image_size, factor,
                  base / factor, view, os.path.abspath(path))


def _restore_params(path: str, model, image_size: int):
  """Parameters on this process's first device (every process restores its own copy)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params, _ = checkpoints.load_model(path, distill.abstract_params(model, image_size, device))
  return params


# ----------------------------------------------------------------------------- the step
def model_input(tiles, factor: int, view: str, image_size: int):
  """uint8 tiles at the model's magnification -> the float [0, 1] images the network sees."""
  x = tiles.astype(jnp.float32) / 255.0
  if view == 'upsampled' and factor > 1:
    x = ops.resize_align_corners(x, (image_size, image_size))
  return x


def local_mesh():
  """A `data` mesh over this process's devices (slides are per process: no collectives)."""
  return sharding.make_mesh(jax.local_devices())


def make_predict_step(model, factor: int, view: str, image_size: int, mesh,
                      full_resolution: bool = False):
  """Jitted `predict_step(params, tiles_uint8 (B, t, t, 3)) -> probabilities (B, C) float32`,
  batch-sharded over `mesh`, params replicated. With full_resolution the input is (B, S, S, 3)
  patches at the teacher's magnification (S = image_size), seen as in the run's evaluation."""
  ops.check_view(view, 'view')

  def fn(params, tiles):
    if full_resolution:
      x = ops.student_view(tiles.astype(jnp.float32) / 255.0, factor, view)
    else:
      x = model_input(tiles, factor, view, image_size)
    logits, _ = model.apply({'params': params}, x)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


class Predictor:
  """Fixed-batch, sharded, pipelined class probabilities of uint8 tiles for one RunModel: tiles
  at the model's magnification (tile_size px), or with full_resolution patches at the teacher's
  (image_size px, as the training data)."""

  def __init__(self, run_model: RunModel, batch_size: int = 64, mesh=None,
               full_resolution: bool = False):
    self.run_model = run_model
    self.mesh = mesh or local_mesh()
    n = self.mesh.size
    self.batch_size = max(n, -(-int(batch_size) // n) * n)  # a multiple of the device count
    self.params = jax.device_put(run_model.params, sharding.replicated(self.mesh))
    self.step = make_predict_step(run_model.model, run_model.factor, run_model.view,
                                  run_model.image_size, self.mesh, full_resolution)
    t = run_model.image_size if full_resolution else run_model.tile_size
    self.tile_shape = (t, t, 3)
    self.where = 'the teacher\'s magnification' if full_resolution else 'the model magnification'

  def submit(self, tiles: np.ndarray) -> Tuple[Any, int]:
    """Starts one batch (<= batch_size tiles) on the device without waiting for it; returns a
    pending result for `fetch`."""
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.shape[1:] != self.tile_shape:
      raise ValueError(f'tiles must be uint8 of shape (N, {", ".join(map(str, self.tile_shape))})'
                       f' at {self.where}; got {tiles.dtype} '
                       f'{tiles.shape}')
    n = len(tiles)
    if n > self.batch_size:
      raise ValueError(f'{n} tiles exceed the batch size {self.batch_size}')
    if n < self.batch_size:  # the padding rows are computed and dropped
      tiles = np.concatenate([tiles, np.zeros((self.batch_size - n,) + self.tile_shape,
                                              np.uint8)])
    x = jax.device_put(tiles, sharding.batch_sharding(self.mesh))
    return self.step(self.params, x), n

  def predict_batches(self, batches: Iterable[np.ndarray], depth: int = 2
                      ) -> Iterator[np.ndarray]:
    """Probabilities of each batch (<= batch_size tiles), in order. Up to `depth` batches are in
    flight, so the host reads the next tiles while the device computes."""
    inflight = deque()
    for tiles in batches:
      inflight.append(self.submit(tiles))
      if len(inflight) > depth:
        yield fetch(inflight.popleft())
    while inflight:
      yield fetch(inflight.popleft())

  def predict(self, tiles: np.ndarray) -> np.ndarray:
    """(N, C) float32 probabilities of N uint8 tiles (any N, including 0)."""
    tiles = np.asarray(tiles)
    chunks = (tiles[i:i + self.batch_size] for i in range(0, len(tiles), self.batch_size))
    out = list(self.predict_batches(chunks))
    if not out:
      return np.zeros((0, len(self.run_model.class_names)), np.float32)
    return np.concatenate(out)

  def compiled_programs(self) -> int:
    """How many programs the step has compiled (1 after any number of full/partial batches)."""
    return self.step._cache_size()  # pylint: disable=protected-access


def fetch(pending: Tuple[Any, int]) -> np.ndarray:
  """(n, C) probabilities of a submitted batch (waits for the device), padding rows dropped."""
  result, n = pending
  return np.asarray(jax.device_get(result))[:n]
