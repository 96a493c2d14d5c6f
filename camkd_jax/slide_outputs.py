"""What the slide command writes per slide and per cohort (camkd_jax.slide runs the slides).

Per slide, in OUT/<slide>/:
  tiles.csv        one row per tissue tile (level-0 box, level read, grid cell, tissue fraction,
                   class probabilities, prediction);
  tiles.geojson    the same tiles as QuPath objects: a FeatureCollection of closed Polygons in
                   level-0 pixels (origin top left), objectType 'tile', classification {name,
                   color [r, g, b]}, measurements {prob_<class>, tissue};
  regions.geojson  per predicted class the union of its tiles (shapely) as (Multi)Polygon
                   annotations, with area measurements (um^2 when the MPP is known);
  heatmap.png, overlay.png  the pictures (camkd_jax/slide_plots.py);
  summary.json     the slide, the model, the level and grid read, tissue, class shares, timing
                   and the Gleason score when the classes are Gleason patterns (camkd_jax/gleason.py).
Per cohort, OUT/slides.csv: one row per slide, rewritten atomically as each slide finishes.

Tile boxes are integer level-0 pixels on the exact grid: tile (row, col) spans
[round(col * stride * s0), round((col * stride + tile) * s0)) in x (the same in y), so tiles
side by side (stride = tile) share their edges exactly: no slivers or gaps between them.
"""
import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import numpy as np

from camkd_jax import errors
from camkd_jax import gleason
from camkd_jax import runs
from camkd_jax import slide_plots

CLASS_COLOURS = slide_plots.CLASS_COLOURS


def class_rgb(i: int) -> List[int]:
  """[r, g, b] integers of class i's overlay colour (QuPath needs the colour as an array)."""
  h = CLASS_COLOURS[i % len(CLASS_COLOURS)].lstrip('#')
  return [int(h[k:k + 2], 16) for k in (0, 2, 4)]


def write_json(path, obj, indent=2):
  runs.atomic_write(path, lambda f: (json.dump(obj, f, indent=indent), f.write('\n')))


# ----------------------------------------------------------------------------- tiles
def tile_boxes(plan) -> np.ndarray:
  """(N, 4) int64 level-0 boxes x0, y0, x1, y1 (x1, y1 exclusive) of the plan's tissue tiles."""
  if not len(plan.grid):
    return np.zeros((0, 4), np.int64)
  s0, step, t = plan.s0, plan.stride, plan.tile
  r, c = plan.grid[:, 0].astype(np.float64), plan.grid[:, 1].astype(np.float64)
  x0, y0 = np.round(c * step * s0), np.round(r * step * s0)
  x1, y1 = np.round((c * step + t) * s0), np.round((r * step + t) * s0)
  return np.stack([x0, y0, x1, y1], 1).astype(np.int64)


def write_tiles_csv(path, plan, probs, class_names):
  boxes = tile_boxes(plan)
  d = plan.level_downsample
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(['x', 'y', 'width', 'height', 'level', 'level_x', 'level_y', 'level_size', 'row',
              'col', 'tissue'] + [f'prob_{c}' for c in class_names] + ['prediction'])
  pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
  for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
    w.writerow([x0, y0, x1 - x0, y1 - y0, plan.level, int(round(x0 / d)), int(round(y0 / d)),
                plan.read_size, int(plan.grid[i, 0]), int(plan.grid[i, 1]),
                f'{plan.tissue[i]:.3f}'] + [f'{p:.6f}' for p in probs[i]]
               + [class_names[int(pred[i])]])
  runs.atomic_write(path, lambda f: f.write(buf.getvalue()), mode='w')


def _geojson_text(features) -> str:
  return json.dumps({'type': 'FeatureCollection', 'features': features},
                    separators=(',', ':'))


def _write_text(path, text):
  if path.endswith('.gz'):
    import gzip  # pylint: disable=g-import-not-at-top
    data = gzip.compress(text.encode(), compresslevel=6, mtime=0)
    runs.atomic_write(path, lambda f: f.write(data), mode='wb')
  else:
    runs.atomic_write(path, lambda f: f.write(text))


_TILE = ('{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[%d,%d],[%d,%d],[%d,%d],'
         '[%d,%d],[%d,%d]]]},"properties":{"objectType":"tile","classification":%s,'
         '"measurements":{')


