"""camkd_jax.ops: the student view, align-corners resizing and the magnification factor,
against NumPy float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camkd_jax import ops
import reference_np as ref


@pytest.mark.parametrize('shape,size', [((2, 4, 4, 3), (9, 7)), ((1, 5, 3, 2), (2, 8)),
                                        ((1, 6, 6, 1), (1, 1)), ((1, 1, 1, 2), (3, 3))])
def test_resize_align_corners_matches_numpy(shape, size):
  x = np.random.RandomState(0).randn(*shape).astype(np.float32)
  got = np.asarray(ops.resize_align_corners(jnp.asarray(x), size))
  np.testing.assert_allclose(got, ref.bilinear_align_corners(x, *size), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('factor', [1, 2, 4, 8])
def test_student_view_matches_numpy(factor):
  x = np.random.RandomState(factor).rand(2, 16, 16, 3).astype(np.float32)
  got = np.asarray(ops.student_view(jnp.asarray(x), factor))
  want = x if factor == 1 else ref.bilinear_align_corners(ref.avg_pool(x, factor), 16, 16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_student_view_rejects_indivisible_size():
  with pytest.raises(ValueError, match='not divisible by the down-sampling factor 4'):
    ops.student_view(jnp.zeros((1, 10, 10, 3)), 4)


@pytest.mark.parametrize('m,f', [(10, 1), (5, 2), (2.5, 4), (1.25, 8), (0.625, 16)])
def test_magnification_factor(m, f):
  assert ops.magnification_factor(m) == f


@pytest.mark.parametrize('m', [3, 20, 0.7, 0])
def test_magnification_factor_rejects(m):
  with pytest.raises((ValueError, ZeroDivisionError)):
    ops.magnification_factor(m)


def test_native_view_is_the_pooled_image_at_its_own_size():
  x = np.random.RandomState(1).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
  for f in (2, 4):
    got = np.asarray(ops.student_view(jnp.asarray(x), f, 'native'))
    assert got.shape == (2, 16 // f, 16 // f, 3)
    np.testing.assert_allclose(got, ref.avg_pool(x, f), rtol=1e-6, atol=1e-7)
    up = np.asarray(ops.student_view(jnp.asarray(x), f, 'upsampled'))
    np.testing.assert_allclose(up, ref.bilinear_align_corners(ref.avg_pool(x, f), 16, 16),
                               rtol=1e-5, atol=1e-6)
  assert ops.student_input_size(512, 4, 'native') == 128
  assert ops.student_input_size(512, 4, 'upsampled') == 512
  with pytest.raises(ValueError, match="unknown student view 'full'"):
    ops.student_view(jnp.asarray(x), 2, 'full')




def test_check_view_names_where_the_view_came_from():
  assert [ops.check_view(v) for v in ops.VIEWS] == list(ops.VIEWS)
  with pytest.raises(ValueError, match=r"^unknown student view 'full'; known: \['upsampled', "
                                       r"'native'\]$"):
    ops.check_view('full')
  with pytest.raises(ValueError, match=r"^unknown config.student.view 'x'; known: "):
    ops.check_view('x', 'config.student.view')
