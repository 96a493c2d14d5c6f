"""camkd_jax.slide_outputs and camkd_jax.slide_labels: GeoJSON for QuPath, the cohort table, the
slide-labels reader and the slide-level metrics, on hand-made tile plans (no model, no slide)."""
import csv
import json
import os

import numpy as np
import pytest

shapely = pytest.importorskip('shapely')  # the `slides` extra, part of `test`

from camkd_jax import gleason  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import slide_labels  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import slide_outputs  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import wsi  # pylint: disable=g-import-not-at-top,wrong-import-position
from helpers import write_xlsx  # pylint: disable=g-import-not-at-top,wrong-import-position

NAMES = ('NC', 'G3', 'G4', 'G5')


def make_plan(cells, tile=16, stride=16, magnification=20.0, model_mag=2.7, mpp=0.5):
  """A SlidePlan over the tissue cells of `cells` (>= 0), s0 = 20 / 2.7 (not a whole number, so
  the box corners are rounded)."""
  grid = np.argwhere(np.asarray(cells) >= 0)
  rows, cols = np.asarray(cells).shape
  return wsi.SlidePlan(
      path='hand.svs', properties={}, dimensions=(1000, 1000), magnification=magnification,
      mpp=mpp, magnification_source='test', model_magnification=model_mag, level=0,
      level_downsample=1.0, scale=magnification / model_mag, tile=tile, stride=stride,
      grid_shape=(rows, cols), grid=grid, tissue=np.linspace(0.5, 1.0, len(grid)),
      thumbnail=np.zeros((4, 4, 3), np.uint8), mask=np.ones((4, 4), bool), threshold=0.1)


def checker_cells():
  """Classes with holes, diagonal (corner-touching) neighbours and isolated tiles."""
  rng = np.random.default_rng(3)
  cells = rng.integers(0, 4, (12, 15))
  cells[::3, ::4] = -1                      # background holes
  cells[6:9, 6:9] = [[1, 2, 1], [2, 1, 2], [1, 2, 1]]  # checkerboard: corner contacts
  cells[0:5, 0:5] = 3
  cells[2, 2] = -1                          # a hole inside a class region
  return cells


def one_hot_probs(plan, cells, seed=0):
  """Probabilities whose argmax is the cell's class (with some spread)."""
  labels = np.asarray(cells)[plan.grid[:, 0], plan.grid[:, 1]]
  p = np.random.default_rng(seed).uniform(0, 0.2, (len(labels), 4))
  p[np.arange(len(labels)), labels] = 0.5
  return p / p.sum(1, keepdims=True), labels


def _box(x, y, w, h):
  return [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]


def test_every_tile_polygon_is_its_tiles_csv_row(tmp_path):
  cells = checker_cells()
  plan = make_plan(cells)
  probs, labels = one_hot_probs(plan, cells)
  slide_outputs.write_tiles_csv(str(tmp_path / 'tiles.csv'), plan, probs, NAMES)
  slide_outputs.write_tiles_geojson(str(tmp_path / 'tiles.geojson'), plan, probs, NAMES)
  rows = list(csv.DictReader(open(tmp_path / 'tiles.csv')))
  fc = json.load(open(tmp_path / 'tiles.geojson'))
  assert fc['type'] == 'FeatureCollection' and len(fc['features']) == len(rows) == len(labels)
  s0 = plan.s0
  for f, row, (r, c) in zip(fc['features'], rows, plan.grid):
    x, y, w, h = (int(row[k]) for k in ('x', 'y', 'width', 'height'))
    # the exact grid, rounded: an independent computation of the corners
    assert (x, y) == (round(c * 16 * s0), round(r * 16 * s0))
    assert (x + w, y + h) == (round((c + 1) * 16 * s0), round((r + 1) * 16 * s0))
    assert f['geometry'] == {'type': 'Polygon', 'coordinates': [_box(x, y, w, h)]}
    geom = shapely.geometry.shape(f['geometry'])
    assert geom.is_valid and geom.area == w * h
    props = f['properties']
    assert props['objectType'] == 'tile'
    assert props['classification']['name'] == row['prediction']
    rgb = props['classification']['color']
    assert len(rgb) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)
    m = props['measurements']
    assert set(m) == {f'prob_{n}' for n in NAMES} | {'tissue'}
    for n in NAMES:
      assert m[f'prob_{n}'] == pytest.approx(float(row[f'prob_{n}']), abs=5.01e-5)
    assert m['tissue'] == pytest.approx(float(row['tissue']), abs=5e-4)
  # side-by-side tiles share their edges exactly: no gap, no overlap
  union = shapely.unary_union([shapely.geometry.shape(f['geometry']) for f in fc['features']])
  assert union.area == sum(int(r['width']) * int(r['height']) for r in rows)


