"""A small whole-slide image that needs no download: Aperio-SVS-like pyramidal TIFF + ground truth.

  truth = slide_testdata.write_slide('demo.svs', patch_size=32, classes=((0, 1), (2, 3)))

The content is drawn at 10x (1 um/px, the magnification the models are trained at) from the
synthetic histology generator (camkd_jax/datasets/synthetic_histology.py): rectangular regions,
one class each, made of a grid of patch_size x patch_size patches (the corner cells of each region
left out, so its outline is not a plain square), on a white background. At
`magnification` = 10 * s (s = 1, 2, 4) every 10x pixel becomes an s x s block, so an area
(box) downsample by s gives back the 10x pixels exactly.

The file follows what OpenSlide's Aperio reader looks for: a TIFF whose first ImageDescription
starts with 'Aperio Image Library' and carries '|AppMag = M|MPP = u'; tiled pages for the pyramid
levels (downsamples 1, 4, 16 by default, each level the area average of level 0) and a small
stripped thumbnail page after level 0. `metadata=False` writes the same pixels with a plain
description, which OpenSlide opens as a generic tiled TIFF without magnification or MPP.

A slide of a chosen composition (`composition_layout`, `--composition NC=20,G3=48,G4=32`):
exactly that many patch cells of each class, shuffled (seeded) inside one block, so its tumour is
e.g. 60 % G3 and 40 % G4 and its Gleason score is known (3+4=7, grade group 2).

The ground truth (`SlideTruth`) is the class of every 10x pixel (255 = background), also written
as <slide>_labels.png, and the class of every cell of the patch grid (-1 = background).

Patches are drawn with np.random.default_rng([seed, 7, row, column]): streams that are not the
ones of the TFDS dataset's examples ([seed, split, index]), so the slide holds unseen patches.
"""
import dataclasses
import os
from typing import Sequence, Tuple

import numpy as np
import PIL.Image

from camkd_jax import parsing

BACKGROUND = 255
CLASS_NAMES = ('NC', 'G3', 'G4', 'G5')   # the synthetic histology classes 0..3
WHITE = np.array([243, 241, 245])


@dataclasses.dataclass(frozen=True)
class SlideTruth:
  labels: np.ndarray          # (H, W) uint8 at 10x: class index, 255 = background
  cells: np.ndarray           # (rows, cols) int: class of each patch cell, -1 = background
  patch_size: int             # cell side at 10x
  magnification: float        # of level 0
  mpp: float                  # um per level-0 pixel
  downsamples: Tuple[int, ...]
  path: str


def region_cells(k: int) -> np.ndarray:
  """(k, k) bool: a k x k block of cells without its four corner cells (k >= 3)."""
  m = np.ones((k, k), bool)
  if k >= 3:
    m[0, 0] = m[0, -1] = m[-1, 0] = m[-1, -1] = False
  return m


def cell_layout(classes: Sequence[Sequence[int]], cells: int, gap: int) -> np.ndarray:
  """Class of every grid cell (-1 = background) for regions laid out as `classes` (rows of
  class indices; -1 leaves a region out), `cells` x `cells` each, `gap` cells apart."""
  rows, cols = len(classes), max(len(r) for r in classes)
  out = np.full((gap + rows * (cells + gap), gap + cols * (cells + gap)), -1, int)
  shape = region_cells(cells)
  for i, row in enumerate(classes):
    for j, c in enumerate(row):
      if c < 0:
        continue
      y, x = gap + i * (cells + gap), gap + j * (cells + gap)
      out[y:y + cells, x:x + cells][shape] = c
  return out


def composition_layout(counts: Sequence[int], width: int = 0, gap: int = 1,
                       seed: int = 0) -> np.ndarray:
  """Cell layout with exactly counts[k] cells of class k, shuffled (seeded) in one block of
  `width` cells per row (0: about square) filled row by row, `gap` background cells around."""
  labels = np.repeat(np.arange(len(counts)), np.asarray(counts, int))
  n = len(labels)
  if n == 0 or min(counts) < 0:
    raise ValueError(f'a composition needs cell counts >= 0 and at least one cell; got {counts}')
  width = width or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / width))
  block = np.full(rows * width, -1, int)
  block[:n] = np.random.default_rng([seed, 11]).permutation(labels)
  out = np.full((rows + 2 * gap, width + 2 * gap), -1, int)
  out[gap:gap + rows, gap:gap + width] = block.reshape(rows, width)
  return out


def parse_composition(text: str) -> list:
  """'NC=20,G3=48,G4=32' -> cell counts per class [20, 48, 32, 0]."""
  counts = [0] * len(CLASS_NAMES)
  for item in parsing.split_list(text):
    name, _, n = item.partition('=')
    if name.strip() not in CLASS_NAMES or not n.strip().isdigit():
      raise ValueError(f'composition {text!r}: {item!r} is not CLASS=CELLS with CLASS in '
                       f'{list(CLASS_NAMES)}')
    counts[CLASS_NAMES.index(name.strip())] = int(n)
  return counts


def render_content(cells: np.ndarray, patch_size: int, seed: int = 0):
  """(image uint8 (H, W, 3), labels uint8 (H, W)) at 10x for a cell layout."""
  from camkd_jax.datasets import synthetic_histology  # pylint: disable=g-import-not-at-top
  p = patch_size
  h, w = cells.shape[0] * p, cells.shape[1] * p
  noise = np.random.default_rng([seed, 8]).normal(0, 1.5, (h, w, 3))
  image = np.clip(np.round(WHITE + noise), 0, 255).astype(np.uint8)
  labels = np.full((h, w), BACKGROUND, np.uint8)
  for r, c in zip(*np.nonzero(cells >= 0)):
    label = int(cells[r, c])
    rng = np.random.default_rng([seed, 7, int(r), int(c)])
    image[r * p:(r + 1) * p, c * p:(c + 1) * p] = synthetic_histology.render_patch(rng, label, p)
    labels[r * p:(r + 1) * p, c * p:(c + 1) * p] = label
  return image, labels


