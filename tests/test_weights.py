"""camkd_jax.weights: torchvision-layout .npz / .safetensors import and its errors."""
import jax
import numpy as np
import pytest

from camkd_jax import distill
from camkd_jax import weights
from camkd_jax.models import get_model


@pytest.fixture(scope='module')
def params():
  return distill.init_params(get_model('vgg16', 4, width=0.0625), jax.random.PRNGKey(1), 32)


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
def test_load_torchvision_weights(params, tmp_path, fmt):
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


def test_load_weights_errors(params, tmp_path):
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


def test_no_weight_file_logs_random_init(params):
  logs = []
  assert weights.load_pretrained('', params, log=logs.append) is params
  assert 'random initialisation' in logs[0]