def tiles_geojson_text(plan, probs, class_names) -> str:
  """The FeatureCollection of one QuPath 'tile' per tissue tile, as compact JSON text.

  Each feature is written from a fixed template (what json.dumps would write for the same
  dicts, checked in the tests): 1.5 s for 100k tiles against 4.7 s through dicts."""
  boxes = tile_boxes(plan).tolist()
  pred = (probs.argmax(1) if len(probs) else np.zeros(0, int)).tolist()
  p4 = np.round(np.asarray(probs, np.float64), 4).tolist()
  tissue = np.round(np.asarray(plan.tissue, np.float64), 3).tolist()
  classes = [json.dumps({'name': n, 'color': class_rgb(i)}, separators=(',', ':'))
             for i, n in enumerate(class_names)]
  measurements = ','.join(f'{json.dumps(f"prob_{c}")}:%r' for c in class_names)
  measurements += ',"tissue":%r}}}'
  parts = [_TILE % (x0, y0, x1, y0, x1, y1, x0, y1, x0, y0, classes[k]) + measurements % (*p, t)
           for (x0, y0, x1, y1), k, p, t in zip(boxes, pred, p4, tissue)]
  return '{"type":"FeatureCollection","features":[' + ','.join(parts) + ']}'


def write_tiles_geojson(path, plan, probs, class_names):
  _write_text(path, tiles_geojson_text(plan, probs, class_names))


# ----------------------------------------------------------------------------- regions
def class_regions(plan, pred: np.ndarray, num_classes: int) -> List:
  """Per class, the union of its tiles as a shapely geometry (None for a class without tiles).

  Tiles of one class in one grid row that follow each other are merged into one rectangle first
  (vectorised), then shapely's unary_union unites the rectangles (valid geometry; 0.3 s for the
  four classes of a 100k-tile slide, against 5 s for the tiles one by one, and
  coverage_union_all is no faster once its corner-touching rings are made valid)."""
  import shapely  # pylint: disable=g-import-not-at-top
  boxes = tile_boxes(plan)
  grid = np.asarray(plan.grid, np.int64)
  out = []
  for k in range(num_classes):
    idx = np.flatnonzero(pred == k)
    if not len(idx):
      out.append(None)
      continue
    idx = idx[np.lexsort((grid[idx, 1], grid[idx, 0]))]
    r, c = grid[idx, 0], grid[idx, 1]
    start = np.ones(len(idx), bool)
    start[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1] + 1)
    first = np.flatnonzero(start)
    last = np.append(first[1:], len(idx)) - 1
    b = boxes[idx]
    rects = shapely.box(b[first, 0], b[first, 1], b[last, 2], b[last, 3])
    out.append(shapely.normalize(shapely.unary_union(rects)))
  return out


def region_features(plan, probs, class_names, mpp: Optional[float] = None,
                    patterns: Optional[Sequence] = None) -> List[Dict]:
  """One QuPath annotation per predicted class: the union of its tiles, with measurements."""
  from shapely import geometry  # pylint: disable=g-import-not-at-top
  pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
  regions = class_regions(plan, pred, len(class_names))
  counts = np.bincount(pred, minlength=len(class_names))
  out = []
  for k, (name, geom) in enumerate(zip(class_names, regions)):
    if geom is None:
      continue
    m = {'Tiles': int(counts[k]), 'Percent of tiles': round(100.0 * counts[k] / len(pred), 4),
         'Area px^2': float(geom.area)}
    if mpp:
      m['Area um^2'] = float(geom.area * mpp * mpp)
      m['Area mm^2'] = float(geom.area * mpp * mpp / 1e6)
    if patterns is not None and patterns[k] is not None:
      m['Gleason pattern'] = int(patterns[k])
    out.append({'type': 'Feature', 'geometry': geometry.mapping(geom),
                'properties': {'objectType': 'annotation', 'name': name,
                               'classification': {'name': name, 'color': class_rgb(k)},
                               'isLocked': True, 'measurements': m}})
  return out


def write_regions_geojson(path, plan, probs, class_names, mpp=None, patterns=None):
  _write_text(path, _geojson_text(region_features(plan, probs, class_names, mpp, patterns)))


# ----------------------------------------------------------------------------- cohort table
PATTERN_COLUMNS = ['pattern3_percent', 'pattern4_percent', 'pattern5_percent']
COHORT_COLUMNS = (['slide', 'status', 'error', 'tissue_mm2', 'tumour_percent'] + PATTERN_COLUMNS
                  + ['primary', 'secondary', 'score', 'grade_group', 'tiles', 'seconds', 'path'])


