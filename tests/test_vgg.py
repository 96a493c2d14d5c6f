"""camkd_jax.models.vgg: torchvision layout, named activations, staged forward, max-pool."""
import jax
import jax.numpy as jnp
import numpy as np

from camkd_jax.models import get_model
from camkd_jax.models import vgg


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


def test_register_model_adds_a_backbone_that_get_model_and_from_config_build(monkeypatch):
  """A second backbone (VGG11, configuration "A") registered by name is built by get_model and
  from_config, with the activations Grad-CAM reads; the registry is restored after the test."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from camkd_jax import models  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(models, '_REGISTRY', dict(models._REGISTRY))
  vgg11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))
  models.register_model('vgg11', lambda num_classes, width, dtype, **kw: vgg.VGG(
      num_classes, width=width, dtype=dtype, channels=vgg11, **kw))
  model = get_model('vgg11', 3, width=0.0625, input_mean=(0.5,) * 3, input_std=(0.25,) * 3)
  x = jnp.zeros((1, 16, 16, 3))
  logits, acts = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x)[0])
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))['params']
  # torchvision vgg11.features: convolutions at indices 0, 3, 6, 8, 11, 13, 16, 18.
  assert sorted(int(k.split('_')[1]) for k in params if k.startswith('features_')) == [
      0, 3, 6, 8, 11, 13, 16, 18]
  assert logits.shape == (1, 3) and acts['block5'].shape == (1, 1, 1, 32)
  cfg = ml_collections.ConfigDict({'name': 'vgg11', 'width': 0.0625, 'dtype': 'float32',
                                   'input_mean': (0.5,) * 3, 'input_std': (0.25,) * 3})
  assert models.from_config(cfg, 3) == model
  with pytest.raises(ValueError, match=r"known: \['vgg11', 'vgg16'\]"):
    get_model('resnet50', 3)
