"""Whole-slide images: magnification, pyramid level, tissue mask, tile grid and tile reading.

Geometry. A model was trained at magnification M (10x for the teacher, 10x / f for a student) on
tiles of t pixels (inference.RunModel.tile_size). A slide whose level 0 is at magnification S has
s0 = S / M level-0 pixels per model pixel. Its tiles form a grid in model pixels, origin (0, 0),
step `stride`; tile (row, col) covers level-0 pixels [col * stride * s0, ... + t * s0) in x (the
same in y). Each tile is read at the pyramid level with the LARGEST downsample d whose
magnification S / d is still >= M (fewest pixels to read without upsampling), as a region of
t * scale level pixels, scale = S / d / M >= 1, and area-averaged (PIL BOX over the exact,
possibly fractional region) to t x t. Levels within 1 % of M count as M (scanners store
downsamples like 4.0003).

Magnification comes from, first match wins: the caller's override (--slide_magnification, or
--mpp as 10 / mpp), OpenSlide's 'openslide.objective-power' (nominal, what "10x" training data
means), 'openslide.mpp-x' (10x ~ 1 um/px, so S = 10 / mpp). A slide with none is refused.

Tissue: Otsu's threshold on the HSV saturation of a thumbnail (scikit-image; at least
`min_saturation`, so a blank slide yields no tissue), and a tile is kept when at least
`tissue_fraction` of its thumbnail footprint is tissue.
"""
import dataclasses
import math
import os
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import PIL.Image

MAG_TOLERANCE = 0.01
THUMB_PIXELS_PER_TILE = 8      # thumbnail pixels across one tile footprint
MAX_THUMBNAIL = 4096
TISSUE_FRACTION = 0.5          # tissue share of a tile's footprint for the tile to be predicted
MIN_SATURATION = 0.05          # lower bound of the Otsu saturation threshold


class SlideError(Exception):
  """A slide that cannot be processed; the message names the slide and what to do."""


def _openslide():
  try:
    import openslide  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('whole-slide inference needs OpenSlide: pip install '
                      '"camkd_jax[slides]" (openslide-python, openslide-bin)') from e
  return openslide


def open_slide(path: str):
  """An OpenSlide handle, or SlideError naming the file."""
  openslide = _openslide()
  if not os.path.isfile(path):
    raise SlideError(f'{path}: no such file')
  try:
    return openslide.OpenSlide(path)
  except openslide.OpenSlideUnsupportedFormatError:
    raise SlideError(f'{path}: not a slide format OpenSlide can read (corrupt, or not a '
                     'whole-slide image)') from None
  except openslide.OpenSlideError as e:
    raise SlideError(f'{path}: OpenSlide cannot open it: {e}') from None


def _positive_float(props, key) -> Optional[float]:
  try:
    v = float(props.get(key))
  except (TypeError, ValueError):
    return None
  return v if v > 0 and math.isfinite(v) else None


def slide_magnification(props, path: str, magnification: Optional[float] = None,
                        mpp: Optional[float] = None) -> Tuple[float, Optional[float], str]:
  """(level-0 magnification, um per pixel or None, where it came from)."""
  meta_mpp = _positive_float(props, 'openslide.mpp-x')
  if magnification:
    return float(magnification), mpp or meta_mpp, '--slide_magnification'
  if mpp:
    return 10.0 / float(mpp), float(mpp), '--mpp'
  power = _positive_float(props, 'openslide.objective-power')
  if power:
    return power, meta_mpp, 'openslide.objective-power'
  if meta_mpp:
    return 10.0 / meta_mpp, meta_mpp, 'openslide.mpp-x'
  raise SlideError(f'{path}: no magnification metadata (neither openslide.objective-power nor '
                   'openslide.mpp-x); pass --slide_magnification (e.g. 20) or --mpp (e.g. 0.5) '
                   'if you know it')