def test_tiles_geojson_text_is_what_json_writes():
  """The fixed template gives the JSON that json.dumps writes for the same dicts."""
  cells = checker_cells()[:4, :4]
  plan = make_plan(cells)
  probs, _ = one_hot_probs(plan, cells)
  text = slide_outputs.tiles_geojson_text(plan, probs, NAMES)
  boxes = slide_outputs.tile_boxes(plan)
  want = {'type': 'FeatureCollection', 'features': [
      {'type': 'Feature',
       'geometry': {'type': 'Polygon', 'coordinates': [_box(int(x0), int(y0), int(x1 - x0),
                                                            int(y1 - y0))]},
       'properties': {'objectType': 'tile',
                      'classification': {'name': NAMES[int(np.argmax(p))],
                                         'color': slide_outputs.class_rgb(int(np.argmax(p)))},
                      'measurements': {**{f'prob_{n}': round(float(v), 4)
                                          for n, v in zip(NAMES, p)},
                                       'tissue': round(float(t), 3)}}}
      for (x0, y0, x1, y1), p, t in zip(boxes, probs, plan.tissue)]}
  assert text == json.dumps(want, separators=(',', ':'))


@pytest.mark.parametrize('stride', [16, 8, 12])
def test_regions_are_the_union_of_their_tiles(tmp_path, stride):
  """Each class's region equals shapely's union of its tiles one by one (the reference), is
  valid, and (tiles side by side) has the tiles' total area; um^2 = px^2 * mpp^2."""
  cells = checker_cells()
  plan = make_plan(cells, stride=stride)
  probs, labels = one_hot_probs(plan, cells)
  path = str(tmp_path / 'regions.geojson')
  slide_outputs.write_regions_geojson(path, plan, probs, NAMES, mpp=0.5,
                                      patterns=[0, 3, 4, 5])
  features = json.load(open(path))['features']
  assert [f['properties']['classification']['name'] for f in features] == list(NAMES)
  boxes = slide_outputs.tile_boxes(plan)
  for k, f in enumerate(features):
    geom = shapely.geometry.shape(f['geometry'])
    assert geom.is_valid, shapely.is_valid_reason(geom)
    mine = boxes[labels == k]
    reference = shapely.unary_union([shapely.box(*b) for b in mine])
    assert shapely.symmetric_difference(geom, reference).area == 0
    if stride == 16:
      assert geom.area == sum((b[2] - b[0]) * (b[3] - b[1]) for b in mine)
    props = f['properties']
    assert props['objectType'] == 'annotation' and props['isLocked'] is True
    m = props['measurements']
    assert m['Tiles'] == len(mine) and m['Area px^2'] == geom.area
    assert m['Area um^2'] == pytest.approx(geom.area * 0.25)
    assert m['Gleason pattern'] == [0, 3, 4, 5][k]
  # the corner-touching checkerboard and the hole come out as valid (Multi)Polygons
  assert any(shapely.geometry.shape(f['geometry']).geom_type == 'MultiPolygon' for f in features)


def test_a_class_without_tiles_has_no_region_and_no_mpp_no_um2(tmp_path):
  cells = np.zeros((3, 3), int)
  plan = make_plan(cells, mpp=None)
  probs, _ = one_hot_probs(plan, cells)
  path = str(tmp_path / 'r.geojson.gz')
  slide_outputs.write_regions_geojson(path, plan, probs, NAMES, mpp=None)
  import gzip  # pylint: disable=g-import-not-at-top
  features = json.loads(gzip.open(path).read())['features']
  assert len(features) == 1 and 'Area um^2' not in features[0]['properties']['measurements']
  assert features[0]['geometry']['type'] == 'Polygon'


