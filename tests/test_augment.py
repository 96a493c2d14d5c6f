"""Tests for camkd_jax.augment against NumPy float64 / scipy.ndimage references."""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from camkd_jax import augment as A
from helpers import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
# Jitted once per (params, shape): eager op-by-op dispatch is what makes tests slow on CPU.
augment_batch = jax.jit(A.augment_batch, static_argnums=2)
augment_image = jax.jit(A.augment_image, static_argnums=2)


def _rand(shape, seed=0):
  return np.random.RandomState(seed).rand(*shape).astype(np.float32)


# ---- float64 references -----------------------------------------------------------------------


def _forward_xy(angle, scale, tx, ty, flip):
  """Forward map in centred (x right, y down) coords: flip, then rotate, scale, translate.

  A counter-clockwise turn on screen (y down) sends the right-pointing unit vector (1, 0) to the
  up-pointing one (0, -1); test_rotate_90_matches_rot90 checks that this is np.rot90's sense.
  """
  f = np.diag([-1.0 if flip else 1.0, 1.0])
  r = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
  return scale * r @ f, np.array([tx, ty], np.float64)


def scipy_affine(image, angle=0.0, scale=1.0, tx=0.0, ty=0.0, flip=False,
                 mode='grid-constant'):
  """scipy.ndimage.affine_transform (order=1, cval=0) reference in float64, per channel."""
  h, w, _ = image.shape
  lin, t = _forward_xy(angle, scale, tx, ty, flip)
  inv_xy = np.linalg.inv(lin)
  swap = np.array([[0.0, 1.0], [1.0, 0.0]])  # (x, y) <-> (row, col)
  inv_rc = swap @ inv_xy @ swap
  centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
  offset = centre - inv_rc @ (centre + swap @ t)
  img = image.astype(np.float64)
  return np.stack([ndimage.affine_transform(img[..., c], inv_rc, offset=offset, order=1,
                                            mode=mode, cval=0.0)
                   for c in range(img.shape[-1])], axis=-1)


def np_gray(x):
  return 0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def np_brightness(x, f):
  return np.clip(f * x, 0, 1)


def np_contrast(x, f):
  return np.clip(f * x + (1 - f) * np_gray(x).mean(), 0, 1)


def np_saturation(x, f):
  return np.clip(f * x + (1 - f) * np_gray(x), 0, 1)


def np_pipeline(image, d):
  """What apply_draws must compute, from scipy and NumPy float64 pieces."""
  x = scipy_affine(image, float(d.angle), float(d.scale), float(d.tx), 0.0, bool(d.flip))
  x = np.clip(x, 0, 1)
  x = np_brightness(x, float(d.brightness))
  x = np_contrast(x, float(d.contrast))
  return np_saturation(x, float(d.saturation))


def _affine(image, angle=0.0, scale=1.0, tx=0.0, ty=0.0, flip=False):
  m = A.affine_matrix(angle, scale, tx, ty, flip)
  return np.asarray(A.apply_affine(jnp.asarray(image), m), np.float64)


# ---- geometry ---------------------------------------------------------------------------------


def test_hflip_matches_numpy():
  x = _rand((6, 9, 3))
  np.testing.assert_array_equal(np.asarray(A.hflip(jnp.asarray(x))), np.flip(x, axis=1))
  # The same flip folded into the affine map is also exact.
  np.testing.assert_array_equal(_affine(x, flip=True), np.flip(x, axis=1))


def test_identity_affine_is_exact():
  x = _rand((7, 10, 3))
  np.testing.assert_array_equal(_affine(x), x)


@pytest.mark.parametrize('size', [8, 7])
def test_rotate_90_matches_rot90(size):
  """Positive angles turn the content counter-clockwise as displayed: +90 deg == np.rot90(k=1)."""
  x = _rand((size, size, 3), seed=size)
  np.testing.assert_allclose(_affine(x, math.pi / 2), np.rot90(x, k=1), atol=1e-5)
  np.testing.assert_allclose(_affine(x, -math.pi / 2), np.rot90(x, k=-1), atol=1e-5)
  assert np.abs(_affine(x, math.pi / 2) - np.rot90(x, k=-1)).max() > 0.1


def test_small_rotation_matches_scipy():
  x = _rand((12, 12, 3), seed=1)
  angle = math.radians(10.0)
  got = _affine(x, angle)
  np.testing.assert_allclose(got, scipy_affine(x, angle), atol=1e-5)
  # scipy's mode='constant' differs only where a sample falls less than one pixel outside the
  # image (it drops such samples, grid_sample/torchvision zero padding blends them): the
  # centre agrees with it as well.
  ref_constant = scipy_affine(x, angle, mode='constant')
  np.testing.assert_allclose(got[3:-3, 3:-3], ref_constant[3:-3, 3:-3], atol=1e-5)


def test_integer_translation_is_zero_filled_shift():
  x = _rand((8, 10, 3), seed=2)
  want = np.zeros_like(x)
  want[:-1, 3:] = x[1:, :-3]  # tx = +3 (right), ty = -1 (up)
  np.testing.assert_array_equal(_affine(x, tx=3.0, ty=-1.0), want)


