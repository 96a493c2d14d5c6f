r"""Time and size of the per-slide GeoJSON files and of slides.csv on a large synthetic slide.

  python experiments/slide_outputs_bench.py --rows 320 --cols 320 --out /tmp/slide_outputs_bench

The slide is a tile plan (camkd_jax.wsi.SlidePlan: the real geometry, 20x level 0, a 2.5x
student's 16 px tiles, so s0 = 8) whose grid is rows x cols tiles, all tissue, with class
probabilities that form smooth, blob-like regions (a low-pass random field per class, softmax),
so regions.geojson has realistic ragged outlines and holes. No pixels are read: the script times
only what the slide command writes after the predictions. slides.csv is timed twice: written
with this slide's row, and one update (an atomic rewrite) of a table of --cohort rows. Prints one
JSON line per file.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from camkd_jax import gleason  # pylint: disable=wrong-import-position
from camkd_jax import slide_outputs  # pylint: disable=wrong-import-position
from camkd_jax import wsi  # pylint: disable=wrong-import-position

CLASS_NAMES = ('NC', 'G3', 'G4', 'G5')


def synthetic_plan(rows, cols, tile=16, magnification=20.0, model_mag=2.5, seed=0):
  s0 = magnification / model_mag
  rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  grid = np.stack([rr.ravel(), cc.ravel()], 1)
  size = (int(cols * tile * s0), int(rows * tile * s0))
  return wsi.SlidePlan(
      path='synthetic.svs', properties={}, dimensions=size, magnification=magnification,
      mpp=10.0 / magnification, magnification_source='synthetic', model_magnification=model_mag,
      level=1, level_downsample=4.0, scale=2.0, tile=tile, stride=tile,
      grid_shape=(rows, cols), grid=grid, tissue=np.ones(len(grid)),
      thumbnail=np.zeros((8, 8, 3), np.uint8), mask=np.ones((8, 8), bool), threshold=0.1)


def smooth_probs(rows, cols, num_classes, seed=0, scale=12):
  """Softmax of a low-pass random field per class: coherent regions of ~`scale` tiles."""
  rng = np.random.default_rng(seed)
  f = np.fft.fftfreq(rows)[:, None] ** 2 + np.fft.fftfreq(cols)[None, :] ** 2
  low = np.exp(-f * (np.pi * scale) ** 2)
  logits = []
  for _ in range(num_classes):
    field = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((rows, cols))) * low))
    logits.append(field / field.std() * 3)
  logits = np.stack(logits, -1).reshape(-1, num_classes)
  e = np.exp(logits - logits.max(1, keepdims=True))
  return (e / e.sum(1, keepdims=True)).astype(np.float32)


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times), float(np.median(times))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', type=int, default=320)
  p.add_argument('--cols', type=int, default=320)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--cohort', type=int, default=1000, help='rows of the cohort-table timing')
  p.add_argument('--out', default='/tmp/slide_outputs_bench')
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  plan = synthetic_plan(a.rows, a.cols)
  probs = smooth_probs(a.rows, a.cols, len(CLASS_NAMES))
  patterns = gleason.class_patterns(CLASS_NAMES)
  g = gleason.slide_score(probs, patterns, tile_area_mm2=(plan.tile * plan.s0 * plan.mpp) ** 2
                          / 1e6)
  summary = {'tissue_tiles': len(probs), 'seconds': 1.0, 'gleason': g}
  jobs = {
      'tiles.geojson': lambda path: slide_outputs.write_tiles_geojson(path, plan, probs,
                                                                      CLASS_NAMES),
      'tiles.geojson.gz': lambda path: slide_outputs.write_tiles_geojson(path, plan, probs,
                                                                         CLASS_NAMES),
      'regions.geojson': lambda path: slide_outputs.write_regions_geojson(
          path, plan, probs, CLASS_NAMES, plan.mpp, patterns),
      'tiles.csv': lambda path: slide_outputs.write_tiles_csv(path, plan, probs, CLASS_NAMES),
      'slides.csv': lambda path: slide_outputs.CohortTable(path).update(
          slide_outputs.cohort_row('synthetic', plan.path, 'ok', summary=summary)),
  }
  def cohort_of(n):
    def fill(path):
      table = slide_outputs.CohortTable(path)
      for i in range(n - 1):
        table.rows[f's{i}'] = slide_outputs.cohort_row(f's{i}', plan.path, 'ok', summary=summary)
      table.update(slide_outputs.cohort_row('last', plan.path, 'ok', summary=summary))
    return fill
  cohort = os.path.join(a.out, f'slides_{a.cohort}.csv')
  if os.path.exists(cohort):
    os.remove(cohort)
  cohort_of(a.cohort)(cohort)
  jobs[os.path.basename(cohort)] = lambda path: slide_outputs.CohortTable(path).update(
      slide_outputs.cohort_row('last', plan.path, 'ok', summary=summary))
  print(json.dumps({'tiles': len(probs), 'grid': [a.rows, a.cols], 'score': g['score'],
                    'grade_group': g['grade_group']}))
  for name, fn in jobs.items():
    path = os.path.join(a.out, name)
    if os.path.exists(path) and path != cohort:  # the cohort table is updated, not rewritten
      os.remove(path)
    best, median = timed(lambda: fn(path), a.repeats)
    extra = {}
    if name == 'regions.geojson':
      import shapely  # pylint: disable=g-import-not-at-top
      feats = json.load(open(path))['features']
      geoms = [shapely.geometry.shape(f['geometry']) for f in feats]
      extra = {'valid': all(x.is_valid for x in geoms),
               'polygons': int(sum(shapely.get_num_geometries(x) for x in geoms)),
               'vertices': int(sum(shapely.get_num_coordinates(x) for x in geoms))}
    print(json.dumps({'file': name, 'seconds_best': round(best, 4),
                      'seconds_median': round(median, 4),
                      'MB': round(os.path.getsize(path) / 1e6, 4), **extra}))


if __name__ == '__main__':
  main()
