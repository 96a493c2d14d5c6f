"""camkd_jax.losses: every term against NumPy float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camkd_jax import losses
import reference_np as ref


def test_cross_entropy_and_kd_against_numpy():
  r = np.random.RandomState(0)
  s, t = r.randn(5, 4).astype(np.float32), r.randn(5, 4).astype(np.float32)
  y = r.randint(0, 4, 5)
  ls = ref.log_softmax(s)
  np.testing.assert_allclose(losses.cross_entropy(s, y), -ls[np.arange(5), y].mean(), rtol=1e-5)
  for temp in (1.0, 3.0):
    target = np.exp(ref.log_softmax(t / temp))
    np.testing.assert_allclose(losses.kd_loss(s, t, temp, 'reference'),
                               (-target * ls).sum(-1).mean(), rtol=1e-5)
    hinton = temp ** 2 * (target * (ref.log_softmax(t / temp) - ref.log_softmax(s / temp))
                          ).sum(-1).mean()
    np.testing.assert_allclose(losses.kd_loss(s, t, temp, 'hinton'), hinton, rtol=1e-5)
  with pytest.raises(ValueError, match='unknown KD form'):
    losses.kd_loss(s, t, 1.0, 'nope')


def test_fm_resizes_student_to_teacher():
  r = np.random.RandomState(1)
  fs, ft = r.randn(2, 4, 4, 3).astype(np.float32), r.randn(2, 8, 8, 3).astype(np.float32)
  want = np.sqrt(((ref.bilinear_align_corners(fs, 8, 8) - ft) ** 2).mean())
  np.testing.assert_allclose(losses.fm_loss(fs, ft), want, rtol=1e-5)


def _normalize(norm, maps, temperature=0.01):
  if norm == 'minmax':
    return losses.minmax_normalize(maps)
  return losses.softmax_normalize(maps, temperature)


@pytest.mark.parametrize('norm', ['minmax', 'softmax'])
def test_at_plus_parts_against_numpy(norm):
  """The normalisations and the per-sample RMSE that AT+ (saliency.py) is built from."""
  r = np.random.RandomState(2)
  ms, mt = r.rand(3, 4, 4, 4).astype(np.float32), r.rand(3, 4, 4, 4).astype(np.float32)
  nrm = ref.minmax if norm == 'minmax' else (lambda m: ref.softmax_all(m, 0.5))
  np.testing.assert_allclose(_normalize(norm, ms, 0.5), nrm(ms.astype(np.float64)), rtol=1e-5,
                             atol=1e-7)
  d = nrm(ms.astype(np.float64)) - nrm(mt.astype(np.float64))
  want = np.sqrt((d ** 2).reshape(3, -1).mean(-1))
  got = losses.per_sample_rmse(_normalize(norm, ms, 0.5), _normalize(norm, mt, 0.5))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sr_against_numpy():
  r = np.random.RandomState(3)
  a, b = r.randn(4, 4), r.randn(4, 4)
  np.testing.assert_allclose(losses.sr_loss(a, b), np.sqrt(((a - b) ** 2).mean()), rtol=1e-5)


def at_plus(student_maps, teacher_maps, norm):
  """AT+ on map stacks of one size: batch mean of the per-sample RMSE of the normalised maps."""
  return jnp.mean(losses.per_sample_rmse(_normalize(norm, student_maps),
                                         _normalize(norm, jax.lax.stop_gradient(teacher_maps))))


@pytest.mark.parametrize('norm', ['minmax', 'softmax'])
def test_at_plus_constant_maps_finite(norm):
  const = jnp.full((2, 4, 4, 4), 0.7)
  zero = jnp.zeros((2, 4, 4, 4))
  for s, t in ((const, const), (zero, const), (const, zero), (zero, zero)):
    val, g = jax.value_and_grad(lambda m: at_plus(m, t, norm))(s)
    assert np.isfinite(float(val)) and np.all(np.isfinite(g)), (norm, s[0, 0, 0, 0], t[0, 0, 0, 0])
  assert float(at_plus(const, const, norm)) == 0.0


def test_rmse_zero_difference_has_finite_gradient():
  a = jnp.ones((2, 3))
  g = jax.grad(lambda x: losses.rmse(x, a))(a)
  assert np.all(np.isfinite(g))
