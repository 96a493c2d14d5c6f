"""Core maths: student view, Grad-CAM, loss terms (issue 2), against NumPy float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camkd_jax import gradcam
from camkd_jax import losses
from camkd_jax import ops
from camkd_jax.models import get_model
from camkd_jax.models import vgg
import reference_np as ref


@pytest.fixture(scope='module')
def tiny():
  model = get_model('vgg16', 4, width=0.0625)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3))
  return model, variables, x


# ----------------------------------------------------------------------------- ops
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


# ----------------------------------------------------------------------------- model
def test_vgg16_shapes_match_torchvision_layout():
  model = get_model('vgg16', 4, width=1.0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  p = shapes['params']
  convs = sorted((int(k.split('_')[1]), v['kernel'].shape) for k, v in p.items()
                 if k.startswith('features_'))
  # torchvision vgg16.features: conv indices and (out, in) channels.
  tv = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256),
        (14, 256, 256), (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512),
        (26, 512, 512), (28, 512, 512)]
  assert [(i, (3, 3, cin, cout)) for i, cout, cin in tv] == convs
  assert p['classifier']['kernel'].shape == (512, 4)


def test_vgg_block5_is_pre_relu_and_512_input_gives_32x32():
  model = get_model('vgg16', 4, width=1.0)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((1, 512, 512, 3)))[0])
  assert out[1]['block5'].shape == (1, 32, 32, 512)
  assert out[0].shape == (1, 4)


def test_vgg_block5_has_negative_values(tiny):
  model, variables, x = tiny
  _, acts = model.apply(variables, x)
  assert float(acts['block5'].min()) < 0 < float(acts['block4'].min()) + 1  # block5: no ReLU
  assert float(acts['block4'].min()) >= 0                                     # block4: ReLU+pool


def test_vgg_staged_equals_full(tiny):
  model, variables, x = tiny
  logits, acts = model.apply(variables, x)
  for start in vgg.BLOCKS:
    l2, _ = model.apply(variables, acts[start], start=start)
    np.testing.assert_allclose(l2, logits, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize('mode', ['atplus', 'classic'])
def test_gradcam_block5_closed_form(tiny, mode):
  model, variables, x = tiny
  logits, act, maps = gradcam.gradcam(model, variables, x, 'block5', mode)
  a = np.asarray(act, np.float64)
  wk = np.asarray(variables['params']['classifier']['kernel'], np.float64)   # (K, C)
  h, w = a.shape[1:3]
  # d logit_c / dA_k = W[k, c] / (H W), the same for every sample.
  weights = np.broadcast_to((wk.T / (h * w))[:, None, :], (wk.shape[1], a.shape[0], wk.shape[0]))
  want = ref.cam_plus(a, weights) if mode == 'atplus' else ref.cam_classic(a, weights)
  assert maps.shape == (3, h, w, 4)
  np.testing.assert_allclose(np.asarray(maps), want, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(logits, model.apply(variables, x)[0], rtol=1e-6)


def test_gradcam_block4_equals_per_class_grad(tiny):
  model, variables, x = tiny
  _, acts = model.apply(variables, x)
  a4 = acts['block4']
  s = gradcam.forward_with_grads(model, variables, x, ['block4'])
  # Independent route: one jax.grad per class through the full forward, via a perturbation.
  for c in range(4):
    g = jax.grad(lambda d: model.apply(variables, x, perturb={'block4': d})[0][:, c].sum())(
        jnp.zeros_like(a4))
    np.testing.assert_allclose(s.grads['block4'][c], g, rtol=1e-4, atol=1e-7)
  # And one finite difference on a single activation element (sample 1, position (0,0), ch 2).
  eps = 1e-3
  d = jnp.zeros_like(a4).at[1, 0, 0, 2].set(eps)
  lp = model.apply(variables, x, perturb={'block4': d})[0]
  lm = model.apply(variables, x, perturb={'block4': -d})[0]
  fd = (lp - lm)[1] / (2 * eps)
  np.testing.assert_allclose(s.grads['block4'][:, 1, 0, 0, 2], fd, rtol=2e-2, atol=1e-4)
  w = np.asarray(s.grads['block4'], np.float64).mean(axis=(2, 3))
  _, _, maps = gradcam.gradcam(model, variables, x, 'block4', 'atplus')
  np.testing.assert_allclose(maps, ref.cam_plus(np.asarray(a4, np.float64), w),
                             rtol=1e-4, atol=1e-7)


def test_multi_layer_grads_equal_single_layer(tiny):
  model, variables, x = tiny
  both = gradcam.forward_with_grads(model, variables, x, ['block5', 'block3'])
  for layer in ('block3', 'block5'):
    one = gradcam.forward_with_grads(model, variables, x, [layer])
    np.testing.assert_allclose(both.grads[layer], one.grads[layer], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(both.acts[layer], one.acts[layer], rtol=1e-6)


def test_gradcam_input_layer_is_input_gradient(tiny):
  model, variables, x = tiny
  s = gradcam.forward_with_grads(model, variables, x, ['input'])
  g = jax.grad(lambda xx: model.apply(variables, xx)[0][:, 3].sum())(x)
  np.testing.assert_allclose(s.grads['input'][3], g, rtol=1e-4, atol=1e-7)


def test_gradcam_is_one_forward_no_class_loop(tiny):
  """The jaxpr has one set of forward convolutions (13) plus the vmapped backward ones."""
  model, variables, x = tiny
  jaxpr = jax.make_jaxpr(lambda v, xx: gradcam.gradcam(model, v, xx, 'block3'))(variables, x)
  text = str(jaxpr)
  # Forward: 13 convs. Backward from the logits to block3's output runs through the 6 convs of
  # blocks 4 and 5, each transposed once for all classes (vmapped) -> 6, not 6 * num_classes.
  n = text.count('conv_general_dilated')
  assert n == 13 + 6, n


# ----------------------------------------------------------------------------- losses
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


@pytest.mark.parametrize('norm', ['minmax', 'softmax'])
def test_at_plus_against_numpy(norm):
  r = np.random.RandomState(2)
  ms, mt = r.rand(3, 4, 4, 4).astype(np.float32), r.rand(3, 4, 4, 4).astype(np.float32)
  nrm = ref.minmax if norm == 'minmax' else (lambda m: ref.softmax_all(m, 0.5))
  d = nrm(ms.astype(np.float64)) - nrm(mt.astype(np.float64))
  want = np.sqrt((d ** 2).reshape(3, -1).mean(-1)).mean()
  np.testing.assert_allclose(losses.at_plus_loss(ms, mt, norm, 0.5), want, rtol=1e-5)


def test_sr_against_numpy():
  r = np.random.RandomState(3)
  a, b = r.randn(4, 4), r.randn(4, 4)
  np.testing.assert_allclose(losses.sr_loss(a, b), np.sqrt(((a - b) ** 2).mean()), rtol=1e-5)


@pytest.mark.parametrize('norm', ['minmax', 'softmax'])
def test_at_plus_constant_maps_finite(norm):
  const = jnp.full((2, 4, 4, 4), 0.7)
  zero = jnp.zeros((2, 4, 4, 4))
  for s, t in ((const, const), (zero, const), (const, zero), (zero, zero)):
    val, g = jax.value_and_grad(lambda m: losses.at_plus_loss(m, t, norm))(s)
    assert np.isfinite(float(val)) and np.all(np.isfinite(g)), (norm, s[0, 0, 0, 0], t[0, 0, 0, 0])
  assert float(losses.at_plus_loss(const, const, norm)) == 0.0


def test_rmse_zero_difference_has_finite_gradient():
  a = jnp.ones((2, 3))
  g = jax.grad(lambda x: losses.rmse(x, a))(a)
  assert np.all(np.isfinite(g))


def test_max_pool_2x2_equals_flax_max_pool_and_numpy():
  import flax.linen as nn
  x = np.random.RandomState(5).randn(2, 9, 6, 3).astype(np.float32)
  got = np.asarray(vgg.max_pool_2x2(jnp.asarray(x)))
  np.testing.assert_array_equal(got, nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2)))
  want = np.array([[[x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c].max() for c in range(3)]
                    for j in range(3)] for i in range(4) for b in [0]]).reshape(4, 3, 3)
  np.testing.assert_array_equal(got[0], want)
  # The gradient lands on each window's argmax (no ties in random data), as flax's does.
  g = np.random.RandomState(6).randn(2, 4, 3, 3).astype(np.float32)
  grad = np.asarray(jax.vjp(vgg.max_pool_2x2, jnp.asarray(x))[1](jnp.asarray(g))[0])
  want_grad = np.zeros_like(x)
  for b, i, j, c in np.ndindex(g.shape):
    win = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
    di, dj = np.unravel_index(np.argmax(win), win.shape)
    want_grad[b, 2 * i + di, 2 * j + dj, c] = g[b, i, j, c]
  np.testing.assert_array_equal(grad, want_grad)
