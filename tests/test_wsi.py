"""Whole-slide reading (camkd_jax.wsi): level choice, magnification, tissue and tiles, on the
synthetic Aperio-like slides of conftest.slides read by the real OpenSlide (no mocks)."""
import numpy as np
import pytest

openslide = pytest.importorskip('openslide')  # the `slides` extra, part of `test`

from camkd_jax import slide_testdata  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import wsi  # pylint: disable=g-import-not-at-top,wrong-import-position
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position

P = conftest.SLIDE_TILE


# ----------------------------------------------------------------------------- level choice
@pytest.mark.parametrize('slide_mag, downsamples, model_mag, want', [
    (10, (1, 4, 16), 2.5, (1, 1.0)),         # level 1 is exactly 2.5x
    (10, (1, 4, 16), 10, (0, 1.0)),
    (10, (1, 4, 16), 5, (0, 2.0)),           # level 1 (2.5x) is too coarse: level 0, box 2
    (20, (1, 4, 16), 10, (0, 2.0)),          # level 1 is 5x
    (20, (1, 4, 16), 2.5, (1, 2.0)),         # 5x level, box 2
    (40, (1, 4, 16), 10, (1, 1.0)),
    (40, (1, 4, 16), 2.5, (2, 1.0)),
    (40, (1, 4, 16, 32), 1.25, (3, 1.0)),
    (20, (1, 2, 4, 8), 5, (2, 1.0)),
    (40, (1, 4.0003, 16.0012), 10, (1, 1.0)),  # scanner rounding within 1 %
    (20, (1, 3, 9), 2.5, (1, 20 / 3 / 2.5)),   # non-power-of-two pyramid: fractional box
])
def test_choose_level_hand_computed(slide_mag, downsamples, model_mag, want):
  level, scale = wsi.choose_level(downsamples, slide_mag, model_mag)
  assert level == want[0]
  assert scale == pytest.approx(want[1], rel=1e-12)


def test_slide_below_the_model_magnification_is_refused():
  with pytest.raises(ValueError, match='5x, below the model\'s 10x'):
    wsi.choose_level((1, 4), 5, 10)


@pytest.mark.parametrize('props, override, want', [
    ({'openslide.objective-power': '20', 'openslide.mpp-x': '0.4990'}, {}, (20.0, 0.499)),
    ({'openslide.mpp-x': '0.25'}, {}, (40.0, 0.25)),
    ({'openslide.objective-power': '40'}, {}, (40.0, None)),
    ({'openslide.objective-power': '40'}, {'magnification': 20}, (20.0, None)),
    ({}, {'mpp': 0.5}, (20.0, 0.5)),
    ({'openslide.objective-power': 'n/a', 'openslide.mpp-x': '1.0'}, {}, (10.0, 1.0)),
])
def test_slide_magnification_sources(props, override, want):
  mag, mpp, _ = wsi.slide_magnification(props, 'x.svs', **override)
  assert (mag, mpp) == pytest.approx(want) if want[1] else (mag, mpp) == want


def test_slide_without_metadata_is_refused_naming_it(slides):
  d, _ = slides
  path = str(d / 'nometa.tif')
  assert openslide.OpenSlide(path).properties['openslide.vendor'] == 'generic-tiff'
  with pytest.raises(wsi.SlideError, match=r'nometa\.tif: no magnification metadata.*'
                                           r'--slide_magnification.*--mpp'):
    wsi.plan_slide(path, 10.0, P, P)
  plan = wsi.plan_slide(path, 10.0, P, P, magnification=10)
  assert (plan.level, plan.scale, plan.magnification_source) == (0, 1.0, '--slide_magnification')


# ----------------------------------------------------------------------------- tissue and tiles
def _kept(plan):
  out = np.zeros(plan.grid_shape, bool)
  out[plan.grid[:, 0], plan.grid[:, 1]] = True
  return out


@pytest.mark.parametrize('slide, model_mag, tile', [('s10', 10, 32), ('s10', 2.5, 8),
                                                     ('s20', 10, 32), ('s20', 2.5, 8)])
def test_tissue_tiles_are_the_ground_truth_cells(slides, slide, model_mag, tile):
  """Tiles of the model footprint aligned with the patch grid: the kept ones are exactly the
  tissue cells (background ones skipped), at either magnification."""
  truth = slides[1][slide]
  plan = wsi.plan_slide(truth.path, model_mag, tile, tile)
  assert plan.grid_shape == truth.cells.shape
  np.testing.assert_array_equal(_kept(plan), truth.cells >= 0)
  assert len(plan.grid) == 168
  # tissue area: 168 cells of (32 um)^2, within the thumbnail's resolution
  assert plan.tissue_area_mm2() == pytest.approx(168 * 32 ** 2 / 1e6, rel=0.05)


def test_overlapping_stride_skips_background_and_keeps_tissue(slides):
  truth = slides[1]['s10']
  plan = wsi.plan_slide(truth.path, 10, P, P // 2)
  tissue10 = truth.labels != slide_testdata.BACKGROUND
  rows, cols = plan.grid_shape
  frac = np.array([[tissue10[r * 16:r * 16 + P, c * 16:c * 16 + P].mean() for c in range(cols)]
                   for r in range(rows)])
  kept = _kept(plan)
  assert not kept[frac == 0].any() and kept[frac == 1].all()


def test_tiles_are_read_at_the_model_magnification(slides):
  """20x slide: the 10x tiles are the 10x pixels exactly (box 2 of replicated pixels); the 2.5x
  tiles (level 1 = 5x, box 2) are the 4 x 4 area means of the 10x pixels within rounding."""
  truth = slides[1]['s20']
  image, _ = slide_testdata.render_content(truth.cells, P)
  reader = wsi.TileReader(2)
  for model_mag, tile, want_level in ((10, 32, 0), (2.5, 8, 1)):
    plan = wsi.plan_slide(truth.path, model_mag, tile, tile)
    assert (plan.level, plan.scale) == (want_level, 2.0)
    tiles = reader.read(plan, np.arange(len(plan.grid)))
    f = int(round(10 / model_mag))
    for (r, c), t in zip(plan.grid, tiles):
      want = slide_testdata.area_downsample(image[r * P:(r + 1) * P, c * P:(c + 1) * P], f)
      assert np.abs(t.astype(int) - want.astype(int)).max() <= (0 if f == 1 else 1)
  reader.close()
