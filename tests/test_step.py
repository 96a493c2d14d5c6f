"""The fused train step, second-order gradients, sharding and weight import (issue 2)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from camkd_jax import distill
from camkd_jax import saliency
from camkd_jax import sharding
from camkd_jax import weights
from camkd_jax.models import get_model

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


def test_distill_step_lowers_loss_and_keeps_teacher(setup):
  model, tparams, sparams = setup
  mesh = sharding.make_mesh()
  tx = optax.adam(3e-3)
  cfg = distill.StepConfig(factor=4, weights=ALL_TERMS)
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model)
  teacher_before = jax.tree_util.tree_map(np.array, tparams)
  state = distill.create_train_state(sparams, tx, jax.random.PRNGKey(2))
  batch = sharding.shard_batch(_batch(), mesh)
  totals = []
  for _ in range(8):
    state, metrics = step(state, tparams, batch)
    totals.append(float(metrics['loss/total']))
  assert set(metrics) == {'loss/ce', 'loss/kd', 'loss/fm', 'loss/at', 'loss/sr', 'loss/total',
                          'grad_norm'}
  assert totals[-1] < totals[0], totals
  assert int(state['step']) == 8 and int(state['bad_step']) == -1
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
  assert 'kd' in distill.decode_bad_terms(int(state['bad_terms']))
  assert 'ce' not in distill.decode_bad_terms(int(state['bad_terms']))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         state['params'], before)


def test_batch_not_divisible_by_devices_is_named():
  mesh = sharding.make_mesh()

  class FakeMesh:
    shape = {'data': 4}
  sharding.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by the number of devices'):
    sharding.check_batch_size(6, FakeMesh())


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
  return losses.at_plus_loss(ms.astype(jnp.float64), mt)
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


SHARDED = r'''
import json, jax, numpy as np, optax
from camkd_jax import distill, augment, sharding
from camkd_jax.models import get_model
assert jax.device_count() == 4, jax.devices()
model = get_model('vgg16', 4, width=0.0625)
tp = distill.init_params(model, jax.random.PRNGKey(0), 32)
sp = distill.init_params(model, jax.random.PRNGKey(1), 32)
r = np.random.RandomState(0)
batch = {'image': r.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8),
         'label': (np.arange(8) % 4).astype(np.int32)}
cfg = distill.StepConfig(factor=4, weights=(('ce', 1.), ('kd', 1.), ('fm', .1), ('at', 10.),
                                            ('sr', 1.)), augment=AUG)
out = {}
for name, devs in (('one', jax.devices()[:1]), ('four', jax.devices())):
  mesh = sharding.make_mesh(devs)
  tx = optax.adam(1e-3)
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model)
  state = distill.create_train_state(sp, tx, jax.random.PRNGKey(2))
  tpr = sharding.replicate(tp, mesh)
  for _ in range(2):
    state, m = step(state, tpr, sharding.shard_batch(batch, mesh))
  out[name] = (jax.tree_util.tree_map(np.asarray, state['params']),
               {k: float(v) for k, v in m.items()})
pa, ma = out['one']; pb, mb = out['four']
for k in ma:
  np.testing.assert_allclose(ma[k], mb[k], rtol=2e-4, atol=1e-6, err_msg=k)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), pa, pb)
print('OK', json.dumps(ma))
'''


def test_sharded_equals_unsharded(python_runner):
  out = python_runner(SHARDED.replace('AUG', 'augment.AugmentParams()'),
                      {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert out.startswith('OK'), out


# ----------------------------------------------------------------------------- weights
def _torchvision_state(params, seed=0):
  """A state dict in torchvision naming/layout for the convs of `params` (OIHW kernels)."""
  r = np.random.RandomState(seed)
  state = {}
  for name, leaf in params.items():
    if name.startswith('features_'):
      idx = name.split('_')[1]
      h, w, i, o = leaf['kernel'].shape
      state[f'features.{idx}.weight'] = r.randn(o, i, h, w).astype(np.float32)
      state[f'features.{idx}.bias'] = r.randn(o).astype(np.float32)
  return state


@pytest.mark.parametrize('fmt', ['npz', 'safetensors'])
def test_load_torchvision_weights(setup, tmp_path, fmt):
  _, _, params = setup
  state = _torchvision_state(params)
  state['classifier.0.weight'] = np.zeros((4096, 25088), np.float32)[:2, :2]  # ignored
  path = str(tmp_path / f'vgg.{fmt}')
  if fmt == 'npz':
    np.savez(path, **state)
  else:
    from safetensors.numpy import save_file
    save_file(state, path)
  loaded = weights.load_pretrained(path, params)
  for name in params:
    if name.startswith('features_'):
      idx = name.split('_')[1]
      np.testing.assert_array_equal(loaded[name]['kernel'],
                                    state[f'features.{idx}.weight'].transpose(2, 3, 1, 0))
      np.testing.assert_array_equal(loaded[name]['bias'], state[f'features.{idx}.bias'])
  np.testing.assert_array_equal(loaded['classifier']['kernel'], params['classifier']['kernel'])


def test_load_weights_errors(setup, tmp_path):
  _, _, params = setup
  state = _torchvision_state(params)
  missing = dict(state)
  del missing['features.24.bias']
  np.savez(tmp_path / 'missing.npz', **missing)
  with pytest.raises(weights.WeightLoadError, match=r"missing key 'features.24.bias'.*shape \(32,\)"):
    weights.load_pretrained(str(tmp_path / 'missing.npz'), params)
  wrong = dict(state)
  wrong['features.0.weight'] = np.zeros((64, 3, 3, 3), np.float32)
  np.savez(tmp_path / 'wrong.npz', **wrong)
  with pytest.raises(weights.WeightLoadError,
                     match=r"'features.0.weight' has shape \(64, 3, 3, 3\).*\(3, 3, 3, 4\)"):
    weights.load_pretrained(str(tmp_path / 'wrong.npz'), params)
  with pytest.raises(weights.WeightLoadError, match='does not exist'):
    weights.load_pretrained(str(tmp_path / 'nope.npz'), params)


def test_no_weight_file_logs_random_init(setup):
  _, _, params = setup
  logs = []
  assert weights.load_pretrained('', params, log=logs.append) is params
  assert 'random initialisation' in logs[0]