# ----------------------------------------------------------------------------- cohort table
def test_cohort_table_keeps_rows_across_runs(tmp_path):
  path = str(tmp_path / 'slides.csv')
  g = gleason.slide_score(np.eye(4)[[0, 1, 1, 1, 2, 2]], [0, 3, 4, 5], tile_area_mm2=0.01)
  summary = {'tissue_tiles': 6, 'seconds': 1.5, 'gleason': g}
  table = slide_outputs.CohortTable(path)
  table.update(slide_outputs.cohort_row('a', 'x/a.svs', 'ok', summary=summary))
  table.update(slide_outputs.cohort_row('b', 'x/b.svs', 'failed', 'x/b.svs: no magnification'))
  os.makedirs(tmp_path / 'a')
  (tmp_path / 'a' / 'summary.json').write_text('{}')
  again = slide_outputs.CohortTable(path)  # a new run reads what the last one left
  assert list(again.rows) == ['a', 'b']
  a = again.rows['a']
  assert (a['score'], a['grade_group'], a['primary'], a['secondary']) == ('3+4=7', '2', '3', '4')
  assert (a['tiles'], a['seconds'], a['tissue_mm2']) == ('6', '1.50', '0.0600')
  assert (a['pattern3_percent'], a['pattern4_percent'], a['tumour_percent']) == (
      '60.00', '40.00', '83.33')
  assert again.done('a', str(tmp_path)) and not again.done('b', str(tmp_path))
  os.remove(tmp_path / 'a' / 'summary.json')
  assert not again.done('a', str(tmp_path))  # outputs gone: redo it
  assert open(path).readline().strip().split(',') == slide_outputs.COHORT_COLUMNS
  assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]


# ----------------------------------------------------------------------------- labels
def sicap_labels(path, rows):
  write_xlsx(path, rows, header=slide_labels.COLUMNS)
  return path


def test_reads_the_published_sicapv2_layout(tmp_path):
  path = sicap_labels(str(tmp_path / 'wsi_labels.xlsx'), [
      ('16B0001851', 'P1', 3, 4), ('16B0003388', 'P1', 0, 0), ('18B0006169J', 'P2', 5, 4)])
  assert slide_labels.read_labels(path) == {'16B0001851': (3, 4), '16B0003388': (0, 0),
                                            '18B0006169J': (5, 4)}
  csv_path = tmp_path / 'labels.csv'
  csv_path.write_text('slide_id,Gleason_primary,Gleason_secondary\ns1,4,3\ns2,4.0,5\n')
  assert slide_labels.read_labels(str(csv_path)) == {'s1': (4, 3), 's2': (4, 5)}


def test_slide_id_of_a_sicapv2_patch():
  f = slide_labels.sicapv2_slide_id
  assert f('16B0001851_Block_Region_1_0_0_xini_6803_yini_59786.jpg') == '16B0001851'
  assert f('/data/images/18B0006169J_Block_Region_10_2_3_xini_1_yini_2.jpg') == '18B0006169J'
  assert f('16B0001851_other.jpg') == '16B0001851'


@pytest.mark.parametrize('rows, header, pattern', [
    ([('s1', 'p', 3, 4)], ('slide_id', 'patient_id', 'primary', 'secondary'),
     r"missing column\(s\) \['Gleason_primary', 'Gleason_secondary'\]; expected the header "
     r'slide_id, patient_id, Gleason_primary, Gleason_secondary'),
    ([('s1', 'p', 3, 4), ('s2', 'p', 6, 3)], None,
     r"row 3 \(slide_id 's2'\): Gleason_primary is '6'; a Gleason pattern is 3, 4 or 5"),
    ([('s1', 'p', 2, 3)], None, r"row 2 \(slide_id 's1'\): Gleason_primary is '2'"),
    ([('s1', 'p', 3, 'x')], None, r"Gleason_secondary is 'x'"),
    ([('s1', 'p', 0, 3)], None, r'0\+3 mixes benign \(0\) with a pattern'),
    ([('', 'p', 3, 3)], None, r'row 2: empty slide_id'),
    ([('s1', 'p', 3, 3), ('s1', 'p', 4, 4)], None, r'row 3 .*4\+4, but row 2 gives 3\+3'),
])
def test_bad_labels_give_one_clear_line(tmp_path, rows, header, pattern):
  path = str(tmp_path / 'labels.xlsx')
  write_xlsx(path, rows, header=header or slide_labels.COLUMNS)
  with pytest.raises(slide_labels.LabelError, match=pattern) as info:
    slide_labels.read_labels(path)
  assert '\n' not in str(info.value) and path in str(info.value)


