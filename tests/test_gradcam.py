"""camkd_jax.gradcam: closed forms, per-class gradients, one forward for all classes, and the
second-order gradient of AT+ through the Grad-CAM gradient (finite differences, float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camkd_jax import gradcam
import reference_np as ref


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


SECOND_ORDER = r'''
import jax, jax.numpy as jnp, numpy as np
from jax.test_util import check_grads
from camkd_jax import gradcam, losses
from camkd_jax.models import vgg
# float64 end to end (x64 mode, float64 params) so finite differences are meaningful.
model = vgg.VGG(3, width=0.0625, dtype=jnp.float64)
p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']
p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
pt = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))['params']
pt = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), pt)
x = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 3), jnp.float64)
_, _, mt = gradcam.gradcam(model, {'params': pt}, x, 'block4')
def at(params):
  _, _, ms = gradcam.gradcam(model, {'params': params}, x, 'block4')
  return jnp.mean(losses.per_sample_rmse(losses.minmax_normalize(ms), losses.minmax_normalize(mt)))
# The loss depends on params only through d logits / d A (second order) and A itself.
check_grads(at, (p,), order=1, modes=('rev',), eps=1e-6, atol=1e-5, rtol=1e-4)
# And the gradient through the Grad-CAM gradient alone is non-zero: freeze A, vary the tail.
g = jax.grad(at)(p)
print('OK', float(jnp.abs(g['features_28']['kernel']).sum()))
'''


def test_at_plus_second_order_gradient_check(python_runner):
  out = python_runner(SECOND_ORDER, {'JAX_ENABLE_X64': '1'})
  assert out.startswith('OK'), out
  assert float(out.split()[1]) > 0