def choose_level(downsamples, slide_mag: float, model_mag: float) -> Tuple[int, float]:
  """(level, scale): the level with the largest downsample still at or above model_mag, and
  scale = its magnification / model_mag (level pixels per model pixel, >= 1)."""
  if slide_mag < model_mag * (1 - MAG_TOLERANCE):
    raise ValueError(f'the slide is at {slide_mag:g}x, below the model\'s {model_mag:g}x')
  best = None
  for level, d in enumerate(downsamples):
    level_mag = slide_mag / float(d)
    if level_mag >= model_mag * (1 - MAG_TOLERANCE) and (best is None or d > downsamples[best]):
      best = level
  scale = slide_mag / float(downsamples[best]) / model_mag
  return best, 1.0 if abs(scale - 1) < MAG_TOLERANCE else scale


# ----------------------------------------------------------------------------- tissue
def tissue_mask(thumb_rgb: np.ndarray,
                min_saturation: float = MIN_SATURATION) -> Tuple[np.ndarray, float]:
  """(bool mask, threshold): HSV saturation above max(Otsu, min_saturation)."""
  from skimage import color, filters  # pylint: disable=g-import-not-at-top
  sat = color.rgb2hsv(thumb_rgb[..., :3])[..., 1]
  threshold = min_saturation
  if sat.max() - sat.min() > 1e-3:
    threshold = max(float(filters.threshold_otsu(sat)), min_saturation)
  return sat > threshold, threshold