def cohort_row(name, path, status, error='', summary=None) -> Dict[str, str]:
  """A slides.csv row from a slide's summary.json content (or a failure)."""
  row = dict.fromkeys(COHORT_COLUMNS, '')
  row.update(slide=name, path=os.path.abspath(path), status=status, error=error or '')
  if summary:
    row['tiles'] = str(summary['tissue_tiles'])
    row['seconds'] = f"{summary['seconds']:.2f}"
    g = summary.get('gleason')
    area = g['tissue_mm2'] if g else summary.get('tissue_area_mm2')
    row['tissue_mm2'] = '' if area is None else f'{area:.4f}'
    if g:
      row['tumour_percent'] = f"{g['tumour_percent']:.2f}"
      for p in ('3', '4', '5'):
        row[f'pattern{p}_percent'] = f"{g['pattern_percent'][p]:.2f}"
      row.update(primary=str(g['primary']), secondary=str(g['secondary']), score=g['score'],
                 grade_group='benign' if g['grade_group'] == 0 else str(g['grade_group']))
  return row


class CohortTable:
  """OUT/slides.csv: rows keyed by slide name, in the order of `order` (the command line's), then
  the rows of earlier runs; every update rewrites the file atomically, so an interrupted cohort
  keeps the rows of its finished slides."""

  def __init__(self, path: str, order: Sequence[str] = ()):
    self.path = path
    self.order = {n: i for i, n in enumerate(order)}
    self.rows: Dict[str, Dict[str, str]] = {}
    if os.path.isfile(path):
      self.rows = {r['slide']: r for r in read_cohort(path)}

  def done(self, name: str, out_dir: str) -> bool:
    """Whether slide `name` finished ('ok') in an earlier run and its outputs are still there."""
    row = self.rows.get(name)
    return bool(row and row.get('status') == 'ok'
                and os.path.isfile(os.path.join(out_dir, name, 'summary.json')))

  def update(self, row: Dict[str, str]):
    self.rows[row['slide']] = row
    self.write()

  def write(self):
    buf = io.StringIO()
    w = csv.DictWriter(buf, COHORT_COLUMNS, extrasaction='ignore', restval='')
    w.writeheader()
    keys = sorted(self.rows, key=lambda n: self.order.get(n, len(self.order)))  # stable
    w.writerows(self.rows[k] for k in keys)
    with errors.disk_writes(self.path, 'the cohort table'):
      runs.atomic_write(self.path, lambda f: f.write(buf.getvalue()))


def read_cohort(path: str) -> List[Dict[str, str]]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def cohort_path(out_dir, process_index=0, process_count=1) -> str:
  """OUT/slides.csv (slides_p<i>.csv per process under jax.distributed, merged at the end)."""
  name = 'slides.csv' if process_count == 1 else f'slides_p{process_index}.csv'
  return os.path.join(out_dir, name)


def finish_cohort(out_dir: str, process_count: int, labels_path: Optional[str]):
  """Merges the processes' slides_p<i>.csv into slides.csv and, with labels, writes
  OUT/slide_metrics.json and logs the slide-level metrics (process 0, after every process)."""
  from camkd_jax import gleason  # pylint: disable=g-import-not-at-top
  from camkd_jax import slide_labels  # pylint: disable=g-import-not-at-top
  path = cohort_path(out_dir)
  if process_count > 1:
    table = CohortTable(path)
    for i in range(process_count):
      part = cohort_path(out_dir, i, process_count)
      for row in read_cohort(part) if os.path.isfile(part) else []:
        table.rows[row['slide']] = row
    table.write()
  rows = read_cohort(path) if os.path.isfile(path) else []
  logging.info('cohort table: %s (%d slides)', path, len(rows))
  if not labels_path:
    return None
  labels = slide_labels.read_labels(labels_path)
  ours = {r['slide']: (int(r['primary']), int(r['secondary'])) for r in rows
          if r['status'] == 'ok' and r['primary'] != ''}
  lines = slide_labels.mismatch_lines(labels, ours, labels_path)
  for line in lines:
    logging.warning('%s', line)
  m = slide_labels.slide_metrics(labels, ours)
  common = sorted(set(labels) & set(ours))
  write_json(os.path.join(out_dir, 'slide_metrics.json'), {
      'labels': os.path.abspath(labels_path), 'metrics': m, 'notes': lines,
      'slides': [{'slide': s, 'label': '+'.join(map(str, labels[s])),
                  'ours': '+'.join(map(str, ours[s])),
                  'label_grade_group': gleason.grade_group(*labels[s]),
                  'grade_group': gleason.grade_group(*ours[s])} for s in common]})
  if m is None:
    logging.warning('no graded slide of this run is in %s: nothing to compare (slide ids are '
                    'the slide file names without their extension)', labels_path)
  else:
    logging.info('%s; in %s', slide_labels.format_metrics(m),
                 os.path.join(out_dir, 'slide_metrics.json'))
  return m


