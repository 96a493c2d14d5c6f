"""camkd_jax.sharding: batch-size checks, and a step sharded over 4 devices equals one device."""
import pytest

from camkd_jax import sharding
from helpers import xla_flags


def test_batch_not_divisible_by_devices_is_named():
  mesh = sharding.make_mesh()

  class FakeMesh:
    shape = {'data': 4}
  sharding.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by the number of devices'):
    sharding.check_batch_size(6, FakeMesh())


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
cfg = distill.StepConfig(factor=FACTOR, view=VIEW, augment=AUG,
                         weights=(('ce', 1.), ('kd', 1.), ('fm', .1), ('at', 10.), ('sr', 1.)))
out = {}
for name, devs in (('one', jax.devices()[:1]), ('four', jax.devices())):
  mesh = sharding.make_mesh(devs)
  tx = optax.adam(1e-3)
  step = distill.make_train_step(cfg, model, tx, mesh, teacher=model)
  state = distill.create_train_state(sp, tx, jax.random.PRNGKey(2))
  tpr = sharding.replicate(tp, mesh)
  for _ in range(2):
    state, m = step(state, tpr, sharding.shard_batch(batch, mesh))
  logits = distill.make_eval_step(model, FACTOR, mesh, VIEW)(
      state['params'], sharding.shard_batch(batch, mesh)['image'])
  out[name] = (jax.tree_util.tree_map(np.asarray, state['params']),
               {k: float(v) for k, v in m.items()}, np.asarray(logits))
(pa, ma, la), (pb, mb, lb) = out['one'], out['four']
for k in ma:
  np.testing.assert_allclose(ma[k], mb[k], rtol=2e-4, atol=1e-6, err_msg=k)
np.testing.assert_allclose(la, lb, rtol=1e-3, atol=1e-5)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), pa, pb)
print('OK', json.dumps(ma))
'''


@pytest.mark.parametrize('view,factor', [('upsampled', 4), ('native', 2)])
def test_sharded_equals_unsharded(python_runner, view, factor):
  """Two steps and the eval logits on 4 devices equal 1 device (a native student too)."""
  script = (SHARDED.replace('AUG', 'augment.AugmentParams()').replace('FACTOR', str(factor))
            .replace('VIEW', repr(view)))
  out = python_runner(script, {'XLA_FLAGS': xla_flags(4)})
  assert out.startswith('OK'), out
