"""The synthetic test slides (camkd_jax.slide_testdata) as the real OpenSlide reads them."""
import numpy as np
import pytest

openslide = pytest.importorskip('openslide')  # the `slides` extra, part of `test`

from camkd_jax import slide_testdata  # pylint: disable=g-import-not-at-top,wrong-import-position
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position

P = conftest.SLIDE_TILE


# ----------------------------------------------------------------------------- the test slide
def test_openslide_reads_the_written_slide(slides):
  d, s = slides
  truth = s['s10']
  osr = openslide.OpenSlide(str(d / 's10.svs'))
  props = osr.properties
  assert props['openslide.vendor'] == 'aperio'
  assert float(props['openslide.objective-power']) == 10.0
  assert float(props['openslide.mpp-x']) == 1.0 == float(props['openslide.mpp-y'])
  assert osr.level_count == 3 and osr.level_downsamples == (1.0, 4.0, 16.0)
  h, w = truth.labels.shape
  assert osr.level_dimensions == ((w, h), (w // 4, h // 4), (w // 16, h // 16))
  assert 'thumbnail' in osr.associated_images
  image, labels = slide_testdata.render_content(truth.cells, P)
  np.testing.assert_array_equal(labels, truth.labels)
  level0 = np.asarray(osr.read_region((0, 0), 0, (w, h)))
  np.testing.assert_array_equal(level0[..., :3], image)
  assert level0[..., 3].min() == 255
  level1 = np.asarray(osr.read_region((0, 0), 1, (w // 4, h // 4)))[..., :3]
  np.testing.assert_array_equal(level1, slide_testdata.area_downsample(image, 4))
  s20 = openslide.OpenSlide(str(d / 's20.svs'))
  assert float(s20.properties['openslide.objective-power']) == 20.0
  assert s20.dimensions == (2 * w, 2 * h)
  # the ground-truth file next to the slide
  import PIL.Image  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(d / 's10_labels.png')), truth.labels)