def area_downsample(image: np.ndarray, d: int) -> np.ndarray:
  """Mean over d x d blocks (the part of the image that fills whole blocks), rounded."""
  if d == 1:
    return image
  h, w = image.shape[0] // d, image.shape[1] // d
  x = image[:h * d, :w * d].reshape(h, d, w, d, -1).astype(np.float64).mean(axis=(1, 3))
  return np.round(x).astype(np.uint8)


def aperio_description(width, height, tile, magnification, mpp, level_size=None) -> str:
  """The ImageDescription of an Aperio page (what OpenSlide parses: 'Aperio' + '|key = value')."""
  head = f'Aperio Image Library v12.0.15 \n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})'
  if level_size is not None:
    head += f' -> {level_size[0]}x{level_size[1]}'
  return f'{head} RAW|AppMag = {magnification:g}|MPP = {mpp:g}|Filename = camkd_synthetic'


def write_pyramid(path: str, level0: np.ndarray, downsamples=(1, 4, 16), tile: int = 128,
                  magnification=10.0, mpp=1.0, metadata: bool = True):
  """Writes level0 (H, W, 3) uint8 and its area-downsampled levels as a tiled, Aperio-like TIFF."""
  import tifffile  # pylint: disable=g-import-not-at-top
  if tile % 16:
    raise ValueError(f'TIFF tiles must be a multiple of 16 pixels; got {tile}')
  height, width = level0.shape[:2]

  def description(level_size=None):
    if not metadata:
      return 'camkd_jax synthetic slide (no magnification metadata)'
    return aperio_description(width, height, tile, magnification, mpp, level_size)

  with tifffile.TiffWriter(path) as tif:
    for i, d in enumerate(downsamples):
      image = area_downsample(level0, d)
      size = (image.shape[1], image.shape[0]) if d > 1 else None
      tif.write(image, tile=(tile, tile), photometric='rgb', compression='zlib',
                description=description(size), metadata=None)
      if i == 0:  # Aperio's thumbnail: a small stripped page right after the base level
        thumb = PIL.Image.fromarray(level0)
        thumb.thumbnail((256, 256), PIL.Image.BOX)
        tif.write(np.asarray(thumb), photometric='rgb', compression='zlib',
                  description=description((thumb.width, thumb.height)), metadata=None)


def write_slide(path: str, patch_size: int = 32, classes=((0, 1), (2, 3)), cells: int = 5,
                gap: int = 2, magnification: float = 10.0, downsamples=(1, 4, 16),
                tile: int = 128, seed: int = 0, metadata: bool = True,
                layout: np.ndarray = None) -> SlideTruth:
  """Writes the slide at `path` and its label map at <path stem>_labels.png; returns the truth.
  `layout` (a cell layout, e.g. composition_layout(...)) replaces classes / cells / gap."""
  scale = magnification / 10.0
  s = int(round(scale))
  if s < 1 or abs(scale - s) > 1e-9:
    raise ValueError(f'magnification must be 10x times a whole number (10, 20, 40); got '
                     f'{magnification}')
  if layout is None:
    layout = cell_layout(classes, cells, gap)
  image, labels = render_content(layout, patch_size, seed)
  level0 = np.repeat(np.repeat(image, s, axis=0), s, axis=1) if s > 1 else image
  mpp = 10.0 / magnification
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_pyramid(path, level0, tuple(downsamples), tile, magnification, mpp, metadata)
  PIL.Image.fromarray(labels).save(os.path.splitext(path)[0] + '_labels.png')
  return SlideTruth(labels, layout, patch_size, float(magnification), mpp, tuple(downsamples),
                    os.path.abspath(path))


def main(argv=None):
  """python -m camkd_jax.slide_testdata OUT.svs [--patch_size 64] [--magnification 20] ..."""
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description='Writes a synthetic Aperio-like slide and its labels.')
  p.add_argument('path')
  p.add_argument('--patch_size', type=int, default=64, help='patch side at 10x (the training '
                 'image size of the model you will run: 64 for the synthetic default)')
  p.add_argument('--magnification', type=float, default=10.0, help='of level 0: 10, 20, 40')
  p.add_argument('--regions', type=int, default=2, help='regions per side (classes cycle)')
  p.add_argument('--cells', type=int, default=5, help='patches per side of a region')
  p.add_argument('--composition', default='', help='cells per class instead of regions, e.g. '
                 'NC=20,G3=48,G4=32 (tumour 60 %% G3, 40 %% G4), shuffled in one block')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no_metadata', action='store_true', help='omit AppMag / MPP')
  a = p.parse_args(argv)
  classes = [[(r * a.regions + c) % 4 for c in range(a.regions)] for r in range(a.regions)]
  try:
    layout = (composition_layout(parse_composition(a.composition), seed=a.seed)
              if a.composition else None)
  except ValueError as e:
    p.error(str(e))
  truth = write_slide(a.path, a.patch_size, classes, a.cells, magnification=a.magnification,
                      seed=a.seed, metadata=not a.no_metadata, layout=layout)
  print(f'{a.path}: {truth.labels.shape[1] * int(a.magnification // 10)} x '
        f'{truth.labels.shape[0] * int(a.magnification // 10)} px at {a.magnification:g}x, '
        f'{int((truth.cells >= 0).sum())} tissue patches; labels in '
        f'{os.path.splitext(a.path)[0]}_labels.png')


if __name__ == '__main__':
  main()