def test_shift_out_of_image_gives_zeros_and_tiny_images_are_rejected():
  x = _rand((6, 8, 3), seed=14)
  np.testing.assert_array_equal(_affine(x, tx=8.0), np.zeros_like(x))
  np.testing.assert_array_equal(_affine(x, ty=-6.5), np.zeros_like(x))
  with pytest.raises(ValueError, match='at least 2x2'):
    _affine(x[:1])


@pytest.mark.parametrize('scale', [0.9, 1.15])
def test_scale_matches_scipy(scale):
  x = _rand((11, 13, 3), seed=3)
  np.testing.assert_allclose(_affine(x, scale=scale), scipy_affine(x, scale=scale), atol=1e-5)


def test_combined_affine_matches_scipy():
  x = _rand((10, 14, 3), seed=4)
  kw = dict(angle=math.radians(-33.0), scale=1.1, tx=0.6, ty=-1.3, flip=True)
  np.testing.assert_allclose(_affine(x, **kw), scipy_affine(x, **kw), atol=1e-5)


# ---- colour -----------------------------------------------------------------------------------


@pytest.mark.parametrize('factor', [0.9, 1.1, 1.8])
def test_colour_ops_match_numpy(factor):
  x = _rand((9, 8, 3), seed=5)
  xj = jnp.asarray(x)
  x64 = x.astype(np.float64)
  for op, ref in ((A.adjust_brightness, np_brightness), (A.adjust_contrast, np_contrast),
                  (A.adjust_saturation, np_saturation)):
    np.testing.assert_allclose(np.asarray(op(xj, factor)), ref(x64, factor), atol=1e-6,
                               err_msg=op.__name__)
  # Sanity of the references: saturation 0 is grey, contrast 0 is the mean grey.
  np.testing.assert_allclose(np.asarray(A.adjust_saturation(xj, 0.0)),
                             np.repeat(np_gray(x64), 3, -1), atol=1e-6)


def test_values_stay_in_unit_interval():
  x = _rand((16, 12, 12, 3), seed=6)
  x[0] = 1.0
  x[1] = 0.0
  params = A.AugmentParams(prob=1.0, color_jitter=0.5, scale=(0.5, 2.0))
  out = np.asarray(augment_batch(jax.random.key(1), jnp.asarray(x), params))
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert np.abs(out - x).max() > 0.1


# ---- params, draws, determinism ---------------------------------------------------------------


def test_from_config_reads_base_config():
  # Loaded by path: configs/ is a folder of scripts, not an installed package.
  spec = importlib.util.spec_from_file_location('camkd_base_config', REPO / 'configs' / 'base.py')
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  cfg = base.base_config().augment
  assert A.AugmentParams.from_config(cfg) == A.AugmentParams()
  cfg.rotate = 0.0
  cfg.scale = (1, 1)
  p = A.AugmentParams.from_config(cfg)
  assert p.rotate == 0.0 and p.scale == (1.0, 1.0)
  hash(p)  # usable as a static argument


@pytest.mark.parametrize('field,value', [('prob', 1.5), ('scale', (1.2, 0.9)), ('scale', (1,)),
                                         ('translate', -0.1), ('rotate', -5.0)])
def test_bad_params_name_the_key(field, value):
  with pytest.raises(ValueError, match=f'augment.{field}'):
    A.AugmentParams(**{field: value})


def test_unknown_config_key_is_rejected():
  cfg = ml_collections.ConfigDict(dict(enabled=True, rotation=10.0))
  with pytest.raises(ValueError, match='rotation'):
    A.AugmentParams.from_config(cfg)


def test_bad_images_are_rejected():
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    A.augment_batch(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), A.AugmentParams())
  with pytest.raises(TypeError, match='uint8'):
    A.augment_batch(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.uint8), A.AugmentParams())


def test_identity_and_prob_zero_return_input_exactly():
  x = jnp.asarray(_rand((4, 10, 10, 3), seed=7))
  key = jax.random.key(3)
  for params in (A.AugmentParams.identity(), A.AugmentParams(prob=0.0),
                 A.AugmentParams(flip=False, rotate=0.0, scale=(1, 1), translate=0.0,
                                 color_jitter=0.0)):
    np.testing.assert_array_equal(np.asarray(augment_batch(key, x, params)), np.asarray(x))


def test_gated_off_draws_are_exact():
  """An example whose gates all fail must come out bit-identical (every op still traced)."""
  x = jnp.asarray(_rand((9, 11, 3), seed=8))
  off = A.AugmentDraws(flip=jnp.bool_(False), angle=jnp.float32(0), scale=jnp.float32(1),
                       tx=jnp.float32(0), brightness=jnp.float32(1), contrast=jnp.float32(1),
                       saturation=jnp.float32(1))
  out = jax.jit(A.apply_draws, static_argnums=2)(x, off, A.AugmentParams())
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_augment_image_matches_float64_pipeline():
  x = _rand((12, 14, 3), seed=9)
  params = A.AugmentParams(prob=1.0)
  for seed in range(4):
    key = jax.random.key(seed)
    d = A.sample_draws(key, params, x.shape[1])
    got = np.asarray(augment_image(key, jnp.asarray(x), params))
    np.testing.assert_allclose(got, np_pipeline(x, d), atol=2e-5, err_msg=f'seed {seed}')


