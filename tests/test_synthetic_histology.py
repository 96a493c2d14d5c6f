"""camkd_jax.datasets.synthetic_histology: label shares, rendering, the TFDS build, errors."""
import os

import numpy as np
import pytest

from camkd_jax import datasets
from camkd_jax.datasets import folder
from camkd_jax.datasets import sicapv2
from camkd_jax.datasets import synthetic_histology as sh
from helpers import data_config
from helpers import decode_image


def test_split_labels_counts_follow_shares():
  n = 2000
  labels = sh.split_labels(n, 0, 0)
  counts = np.bincount(labels, minlength=4)
  assert counts.sum() == n
  # Largest-remainder rounding: every count within 1 of n * share.
  np.testing.assert_array_less(np.abs(counts - n * sh.CLASS_SHARES), 1.0 + 1e-9)
  np.testing.assert_array_equal(labels, sh.split_labels(n, 0, 0))
  assert not np.array_equal(labels, sh.split_labels(n, 0, 1))


def test_render_patch_deterministic_and_uint8():
  a = sh.render_patch(np.random.default_rng([0, 0, 5]), 2, 64)
  b = sh.render_patch(np.random.default_rng([0, 0, 5]), 2, 64)
  c = sh.render_patch(np.random.default_rng([0, 0, 6]), 2, 64)
  assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 5


def test_mean_colour_does_not_depend_on_class():
  """Per-class mean colour agrees within sampling error (4 standard errors)."""
  n = 60
  means = np.array([[sh.render_patch(np.random.default_rng([9, k, i]), k, 64).reshape(-1, 3)
                     .mean(0) for i in range(n)] for k in range(4)])  # [class, n, 3]
  spread = means.std(axis=1).mean(0)  # per-image std of the mean colour, per channel
  grand = means.mean(axis=(0, 1))
  se = spread / np.sqrt(n)
  assert np.all(np.abs(means.mean(axis=1) - grand) < 4 * se), (means.mean(axis=1), grand, se)
  # The region's mean colour is pinned exactly: classes differ far less than images do.
  assert spread.min() > 5