def test_missing_or_unreadable_labels_file(tmp_path):
  with pytest.raises(slide_labels.LabelError, match=r'--labels .*nope\.xlsx: no such file'):
    slide_labels.read_labels(str(tmp_path / 'nope.xlsx'))
  (tmp_path / 'l.txt').write_text('x')
  with pytest.raises(slide_labels.LabelError, match=r"unsupported extension '\.txt'"):
    slide_labels.read_labels(str(tmp_path / 'l.txt'))


def test_unknown_slide_ids_are_named_in_one_line_each():
  lines = slide_labels.mismatch_lines(['a', 'b', 'c'], ['b', 'c', 'd', 'e'], 'L.xlsx')
  assert lines == ['1 slide(s) of L.xlsx are not in this run: a',
                   '2 slide(s) of this run have no label in L.xlsx: d, e']
  assert slide_labels.mismatch_lines(['a'], ['a'], 'L') == []


def test_slide_metrics_by_hand():
  truth = {'a': (3, 4), 'b': (4, 3), 'c': (0, 0), 'd': (4, 5), 'x': (3, 3)}
  ours = {'a': (3, 4), 'b': (3, 4), 'c': (3, 3), 'd': (4, 5), 'y': (5, 5)}
  m = slide_labels.slide_metrics(truth, ours)
  # grade groups, in slide order a b c d: truth 2 3 0 5, ours 2 2 1 5
  assert m['num_slides'] == 4
  assert m['accuracy'] == 0.5                    # a, d
  assert m['score_accuracy'] == 0.75             # a, b (7 = 7), d
  assert m['pattern_accuracy'] == 0.5
  cm = np.zeros((6, 6), int)
  for t, p in ((2, 2), (3, 2), (0, 1), (5, 5)):
    cm[t, p] += 1
  assert m['confusion_matrix'] == cm.tolist()
  # quadratic kappa from its definition, 6 ordered grade groups
  t, p = np.array([2, 3, 0, 5]), np.array([2, 2, 1, 5])
  w = (np.subtract.outer(np.arange(6), np.arange(6)) ** 2) / 25.0
  expected = np.outer(np.bincount(t, minlength=6), np.bincount(p, minlength=6)) / 4
  assert m['kappa'] == pytest.approx(1 - (w * cm).sum() / (w * expected).sum())
  assert slide_labels.slide_metrics(truth, {'zz': (3, 3)}) is None


def test_finish_cohort_writes_slide_metrics(tmp_path):
  table = slide_outputs.CohortTable(str(tmp_path / 'slides.csv'))
  for name, areas in (('a', [0, 1, 1, 1, 2, 2]), ('b', [0, 0, 0, 0]), ('c', [2, 2, 2])):
    g = gleason.slide_score(np.eye(4)[areas], [0, 3, 4, 5])
    table.update(slide_outputs.cohort_row(name, name + '.svs', 'ok',
                                          summary={'tissue_tiles': 1, 'seconds': 1.0,
                                                   'gleason': g}))
  table.update(slide_outputs.cohort_row('d', 'd.svs', 'failed', 'unreadable'))
  labels = sicap_labels(str(tmp_path / 'wsi_labels.xlsx'), [
      ('a', 'p', 3, 4), ('b', 'p', 0, 0), ('c', 'p', 4, 5), ('z', 'p', 3, 3)])
  m = slide_outputs.finish_cohort(str(tmp_path), 1, labels)
  saved = json.load(open(tmp_path / 'slide_metrics.json'))
  assert saved['metrics'] == m and m['num_slides'] == 3 and m['accuracy'] == pytest.approx(2 / 3)
  assert saved['notes'] == [f'1 slide(s) of {labels} are not in this run: z']
  assert [(s['slide'], s['label'], s['ours']) for s in saved['slides']] == [
      ('a', '3+4', '3+4'), ('b', '0+0', '0+0'), ('c', '4+5', '4+4')]