def _many_draws(params, n=4000, width=64):
  keys = jax.random.split(jax.random.key(11), n)
  d = jax.jit(jax.vmap(lambda k: A.sample_draws(k, params, width)))(keys)
  return jax.tree.map(np.asarray, d)


def test_draw_ranges_and_gate_rates():
  params = A.AugmentParams()
  d = _many_draws(params)
  gates = {'flip': d.flip, 'angle': d.angle != 0, 'scale': d.scale != 1, 'tx': d.tx != 0,
           'color': d.brightness != 1}
  for name, g in gates.items():
    assert abs(g.mean() - 0.5) < 0.04, (name, g.mean())
  # Gates are independent: P(flip and rotate) ~ 1/4.
  assert abs((gates['flip'] & gates['angle']).mean() - 0.25) < 0.03
  assert np.abs(d.angle).max() <= math.radians(45) + 1e-6
  assert abs(np.abs(d.angle[gates['angle']]).mean() - math.radians(22.5)) < math.radians(2)
  on = d.scale[gates['scale']]
  assert on.min() >= 0.95 and on.max() <= 1.20 and on.max() - on.min() > 0.2
  assert np.abs(d.tx).max() <= 0.05 * 64 + 1e-5 and np.abs(d.tx).max() > 0.04 * 64
  for f in (d.brightness, d.contrast, d.saturation):
    assert f.min() >= 0.9 - 1e-6 and f.max() <= 1.1 + 1e-6


def test_switches_turn_ops_off():
  d = _many_draws(A.AugmentParams(prob=1.0, flip=False, rotate=0.0, scale=(1, 1),
                                  translate=0.0, color_jitter=0.0), n=200)
  assert not d.flip.any() and (d.angle == 0).all() and (d.scale == 1).all()
  assert (d.tx == 0).all() and (d.brightness == 1).all() and (d.saturation == 1).all()
  d = _many_draws(A.AugmentParams(prob=1.0), n=200)
  assert d.flip.all() and (d.angle != 0).all() and (d.contrast != 1).all()


def test_flip_only_gives_input_or_mirror():
  x = _rand((32, 6, 6, 3), seed=10)
  params = A.AugmentParams(rotate=0.0, scale=(1, 1), translate=0.0, color_jitter=0.0)
  out = np.asarray(augment_batch(jax.random.key(5), jnp.asarray(x), params))
  same = (out == x).all(axis=(1, 2, 3))
  mirrored = (out == np.flip(x, 2)).all(axis=(1, 2, 3))
  assert (same | mirrored).all() and same.any() and mirrored.any()


def test_same_key_same_output_different_keys_differ():
  x = jnp.asarray(_rand((4, 10, 10, 3), seed=12))
  params = A.AugmentParams(prob=1.0)
  a = np.asarray(augment_batch(jax.random.key(0), x, params))
  b = np.asarray(augment_batch(jax.random.key(0), x, params))
  c = np.asarray(augment_batch(jax.random.key(1), x, params))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 0.05
  # Identical examples get different transforms within a batch.
  same = jnp.broadcast_to(x[:1], x.shape)
  d = np.asarray(augment_batch(jax.random.key(0), same, params))
  assert np.abs(d[0] - d[1]).max() > 0.05


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_jit_batch_equals_per_example(dtype):
  x = jnp.asarray(_rand((5, 10, 12, 3), seed=13), dtype)
  params = A.AugmentParams()
  key = jax.random.key(7)
  out = augment_batch(key, x, params)
  assert out.shape == x.shape and out.dtype == dtype
  keys = jax.random.split(key, x.shape[0])
  want = np.stack([np.asarray(augment_image(k, xi, params), np.float32)
                   for k, xi in zip(keys, x)])
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol)


_SHARDED_SCRIPT = textwrap.dedent('''
    import json, sys
    assert 'jax' not in sys.modules
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from camkd_jax import augment as A
    assert jax.device_count() == 4, jax.devices()
    images = np.random.RandomState(0).rand(8, 12, 12, 3).astype(np.float32)
    params = A.AugmentParams()
    key = jax.random.key(42)
    ref = np.asarray(jax.jit(A.augment_batch, static_argnums=2)(key, images, params))
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P('data'))
    x = jax.device_put(images, sharding)
    fn = jax.jit(A.augment_batch, static_argnums=2, out_shardings=sharding)
    out = fn(key, x, params)
    hlo = fn.lower(key, x, params).compile().as_text()
    comms = [op for op in ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute')
             if op in hlo]
    print(json.dumps(dict(max_diff=float(np.abs(np.asarray(out) - ref).max()),
                          changed=float(np.abs(ref - images).max()),
                          shards=len(out.addressable_shards), comms=comms)))
''')


def test_sharded_matches_unsharded():
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res['shards'] == 4
  assert res['changed'] > 0.05  # the run did augment
  assert res['max_diff'] < 1e-6, res
  assert not res['comms'], f'per-example augmentation should need no communication: {res}'