def box_fractions(mask: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
  """Mean of `mask` over each box [y0, y1) x [x0, x1) (integer arrays, clipped to the mask)."""
  h, w = mask.shape
  integral = np.zeros((h + 1, w + 1))
  integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
  y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
  x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
  total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
  area = np.maximum((y1 - y0) * (x1 - x0), 1)
  return total / area


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class SlidePlan:
  """Everything needed to read one slide's tissue tiles at the model magnification."""
  path: str
  properties: Dict[str, str]
  dimensions: Tuple[int, int]       # level 0 (width, height)
  magnification: float              # level 0
  mpp: Optional[float]
  magnification_source: str
  model_magnification: float
  level: int
  level_downsample: float
  scale: float                      # level pixels per model pixel
  tile: int                         # model pixels
  stride: int                       # model pixels
  grid_shape: Tuple[int, int]       # rows, cols of the whole grid
  grid: np.ndarray                  # (N, 2) row, col of the tissue tiles
  tissue: np.ndarray                # (N,) tissue fraction of each kept tile
  thumbnail: np.ndarray             # (h, w, 3) uint8
  mask: np.ndarray                  # (h, w) bool
  threshold: float

  @property
  def s0(self) -> float:
    """Level-0 pixels per model pixel."""
    return self.magnification / self.model_magnification

  @property
  def read_size(self) -> int:
    return int(math.ceil(self.tile * self.scale - 1e-6))

  @property
  def origins(self) -> np.ndarray:
    """(N, 2) level-0 (x, y) of each tile's top-left corner."""
    return np.round(self.grid[:, ::-1] * self.stride * self.s0).astype(np.int64)

  @property
  def thumb_downsample(self) -> Tuple[float, float]:
    """Level-0 pixels per thumbnail pixel (x, y)."""
    return (self.dimensions[0] / self.mask.shape[1], self.dimensions[1] / self.mask.shape[0])

  def tissue_area_mm2(self) -> Optional[float]:
    if not self.mpp:
      return None
    dx, dy = self.thumb_downsample
    return float(self.mask.sum() * dx * dy * self.mpp ** 2 / 1e6)


def plan_slide(path: str, model_mag: float, tile: int, stride: int,
               magnification: Optional[float] = None, mpp: Optional[float] = None,
               tissue_fraction: float = TISSUE_FRACTION,
               min_saturation: float = MIN_SATURATION) -> SlidePlan:
  """Opens `path`, picks the level and finds the tissue tiles (SlideError on any problem)."""
  slide = open_slide(path)
  try:
    props = dict(slide.properties)
    mag, um, source = slide_magnification(props, path, magnification, mpp)
    try:
      level, scale = choose_level(slide.level_downsamples, mag, model_mag)
    except ValueError as e:
      raise SlideError(f'{path}: {e} (from {source}); a model at {model_mag:g}x needs a slide '
                       f'scanned at {model_mag:g}x or more') from None
    width, height = slide.dimensions
    s0 = mag / model_mag
    rows = max(0, int(math.ceil((height / s0 - tile) / stride)) + 1)
    cols = max(0, int(math.ceil((width / s0 - tile) / stride)) + 1)
    thumb = _thumbnail(slide, tile * s0)
    downsample = float(slide.level_downsamples[level])
  except Exception as e:  # pylint: disable=broad-except
    slide.close()
    if isinstance(e, SlideError):
      raise
    raise SlideError(f'{path}: cannot read it: {type(e).__name__}: {e}') from None
  slide.close()
  mask, threshold = tissue_mask(thumb, min_saturation)
  rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  grid = np.stack([rr.ravel(), cc.ravel()], 1)
  fractions = _tile_fractions(mask, grid, (width, height), tile * s0, stride * s0)
  keep = fractions >= tissue_fraction
  return SlidePlan(path, props, (width, height), mag, um, source, model_mag, level,
                   downsample, scale, tile, stride, (rows, cols),
                   grid[keep], fractions[keep], thumb, mask, threshold)


def _thumbnail(slide, footprint: float) -> np.ndarray:
  """RGB thumbnail with about THUMB_PIXELS_PER_TILE pixels across a tile footprint."""
  width, height = slide.dimensions
  d = max(1.0, footprint / THUMB_PIXELS_PER_TILE, max(width, height) / MAX_THUMBNAIL)
  size = (max(1, int(round(width / d))), max(1, int(round(height / d))))
  return np.asarray(slide.get_thumbnail(size).convert('RGB'))


def _tile_fractions(mask, grid, dims, footprint, step) -> np.ndarray:
  """Tissue fraction of each grid tile's footprint on the thumbnail mask."""
  dx, dy = dims[0] / mask.shape[1], dims[1] / mask.shape[0]
  x0, y0 = grid[:, 1] * step, grid[:, 0] * step
  ix0, iy0 = np.round(x0 / dx).astype(int), np.round(y0 / dy).astype(int)
  ix1 = np.maximum(ix0 + 1, np.round((x0 + footprint) / dx).astype(int))
  iy1 = np.maximum(iy0 + 1, np.round((y0 + footprint) / dy).astype(int))
  return box_fractions(mask, iy0, ix0, iy1, ix1)


# ----------------------------------------------------------------------------- reading
def read_tile(slide, plan: SlidePlan, x0: int, y0: int) -> np.ndarray:
  """(tile, tile, 3) uint8 at the model magnification; outside the slide is white."""
  size = plan.read_size
  region = slide.read_region((int(x0), int(y0)), plan.level, (size, size))
  rgba = np.asarray(region, np.float32)
  alpha = rgba[..., 3:] / 255.0
  rgb = np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
  if size == plan.tile and plan.scale == 1.0:
    return rgb
  exact = plan.tile * plan.scale
  out = PIL.Image.fromarray(rgb).resize((plan.tile, plan.tile), PIL.Image.BOX,
                                        box=(0, 0, exact, exact))
  return np.asarray(out)


class TileReader:
  """Reads batches of tiles on a pool of threads, one OpenSlide handle per thread and slide."""

  def __init__(self, threads: int = 4):
    from concurrent import futures  # pylint: disable=g-import-not-at-top
    self.pool = futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix='slide-reader')
    self.local = threading.local()

  def _handle(self, path: str):
    cache = getattr(self.local, 'slides', None)
    if cache is None:
      cache = self.local.slides = {}
    if path not in cache:
      for old in list(cache)[:-1]:  # keep at most two slides open per thread
        cache.pop(old).close()
      cache[path] = open_slide(path)
    return cache[path]

  def _drop(self, path: str):
    slide = getattr(self.local, 'slides', {}).pop(path, None)
    if slide is not None:
      slide.close()

  def read(self, plan: SlidePlan, index: np.ndarray) -> np.ndarray:
    """(len(index), t, t, 3) uint8 tiles of plan.grid[index]; SlideError naming the slide."""
    try:
      slide = self._handle(plan.path)
      origins = plan.origins[index]
      return np.stack([read_tile(slide, plan, x, y) for x, y in origins])
    except SlideError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      self._drop(plan.path)
      raise SlideError(f'{plan.path}: reading tiles failed: {type(e).__name__}: {e}') from None

  def submit(self, plan: SlidePlan, index: np.ndarray):
    return self.pool.submit(self.read, plan, index)

  def close(self):
    self.pool.shutdown(wait=True)
