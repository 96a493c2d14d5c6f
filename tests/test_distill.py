"""camkd_jax.distill: the fused train step (terms, teacher untouched, non-finite guard) and
the zero-weight terms left out of the compiled program."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from camkd_jax import distill
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
  before = jax.tree_util.tree_map(np.array, state['params'])
  batch = sharding.shard_batch(_batch(4), mesh)
  for _ in range(2):
    state, _ = step(state, bad_teacher, batch)
  assert int(state['bad_step']) == 0
  # A NaN teacher poisons KD, the total and the gradient; CE stays finite.
  assert distill.decode_bad_terms(int(state['bad_terms'])) == ['kd', 'total', 'gradients']
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         state['params'], before)