def test_classes_differ_in_fine_structure():
  """High-frequency energy (what x8 pooling removes) separates the classes; x8 means do not."""
  def hf(img, f):
    x = img.astype(np.float64).mean(-1)
    low = x.reshape(64 // f, f, 64 // f, f).mean((1, 3))
    return np.abs(x - np.kron(low, np.ones((f, f)))).mean()
  energy = np.array([[hf(sh.render_patch(np.random.default_rng([3, k, i]), k, 64), 2)
                      for i in range(20)] for k in range(4)])
  # G4's dense sieve has more 2-px detail than NC's sparse glands, with no overlap of the means'
  # 3-standard-error intervals.
  m, s = energy.mean(1), energy.std(1) / np.sqrt(20)
  assert m[2] - 3 * s[2] > m[0] + 3 * s[0], (m, s)


def test_synthetic_builder_sizes_and_content(smoke_builder):
  info = smoke_builder.info
  assert info.features['label'].names == ['NC', 'G3', 'G4', 'G5']
  cfg = smoke_builder.builder_config
  assert {s: info.splits[s].num_examples for s in ('train', 'validation', 'test')} == {
      'train': cfg.num_train, 'validation': cfg.num_validation, 'test': cfg.num_test}
  src = datasets.tfds_source.TfdsSource('synthetic_histology', smoke_builder)
  ex = src.read('validation')
  # Every stored image is exactly one regenerated from its per-example seed (PNG is lossless).
  want = {}
  for i, label in enumerate(sh.split_labels(cfg.num_validation, cfg.seed, 1)):
    img = sh.render_patch(np.random.default_rng([cfg.seed, 1, i]), int(label), cfg.image_size)
    want[img.tobytes()] = int(label)
  got = {decode_image(b).tobytes(): int(y) for b, y in zip(ex.items, ex.labels)}
  assert got == want


def test_synthetic_second_prepare_reuses_cache(smoke_builder):
  again = sh.SyntheticHistology(config='smoke', data_dir=os.fspath(smoke_builder.data_dir_root))
  assert again.is_prepared()


def test_unknown_dataset_and_size_are_named():
  with pytest.raises(ValueError, match='known:.*synthetic_histology.*sicapv2.*folder.*table'):
    datasets.get_source(data_config(name='imagenet'))
  with pytest.raises(ValueError, match="'huge'.*known: \\['default', 'smoke', 'fine', 'fine_40'"):
    datasets.get_source(data_config(synthetic_size='huge'))


# ----------------------------------------------------------------------------- the fine variant
def _class_images(scale, n, seed=3):
  images = [sh.render_patch(np.random.default_rng([seed, k, i]), k, 64, scale)
            for k in range(4) for i in range(n)]
  return np.stack(images), np.repeat(np.arange(4), n)


def test_fine_variant_is_deterministic_and_differs_from_default():
  a = sh.render_patch(np.random.default_rng([0, 0, 5]), 1, 64, sh.FINE_SCALE)
  b = sh.render_patch(np.random.default_rng([0, 0, 5]), 1, 64, sh.FINE_SCALE)
  d = sh.render_patch(np.random.default_rng([0, 0, 5]), 1, 64)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
  assert np.abs(a.astype(int) - d).mean() > 2
  # structure_scale 1 is the default data, bit for bit.
  np.testing.assert_array_equal(d, sh.render_patch(np.random.default_rng([0, 0, 5]), 1, 64, 1.0))


@pytest.mark.parametrize('name,scale', [('fine', sh.FINE_SCALE), ('fine_35', 0.35),
                                        ('fine_30', 0.3), ('fine_25', 0.25)])
def test_fine_builder_examples_are_balanced_and_regenerable(tmp_path, name, scale):
  """A fine builder's examples (generated without preparing all 2,800): class counts follow
  the shares, and every PNG is the patch regenerated from its per-example seed at its scale."""
  builder = sh.SyntheticHistology(config=name, data_dir=str(tmp_path))
  cfg = builder.builder_config
  assert cfg.structure_scale == scale < 1 and cfg.image_size == 64
  assert (cfg.num_train, cfg.num_validation, cfg.num_test) == (2000, 400, 400)
  n = 40
  examples = list(builder._generate_examples('validation', n))  # pylint: disable=protected-access
  labels = np.array([ex['label'] for _, ex in examples])
  np.testing.assert_array_less(np.abs(np.bincount(labels, minlength=4) - n * sh.CLASS_SHARES),
                               1.0 + 1e-9)
  for i, ex in examples[:8]:
    want = sh.render_patch(np.random.default_rng([cfg.seed, 1, i]), ex['label'], 64, scale)
    np.testing.assert_array_equal(decode_image(ex['image']), want)


def test_fine_variant_moves_the_class_evidence_to_periods_of_a_few_pixels():
  """Share of the between-class spectral variance at periods <= 4 px (removed by the 2.5x
  student's 4 x 4 pool): about 0.1 on the default data, about 0.7 on `fine` (20 patches per
  class; docs/data.md lists the values)."""
  default = sh.class_spectrum_share(*_class_images(1.0, 20), 0.25)
  fine = sh.class_spectrum_share(*_class_images(sh.FINE_SCALE, 20), 0.25)
  assert default < 0.25 and fine > 0.5, (default, fine)
  # fine_30, the paired study's 2.5x task: about 0.45 (0.47 on the train split).
  fine_30 = sh.class_spectrum_share(*_class_images(0.3, 20), 0.25)
  assert fine_30 > 0.3, fine_30
  # The measure itself: a class difference put only at period 2 px sits entirely above 1/4.
  yy, xx = np.mgrid[:16, :16]
  checker = ((yy + xx) % 2).astype(float)[..., None].repeat(3, -1)
  imgs = np.stack([checker * a for a in (1.0, 1.0, 3.0, 3.0)])
  assert sh.class_spectrum_share(imgs, [0, 0, 1, 1], 0.25) == pytest.approx(1.0)
