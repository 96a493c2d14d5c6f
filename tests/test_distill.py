"""camkd_jax.distill: the fused train step (terms, teacher untouched, non-finite guard) and
the zero-weight terms left out of the compiled program."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from camkd_jax import distill
from camkd_jax import gradcam
from camkd_jax import losses
from camkd_jax import ops
from camkd_jax import saliency
from camkd_jax import sharding
from camkd_jax.models import get_model
import reference_np as ref


ALL_TERMS = (('ce', 1.0), ('kd', 1.0), ('fm', 0.1), ('at', 10.0), ('sr', 1.0))


def _batch(n=8, size=32, seed=0):
  r = np.random.RandomState(seed)
  return {'image': r.randint(0, 256, (n, size, size, 3)).astype(np.uint8),
          'label': (np.arange(n) % 4).astype(np.int32)}


@pytest.fixture(scope='module')
def setup():
  model = get_model('vgg16', 4, width=0.0625)
  tparams = distill.init_params(model, jax.random.PRNGKey(0), 32)
  sparams = distill.init_params(model, jax.random.PRNGKey(1), 32)
  return model, tparams, sparams


def test_distill_step_equals_its_parts_and_keeps_teacher(setup):
  """One compiled SGD step == the eager loss terms and gradient; CE against NumPy; the teacher's
  parameters are untouched."""
  model, tparams, sparams = setup
  mesh = sharding.make_mesh()
  tx = optax.sgd(0.1)
  cfg = distill.StepConfig(factor=4, weights=ALL_TERMS)  # no augmentation
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model, donate=False)
  teacher_before = jax.tree_util.tree_map(np.array, tparams)
  state = distill.create_train_state(sparams, tx, jax.random.PRNGKey(2))
  batch = _batch()
  state, metrics = step(state, tparams, sharding.shard_batch(batch, mesh))
  metrics = {k: float(v) for k, v in metrics.items()}
  x, labels = jnp.asarray(batch['image'], jnp.float32) / 255.0, jnp.asarray(batch['label'])
  (total, terms), grads = jax.value_and_grad(
      lambda p: distill.compute_losses(cfg, model, p, model, tparams, x, labels),
      has_aux=True)(sparams)
  assert set(metrics) == {'loss/ce', 'loss/kd', 'loss/fm', 'loss/at', 'loss/sr', 'loss/total',
                          'grad_norm'}
  for term, weight in ALL_TERMS:
    assert metrics[f'loss/{term}'] == pytest.approx(float(terms[term]), rel=1e-5), term
  assert metrics['loss/total'] == pytest.approx(
      sum(w * metrics[f'loss/{t}'] for t, w in ALL_TERMS), rel=1e-6)
  assert metrics['loss/total'] == pytest.approx(float(total), rel=1e-5)
  # CE on the student view (avg-pool 4, upsample), with a float64 NumPy log-softmax.
  logits, _ = model.apply({'params': sparams}, ops.student_view(x, 4))
  logp = ref.log_softmax(np.asarray(logits, np.float64))
  assert metrics['loss/ce'] == pytest.approx(-logp[np.arange(8), batch['label']].mean(), rel=1e-5)
  flat = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)]
  assert metrics['grad_norm'] == pytest.approx(np.sqrt(sum((g * g).sum() for g in flat)),
                                               rel=1e-4)
  want = jax.tree_util.tree_map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), sparams, grads)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         jax.tree_util.tree_map(np.asarray, state['params']), want)
  assert int(state['step']) == 1 and int(state['bad_step']) == -1
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         tparams, teacher_before)


def test_zero_weight_removes_term_from_program(setup):
  model, tparams, sparams = setup
  mesh = sharding.make_mesh()
  tx = optax.adam(1e-3)
  batch = sharding.shard_batch(_batch(4), mesh)
  cfg = distill.StepConfig(factor=2, weights=(('ce', 1.0), ('kd', 0.0), ('fm', 0.5), ('at', 0.0)))
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model, donate=False)
  state = distill.create_train_state(sparams, tx, jax.random.PRNGKey(2))
  _, metrics = step(state, tparams, batch)
  assert set(metrics) == {'loss/ce', 'loss/fm', 'loss/total', 'grad_norm'}
  # No Grad-CAM VJP is traced when at == 0. With AT+ at block4 the class-gradient VJP through
  # block5's convs (and its second-order backward) adds convolutions to the compiled program.
  hlo_off = step.lower(state, tparams, batch).compile().as_text()
  cfg_on = distill.StepConfig(factor=2, weights=(('ce', 1.0), ('fm', 0.5), ('at', 1.0)),
                              saliency=saliency.build(layers=('block4',)))
  step_on = distill.make_train_step(cfg_on, model, tx, mesh, teacher=model, donate=False)
  hlo_on = step_on.lower(state, tparams, batch).compile().as_text()
  n_off, n_on = hlo_off.count(' convolution('), hlo_on.count(' convolution(')
  assert 0 < n_off < n_on, (n_off, n_on)


def test_teacher_stage_needs_no_teacher(setup):
  model, _, sparams = setup
  mesh = sharding.make_mesh()
  tx = optax.adam(1e-3)
  cfg = distill.StepConfig(factor=1)
  step = distill.make_train_step(cfg, model, tx, mesh)
  state = distill.create_train_state(sparams, tx, jax.random.PRNGKey(2))
  state, metrics = step(state, None, sharding.shard_batch(_batch(4), mesh))
  assert set(metrics) == {'loss/ce', 'loss/total', 'grad_norm'}
  with pytest.raises(ValueError, match='need a teacher'):
    distill.make_train_step(distill.StepConfig(weights=ALL_TERMS), model, tx, mesh)


def test_nonfinite_term_freezes_state_and_names_term(setup):
  model, tparams, sparams = setup
  mesh = sharding.make_mesh()
  tx = optax.adam(1e-3)
  bad_teacher = jax.tree_util.tree_map(lambda a: a * np.nan, tparams)
  cfg = distill.StepConfig(factor=2, weights=(('ce', 1.0), ('kd', 1.0)))
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model)
  state = distill.create_train_state(sparams, tx, jax.random.PRNGKey(2))
  before = jax.tree_util.tree_map(np.array, (state['params'], state['opt_state']))
  batch = sharding.shard_batch(_batch(4), mesh)
  for _ in range(2):
    state, metrics = step(state, bad_teacher, batch)
  assert int(state['bad_step']) == 0
  # A NaN teacher poisons KD, the total and the gradient; CE stays finite.
  assert distill.decode_bad_terms(int(state['bad_terms'])) == ['kd', 'total', 'gradients']
  assert not np.isfinite(float(metrics['grad_norm']))
  # The parameters are frozen at the first bad step (the run stops before the optimiser's
  # moments of that step could be used or saved).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         state['params'], before[0])
  assert int(state['step']) == 2


# ----------------------------------------------------------------------------- native students
@pytest.fixture(scope='module')
def tiny64():
  """(model, teacher params, student params, uint8 images): width 1/16 VGG16, 64 px."""
  model = get_model('vgg16', 4, width=0.0625)
  teacher = distill.init_params(model, jax.random.PRNGKey(0), 64)
  student = distill.init_params(model, jax.random.PRNGKey(1), 64)
  images = np.random.RandomState(0).randint(0, 256, (4, 64, 64, 3)).astype(np.uint8)
  return model, teacher, student, images


def _saliencies(tiny64, factor):
  model, tp, sp, images = tiny64
  x = jnp.asarray(images, jnp.float32) / 255.0
  t = gradcam.forward_with_grads(model, {'params': tp}, x, ('block5',))
  s = gradcam.forward_with_grads(model, {'params': sp}, ops.student_view(x, factor, 'native'),
                                 ('block5',))
  return s, t


def test_native_fm_resizes_the_student_up_as_numpy(tiny64):
  s, t = _saliencies(tiny64, 2)
  s5, t5 = np.asarray(s.acts['block5'], np.float64), np.asarray(t.acts['block5'], np.float64)
  assert s5.shape[1:3] == (2, 2) and t5.shape[1:3] == (4, 4)
  up = ref.bilinear_align_corners(s5, 4, 4)
  want = np.sqrt(np.mean((up - t5) ** 2))
  got = float(losses.fm_loss(s.acts['block5'], t.acts['block5']))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('resize', ['student_to_teacher', 'teacher_to_student'])
def test_native_at_plus_matches_numpy_in_both_resize_directions(tiny64, resize):
  s, t = _saliencies(tiny64, 2)
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


def test_native_eval_step_runs_the_model_on_the_pooled_image(tiny64):
  model, _, sp, images = tiny64
  mesh = sharding.make_mesh(jax.devices()[:1])
  got = np.asarray(distill.make_eval_step(model, 4, mesh, 'native')(sp, images))
  x = ref.avg_pool(images.astype(np.float64) / 255.0, 4).astype(np.float32)
  want, _ = model.apply({'params': sp}, jnp.asarray(x))
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def test_native_student_costs_about_one_over_f_squared(tiny64):
  """XLA's FLOP count of the student's forward: native needs at most ~1 / f^2 of the upsampled
  student's (measured at width 1/16, 64 px: 4.0x at f = 2, 22.6x at f = 4: the upsampled view
  also pays for the bilinear resize, which is large next to so thin a network)."""
  model, _, sp, images = tiny64
  x = jnp.asarray(images, jnp.float32) / 255.0
  for f in (2, 4):
    fl = {v: _flops(lambda p, x: model.apply({'params': p}, ops.student_view(x, f, v))[0], sp, x)
          for v in ('upsampled', 'native')}
    ratio = fl['upsampled'] / fl['native']
    assert ratio >= 0.9 * f * f, (f, fl)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_native_train_step_is_finite_and_updates(tiny64, dtype):
  _, tp, sp, images = tiny64
  model = get_model('vgg16', 4, width=0.0625, dtype=dtype)
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
  assert state['params']['features_0']['kernel'].dtype == jnp.float32  # bf16 compute only