# ----------------------------------------------------------------------------- summary.json
def slide_summary(plan, probs, rm, which: str, seconds: float, plan_seconds: float,
                  patterns=None, rules: gleason.Rules = gleason.Rules()) -> Dict[str, Any]:
  """summary.json of one slide: the slide, the model (an inference.RunModel), the level and grid
  read, the tissue, the class counts, fractions and mean probabilities, the timing, and the
  Gleason score when the classes are Gleason patterns (`patterns`, gleason.class_patterns)."""
  pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
  n = len(pred)
  names = list(rm.class_names)
  return {
      'slide': os.path.abspath(plan.path),
      'vendor': plan.properties.get('openslide.vendor'),
      'dimensions': list(plan.dimensions),
      'magnification': plan.magnification, 'magnification_source': plan.magnification_source,
      'mpp': plan.mpp,
      'model': {'which': which, 'path': rm.path, 'magnification': rm.magnification,
                'factor': rm.factor, 'view': rm.view, 'tile_size': rm.tile_size,
                'image_size': rm.image_size, 'class_names': names},
      'level': plan.level, 'level_downsample': plan.level_downsample,
      'resample': plan.scale, 'read_size': plan.read_size, 'stride': plan.stride,
      'grid': list(plan.grid_shape), 'tiles_in_grid': int(np.prod(plan.grid_shape)),
      'tissue_tiles': n, 'tissue_threshold': plan.threshold,
      'tissue_area_mm2': plan.tissue_area_mm2(),
      'class_counts': {c: int((pred == i).sum()) for i, c in enumerate(names)},
      'class_fractions': {c: float((pred == i).mean()) if n else None
                          for i, c in enumerate(names)},
      'mean_probabilities': {c: float(probs[:, i].mean()) if n else None
                             for i, c in enumerate(names)},
      'seconds': seconds, 'plan_seconds': plan_seconds,
      'tiles_per_second': n / seconds if seconds > 0 else None,
      **slide_gleason(plan, probs, patterns, rules, names),
  }


def tile_area_mm2(plan) -> Optional[float]:
  """Level-0 area of one grid cell (stride x stride model pixels) in mm^2, None without MPP."""
  if not plan.mpp:
    return None
  return float((plan.stride * plan.s0 * plan.mpp) ** 2 / 1e6)


def slide_gleason(plan, probs, patterns, rules, class_names) -> Dict[str, Any]:
  """{'gleason': the slide score} when the classes are Gleason patterns, else {}."""
  if patterns is None:
    return {}
  g = gleason.slide_score(probs, patterns, rules, tile_area_mm2(plan))
  g['class_patterns'] = dict(zip(class_names, patterns))
  return {'gleason': g}


# ----------------------------------------------------------------------------- one slide
def write_slide(directory, plan, probs, class_names, summary, patterns=None, geojson_gzip=False):
  """Every per-slide output of one slide into `directory` (summary.json last)."""
  os.makedirs(directory, exist_ok=True)
  ext = '.geojson.gz' if geojson_gzip else '.geojson'
  write_tiles_csv(os.path.join(directory, 'tiles.csv'), plan, probs, class_names)
  write_tiles_geojson(os.path.join(directory, 'tiles' + ext), plan, probs, class_names)
  write_regions_geojson(os.path.join(directory, 'regions' + ext), plan, probs, class_names,
                        plan.mpp, patterns)
  slide_plots.save_heatmaps(os.path.join(directory, 'heatmap.png'), plan, probs, class_names)
  slide_plots.save_overlay(os.path.join(directory, 'overlay.png'), plan, probs, class_names)
  write_json(os.path.join(directory, 'summary.json'), summary)
