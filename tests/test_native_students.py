"""Native low-resolution students (issue 13): the student sees the pooled S / f image at its own
size; FM and AT+ maps of different sizes are matched against NumPy float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference_np as ref
from camkd_jax import distill
from camkd_jax import gradcam
from camkd_jax import losses
from camkd_jax import ops
from camkd_jax import saliency
from camkd_jax import sharding
from camkd_jax import train
from camkd_jax.models import get_model
from configs import attn_kd


@pytest.fixture(scope='module')
def tiny():
  model = get_model('vgg16', 4, width=0.0625)
  teacher = distill.init_params(model, jax.random.PRNGKey(0), 64)
  student = distill.init_params(model, jax.random.PRNGKey(1), 64)
  images = np.random.RandomState(0).randint(0, 256, (4, 64, 64, 3)).astype(np.uint8)
  return model, teacher, student, images


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


def _saliencies(tiny, factor):
  model, tp, sp, images = tiny
  x = jnp.asarray(images, jnp.float32) / 255.0
  t = gradcam.forward_with_grads(model, {'params': tp}, x, ('block5',))
  s = gradcam.forward_with_grads(model, {'params': sp}, ops.student_view(x, factor, 'native'),
                                 ('block5',))
  return s, t


def test_native_fm_resizes_the_student_up_as_numpy(tiny):
  s, t = _saliencies(tiny, 2)
  s5, t5 = np.asarray(s.acts['block5'], np.float64), np.asarray(t.acts['block5'], np.float64)
  assert s5.shape[1:3] == (2, 2) and t5.shape[1:3] == (4, 4)
  up = ref.bilinear_align_corners(s5, 4, 4)
  want = np.sqrt(np.mean((up - t5) ** 2))
  got = float(losses.fm_loss(s.acts['block5'], t.acts['block5']))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('resize', ['student_to_teacher', 'teacher_to_student'])
def test_native_at_plus_matches_numpy_in_both_resize_directions(tiny, resize):
  s, t = _saliencies(tiny, 2)
  labels = jnp.arange(4) % 4
  spec = saliency.build(resize=resize)
  got = float(spec.loss_fn(s, t, labels))
  sm = np.asarray(saliency.gradcam_plus(s, 'block5', labels), np.float64)  # (B, 2, 2, C)
  tm = np.asarray(saliency.gradcam_plus(t, 'block5', labels), np.float64)  # (B, 4, 4, C)
  if resize == 'student_to_teacher':
    sm = ref.bilinear_align_corners(sm, 4, 4)
  else:
    tm = ref.bilinear_align_corners(tm, 2, 2)
  sn, tn = ref.minmax(sm), ref.minmax(tm)
  want = np.mean([np.sqrt(np.mean((sn[b] - tn[b]) ** 2)) for b in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_native_eval_step_runs_the_model_on_the_pooled_image(tiny):
  model, _, sp, images = tiny
  mesh = sharding.make_mesh(jax.devices()[:1])
  got = np.asarray(distill.make_eval_step(model, 4, mesh, 'native')(sp, images))
  x = ref.avg_pool(images.astype(np.float64) / 255.0, 4).astype(np.float32)
  want, _ = model.apply({'params': sp}, jnp.asarray(x))
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def test_native_student_costs_about_one_over_f_squared(tiny):
  """XLA's FLOP count of the student's forward: native needs at most ~1 / f^2 of the upsampled
  student's (measured at width 1/16, 64 px: 4.0x at f = 2, 22.6x at f = 4: the upsampled view
  also pays for the bilinear resize, which is large next to so thin a network)."""
  model, _, sp, images = tiny
  x = jnp.asarray(images, jnp.float32) / 255.0
  for f in (2, 4):
    fl = {v: _flops(lambda p, x: model.apply({'params': p}, ops.student_view(x, f, v))[0], sp, x)
          for v in ('upsampled', 'native')}
    ratio = fl['upsampled'] / fl['native']
    assert ratio >= 0.9 * f * f, (f, fl)


def test_native_train_step_is_finite_and_updates(tiny):
  model, tp, sp, images = tiny
  mesh = sharding.make_mesh(jax.devices()[:1])
  cfg = distill.StepConfig(factor=2, view='native', weights=(('ce', 1.), ('kd', 1.), ('fm', .1),
                                                             ('at', 10.), ('sr', 1.)))
  tx = optax.adam(1e-3)
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model)
  state = sharding.replicate(distill.create_train_state(sp, tx, jax.random.PRNGKey(2)), mesh)
  batch = {'image': images, 'label': np.arange(4, dtype=np.int32) % 4}
  state, m = step(state, sharding.replicate(tp, mesh), sharding.shard_batch(batch, mesh))
  assert int(state['bad_step']) == -1
  assert set(m) >= {'loss/ce', 'loss/kd', 'loss/fm', 'loss/at', 'loss/sr'}
  assert all(np.isfinite(float(v)) for v in m.values())
  assert not np.array_equal(np.asarray(state['params']['features_0']['kernel']),
                            sp['features_0']['kernel'])


@pytest.mark.parametrize('mag,size,ok', [(5.0, 64, True), (2.5, 64, True), (1.25, 64, False),
                                         (0.3125, 512, True), (0.3125, 256, False)])
def test_native_input_under_16_px_is_refused_naming_the_sizes(mag, size, ok):
  c = attn_kd.get_config(f'magnification={mag}')
  c.image_size = size
  c.student.view = 'native'
  if ok:
    train.validate_view(c, ops.magnification_factor(mag))
    return
  f = ops.magnification_factor(mag)
  with pytest.raises(ValueError, match=rf'{size // f}x{size // f} px inputs .*'
                                       rf'image_size={size} / factor {f}.*at least 16x16'):
    train.validate_config(c, 1)


def test_unknown_view_is_refused():
  c = attn_kd.get_config()
  c.student.view = 'full'
  with pytest.raises(ValueError, match=r"unknown config.student.view 'full'"):
    train.validate_config(c, 1)


SHARDED_NATIVE = r'''
import jax, numpy as np, optax
from camkd_jax import distill, sharding
from camkd_jax.models import get_model
assert jax.device_count() == 4, jax.devices()
model = get_model('vgg16', 4, width=0.0625)
tp = distill.init_params(model, jax.random.PRNGKey(0), 32)
sp = distill.init_params(model, jax.random.PRNGKey(1), 32)
r = np.random.RandomState(0)
batch = {'image': r.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8),
         'label': (np.arange(8) % 4).astype(np.int32)}
cfg = distill.StepConfig(factor=2, view='native',
                         weights=(('ce', 1.), ('kd', 1.), ('fm', .1), ('at', 10.)))
out = {}
for name, devs in (('one', jax.devices()[:1]), ('four', jax.devices())):
  mesh = sharding.make_mesh(devs)
  tx = optax.adam(1e-3)
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model)
  state = distill.create_train_state(sp, tx, jax.random.PRNGKey(2))
  tpr = sharding.replicate(tp, mesh)
  for _ in range(2):
    state, m = step(state, tpr, sharding.shard_batch(batch, mesh))
  logits = distill.make_eval_step(model, 2, mesh, 'native')(state['params'],
                                                           sharding.shard_batch(batch, mesh)['image'])
  out[name] = (jax.tree_util.tree_map(np.asarray, state['params']),
               {k: float(v) for k, v in m.items()}, np.asarray(logits))
(pa, ma, la), (pb, mb, lb) = out['one'], out['four']
for k in ma:
  np.testing.assert_allclose(ma[k], mb[k], rtol=2e-4, atol=1e-6, err_msg=k)
np.testing.assert_allclose(la, lb, rtol=1e-3, atol=1e-5)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), pa, pb)
print('OK')
'''


def test_native_sharded_equals_unsharded(python_runner):
  out = python_runner(SHARDED_NATIVE, {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert out.startswith('OK'), out


@pytest.mark.slow
def test_native_student_end_to_end(tmp_path):
  """The driver with a native 5x student (16 px inputs from 32 px smoke images): report, exported
  metadata and figure say native, and the student was evaluated on its own view."""
  import json  # pylint: disable=g-import-not-at-top
  from camkd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  c = attn_kd.get_config('smoke=1,magnification=5')
  c.student.view = 'native'
  c.num_figure_images = 2
  out = train.run(c, str(tmp_path))
  assert out['student']['view'] == 'native' and out['student']['factor'] == 2
  meta = checkpoints.read_metadata(str(tmp_path / 'student'))
  assert meta['view'] == 'native' and meta['report']['view'] == 'native'
  assert checkpoints.read_metadata(str(tmp_path / 'teacher'))['view'] == 'upsampled'
  with open(tmp_path / 'figures' / 'gradcam.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['student']['view'] == 'native'
  cm = np.asarray(out['student']['test']['confusion_matrix'])
  assert cm.sum() == out['student']['test']['num_examples'] == 32
