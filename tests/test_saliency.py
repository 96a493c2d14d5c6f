"""Composable saliency losses: map x normalisation x distance, against NumPy float64."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from camkd_jax import distill
from camkd_jax import gradcam
from camkd_jax import saliency
from camkd_jax import train
from camkd_jax.models import get_model
from configs import base
import reference_np as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP_NAMES = ('gradcam_plus', 'gradcam_plus_target', 'gradcam_classic', 'gradcam_classic_target',
             'activation', 'input_grad', 'input_grad_target')
NORM_NAMES = ('minmax', 'softmax', 'l2', 'none')
DIST_NAMES = ('rmse', 'mse', 'l1', 'bce', 'kl', 'cosine')
TEMP = 0.01


# ----------------------------------------------------------------------------- NumPy references
def np_flat(x):
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1)


def np_norm(name, m, temperature=TEMP):
  m = np.asarray(m, np.float64)
  if name == 'minmax':
    return ref.minmax(m)
  if name == 'softmax':
    return ref.softmax_all(m, temperature)
  if name == 'l2':
    out = np.zeros_like(m)
    for b in range(m.shape[0]):
      n = np.sqrt((m[b] ** 2).sum())
      out[b] = m[b] / n if n > 0 else m[b]
    return out
  return m


def np_distance(name, s, t):
  s, t = np_flat(s), np_flat(t)
  if name == 'rmse':
    return np.sqrt(((s - t) ** 2).mean(-1))
  if name == 'mse':
    return ((s - t) ** 2).mean(-1)
  if name == 'l1':
    return np.abs(s - t).mean(-1)
  if name == 'bce':
    p = np.clip(s, saliency.BCE_EPS, 1 - saliency.BCE_EPS)
    q = np.clip(t, 0, 1)
    return -(q * np.log(p) + (1 - q) * np.log(1 - p)).mean(-1)
  if name == 'kl':
    out = []
    for sb, tb in zip(s, t):
      sb, tb = np.maximum(sb, 0), np.maximum(tb, 0)
      q = sb / sb.sum() if sb.sum() > 0 else np.full_like(sb, 1 / sb.size)
      p = tb / tb.sum() if tb.sum() > 0 else np.full_like(tb, 1 / tb.size)
      out.append((p * (np.log(p + saliency.KL_EPS) - np.log(q + saliency.KL_EPS))).sum())
    return np.array(out)
  if name == 'cosine':
    ns, nt = np.linalg.norm(s, axis=-1), np.linalg.norm(t, axis=-1)
    return 1 - (s * t).sum(-1) / np.where(ns > 0, ns, 1) / np.where(nt > 0, nt, 1)
  raise ValueError(name)


def np_map(name, acts, grads, labels):
  """Textbook maps from activations (B,H,W,K) and class gradients (C,B,H,W,K)."""
  a, g = np.asarray(acts, np.float64), np.asarray(grads, np.float64)
  base_name = name[:-len('_target')] if name.endswith('_target') else name
  if base_name == 'gradcam_plus':
    m = ref.cam_plus(a, g.mean(axis=(2, 3)))
  elif base_name == 'gradcam_classic':
    m = ref.cam_classic(a, g.mean(axis=(2, 3)))
  elif base_name == 'activation':
    return (a ** 2).mean(-1, keepdims=True)
  elif base_name == 'input_grad':
    m = np.abs(g).max(-1).transpose(1, 2, 3, 0)
  if name.endswith('_target'):
    m = np.stack([m[b, :, :, labels[b]] for b in range(m.shape[0])])[..., None]
  return m


def random_saliency(seed, b=3, h=4, w=5, k=6, c=4, layer='block5'):
  r = np.random.RandomState(seed)
  acts = r.randn(b, h, w, k).astype(np.float32)
  grads = r.randn(c, b, h, w, k).astype(np.float32)
  sal = gradcam.Saliency(jnp.asarray(r.randn(b, c), jnp.float32), {layer: jnp.asarray(acts)},
                         {layer: jnp.asarray(grads)})
  return sal, acts, grads, r.randint(0, c, size=b).astype(np.int32)


# ----------------------------------------------------------------------------- tiny model
def he_params(model, size, seed, kernel_scale=1.0, bias=None):
  """NumPy He-normal parameters (no PRNG kernels to compile); optional constant biases."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  r = np.random.RandomState(seed)

  def init(path, s):
    if path[-1].key == 'bias':
      value = (r.normal(0, 0.1, s.shape) if bias is None else np.full(s.shape, bias))
    else:
      value = kernel_scale * r.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape)
    return value.astype(np.float32)
  return jax.tree_util.tree_map_with_path(init, shapes['params'])


@pytest.fixture(scope='module')
def tiny():
  """Tiny VGG16 and its Saliency (layers input, block4, block5) for a student and a teacher.

  Parameter sets: random, all-zero (zero maps) and zero kernels with constant biases (spatially
  constant activations: constant maps, zero input gradients).
  """
  model = get_model('vgg16', 4, width=0.0625)
  r = np.random.RandomState(7)
  params = {'random': he_params(model, 32, 0), 'teacher': he_params(model, 32, 1),
            'zero': he_params(model, 32, 2, kernel_scale=0.0, bias=0.0),
            'const': he_params(model, 32, 3, kernel_scale=0.0, bias=0.1)}
  xs = r.rand(2, 32, 32, 3).astype(np.float32)
  x = r.rand(2, 32, 32, 3).astype(np.float32)
  labels = np.array([1, 3], np.int32)
  fwg = jax.jit(lambda p, x: gradcam.forward_with_grads(
      model, {'params': p}, x, ('input', 'block4', 'block5')))
  s, t = fwg(params['random'], xs), fwg(params['teacher'], x)   # one compile: same shapes
  return dict(model=model, params=params, xs=xs, x=x, labels=labels, fwg=fwg, s=s, t=t)


# ----------------------------------------------------------------------------- maps
@pytest.mark.parametrize('name', MAP_NAMES)
def test_map_against_numpy(name):
  layer = 'input' if name.startswith('input') else 'block5'
  sal, acts, grads, labels = random_saliency(0, k=3 if layer == 'input' else 6, layer=layer)
  got = saliency.MAPS[name].fn(sal, layer, jnp.asarray(labels))
  want = np_map(name, acts, grads, labels)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['gradcam_plus', 'gradcam_classic', 'input_grad'])
def test_target_map_is_all_class_stack_at_label(name):
  layer = 'input' if name == 'input_grad' else 'block5'
  sal, _, _, labels = random_saliency(1, layer=layer)
  stack = np.asarray(saliency.MAPS[name].fn(sal, layer, jnp.asarray(labels)))
  target = np.asarray(saliency.MAPS[name + '_target'].fn(sal, layer, jnp.asarray(labels)))
  np.testing.assert_array_equal(target[..., 0], stack[np.arange(len(labels)), :, :, labels])


def test_activation_attention_closed_form():
  k = 5
  acts = jnp.broadcast_to(jnp.arange(1.0, k + 1), (2, 3, 3, k))   # channel j is j+1 everywhere
  sal = gradcam.Saliency(None, {'block4': acts}, {})
  got = saliency.MAPS['activation'].fn(sal, 'block4', None)
  assert got.shape == (2, 3, 3, 1)
  np.testing.assert_allclose(got, (k + 1) * (2 * k + 1) / 6.0, rtol=1e-6)  # mean of j^2, j=1..k
  assert not saliency.MAPS['activation'].needs_grads


# ----------------------------------------------------------------------------- norms, distances
@pytest.mark.parametrize('name', NORM_NAMES)
def test_norm_against_numpy(name):
  r = np.random.RandomState(2)
  m = np.concatenate([r.rand(2, 3, 4, 2), np.full((1, 3, 4, 2), 0.7), np.zeros((1, 3, 4, 2))])
  got = saliency.NORMS[name](jnp.asarray(m, jnp.float32), 0.5)
  np.testing.assert_allclose(got, np_norm(name, m, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', DIST_NAMES)
def test_distance_against_numpy(name):
  r = np.random.RandomState(3)
  s, t = r.rand(4, 3, 4, 2), r.rand(4, 3, 4, 2)
  s[3], t[2] = 0.0, 0.0                     # all-zero maps on either side
  got = saliency.DISTANCES[name](jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  assert got.shape == (4,)
  np.testing.assert_allclose(got, np_distance(name, s, t), rtol=1e-5, atol=1e-6)
  if name != 'bce':                         # BCE keeps the target's entropy
    same = jnp.asarray(s[:2], jnp.float32)
    np.testing.assert_allclose(saliency.DISTANCES[name](same, same), 0.0, atol=1e-6)


def _grid(s, t, labels=None, sal_inputs=True):
  """Per-sample values of every built-in combination, as [(maps, distance, (norm, map, B) array)].

  Norms and distances are per-sample functions, so the maps of one shape, and then their
  normalisations, are stacked along the batch axis: each registered function is traced once per
  map shape instead of once per combination (what keeps the compile small on a 2-core CPU).
  """
  groups = {}
  for m in (MAP_NAMES if sal_inputs else ('given',)):
    if sal_inputs:
      layer = 'input' if m.startswith('input') else 'block5'
      sm = saliency.MAPS[m].fn(s, layer, labels)
      tm = jax.lax.stop_gradient(saliency.MAPS[m].fn(t, layer, labels))
    else:
      sm, tm = s, t
    sm, tm = saliency.match_sizes(sm, tm, 'student_to_teacher')
    groups.setdefault(sm.shape, []).append((m, sm, tm))
  out = []
  for members in groups.values():
    b = members[0][1].shape[0]
    sm = jnp.concatenate([x for _, x, _ in members])
    tm = jnp.concatenate([x for _, _, x in members])
    ns = jnp.concatenate([saliency.NORMS[n](sm, TEMP) for n in NORM_NAMES])
    nt = jnp.concatenate([saliency.NORMS[n](tm, TEMP) for n in NORM_NAMES])
    for d in DIST_NAMES:
      v = saliency.DISTANCES[d](ns, nt).reshape(len(NORM_NAMES), len(members), b)
      out.append((tuple(m for m, _, _ in members), d, v))
  return out


def _weighted_total(grid):
  """A positive random combination of the batch means: its gradient is finite iff every
  combination's gradient is (a NaN or inf in any term cannot cancel out)."""
  r = np.random.RandomState(5)
  return sum(jnp.sum(jnp.asarray(r.uniform(0.5, 1.5, v.shape[:2]), jnp.float32)
                     * jnp.mean(v, axis=-1)) for _, _, v in grid)


def _by_combination(keys, arrays):
  """Host copy: {(map, norm, distance): per-sample values}."""
  return {(m, n, d): np.asarray(v)[i, j] for (maps, d), v in zip(keys, arrays)
          for i, n in enumerate(NORM_NAMES) for j, m in enumerate(maps)}


def _split(grid, keys):
  """Arrays of a grid (jit outputs); its static names go to the list `keys` (at trace time)."""
  keys[:] = [(maps, d) for maps, d, _ in grid]
  return [v for _, _, v in grid]


def _non_finite(tree):
  return [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(tree)
          if not np.all(np.isfinite(np.asarray(v)))]


def test_norm_distance_pairs_finite_on_degenerate_maps():
  """Every (norm, distance) pair, value and gradient, on random/constant/all-zero map pairs."""
  r = np.random.RandomState(4)
  kinds = [r.rand(3, 3, 2), np.full((3, 3, 2), 0.7), np.zeros((3, 3, 2)), -r.rand(3, 3, 2)]
  pairs = [(a, b) for a in kinds for b in kinds]
  s = jnp.asarray(np.stack([a for a, _ in pairs]), jnp.float32)
  t = jnp.asarray(np.stack([b for _, b in pairs]), jnp.float32)

  keys = []

  def total(s):
    grid = _grid(s, t, sal_inputs=False)
    return _weighted_total(grid), _split(grid, keys)
  (_, arrays), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(s)
  values = _by_combination(keys, arrays)
  assert len(values) == len(NORM_NAMES) * len(DIST_NAMES)
  bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
  assert not bad, f'non-finite values: {bad}'
  assert np.all(np.isfinite(grad)), 'non-finite gradient w.r.t. the student maps'


# ----------------------------------------------------------------------------- on the model
# Unoptimised XLA code: compiles in about half the time, and runs these tiny shapes just as well.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@pytest.mark.slow   # ~20 s on 2 cores: one second-order compile of 168 combinations
def test_every_combination_finite_on_tiny_model(tiny):
  """All 7 x 4 x 6 built-in combinations, value and gradient w.r.t. the student's parameters
  (second order through the Grad-CAM gradient), for random, all-zero and constant students and
  teachers; one compiled program (the teacher's Saliency is an input: it carries no gradient)."""
  model, labels, fwg, keys = tiny['model'], tiny['labels'], tiny['fwg'], []

  def total(p, t, xs):
    s = gradcam.forward_with_grads(model, {'params': p}, xs, ('input', 'block5'))
    return _weighted_total(grid := _grid(s, t, labels)), _split(grid, keys)
  p, xs, x = tiny['params'], tiny['xs'], tiny['x']
  step = jax.jit(jax.value_and_grad(total, has_aux=True)).lower(
      p['random'], tiny['t'], xs).compile(FAST_COMPILE)
  cases = {'random/random': (p['random'], tiny['t']),
           'zero/random': (p['zero'], tiny['t']),
           'const/random': (p['const'], tiny['t']),
           'random/zero': (p['random'], fwg(p['zero'], x)),
           'const/const': (p['const'], fwg(p['const'], x))}
  for case, (sp, t) in cases.items():
    (_, arrays), grads = step(sp, t, xs)
    values = _by_combination(keys, arrays)
    assert len(values) == len(MAP_NAMES) * len(NORM_NAMES) * len(DIST_NAMES)
    bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
    assert not bad, f'{case}: non-finite values for {bad}'
    assert not _non_finite(grads), f'{case}: non-finite gradients in {_non_finite(grads)}'
    if case == 'random/random':   # the term does reach the student
      assert float(optax.global_norm(grads)) > 0
      random_values = values
  # The loss the step runs (make_loss, as selected by config) is the batch mean of these values:
  # every pair for the default map, and one pair per other map (eager, so kept to 30).
  s = fwg(p['random'], xs)
  for (m, n, d), v in random_values.items():
    if m != 'gradcam_plus' and (n, d) != ('softmax', 'kl'):
      continue
    loss = saliency.make_loss(m, n, d, ('input',) if m.startswith('input') else ('block5',),
                              temperature=TEMP)
    np.testing.assert_allclose(float(loss(s, tiny['t'], labels)), v.mean(), rtol=2e-5,
                               atol=1e-6, err_msg=str((m, n, d)))


def _attn_config(**attention):
  c = base.base_config('smoke=1')
  c.loss.at = 1.0
  for k, v in attention.items():
    setattr(c.attention, k, v)
  return c


X64_AT_PLUS = r'''
import jax, jax.numpy as jnp, numpy as np
from camkd_jax import distill, gradcam, saliency
assert distill.StepConfig().saliency is saliency.DEFAULT and saliency.DEFAULT.layers == ('block5',)
r = np.random.RandomState(0)
def sal():
  return gradcam.Saliency(jnp.zeros((2, 4)), {'block5': jnp.asarray(r.randn(2, 3, 3, 5))},
                          {'block5': jnp.asarray(r.randn(4, 2, 3, 3, 5))})
s, t = sal(), sal()
got = saliency.DEFAULT.loss_fn(s, t, jnp.asarray([0, 1]))
assert got.dtype == jnp.float64, got.dtype
print(repr(float(got)))
'''


def test_default_at_plus_stays_float64_under_x64(python_runner):
  """StepConfig's default saliency is the registry's reference AT+, and an x64 run keeps it in
  float64 end to end (no float32 cast): the NumPy float64 value to rounding."""
  got = float(python_runner(X64_AT_PLUS, {'JAX_ENABLE_X64': '1'}))
  r = np.random.RandomState(0)  # the script's draws, in its order
  (sa, sg), (ta, tg) = [(r.randn(2, 3, 3, 5), r.randn(4, 2, 3, 3, 5)) for _ in range(2)]
  want = np_distance('rmse', np_norm('minmax', np_map('gradcam_plus', sa, sg, None)),
                     np_norm('minmax', np_map('gradcam_plus', ta, tg, None))).mean()
  assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_default_combination_is_the_reference_at_plus(tiny):
  """The configured default (map gradcam_plus over all classes, minmax, rmse at block5) is the
  paper's AT+ on a small model's real Grad-CAM: NumPy float64 formula."""
  spec = distill.StepConfig.from_config(_attn_config()).saliency
  assert spec.layers == ('block5',)
  s, t, labels = tiny['s'], tiny['t'], jnp.asarray(tiny['labels'])
  got = spec.loss_fn(s, t, labels)
  ms = np_map('gradcam_plus', s.acts['block5'], s.grads['block5'], None)
  mt = np_map('gradcam_plus', t.acts['block5'], t.grads['block5'], None)
  want = np_distance('rmse', np_norm('minmax', ms), np_norm('minmax', mt)).mean()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_layer_weights_sum_the_layers(tiny):
  """Two layers with weights = the weighted sum of the one-layer losses."""
  s, t, labels = tiny['s'], tiny['t'], jnp.asarray(tiny['labels'])
  one = lambda layer: saliency.make_loss(layers=(layer,))(s, t, labels)
  two = saliency.from_config(_attn_config(layers='block4, block5', layer_weights='0.5,2')
                             .attention)
  assert two.layers == ('block4', 'block5')
  np.testing.assert_allclose(two.loss_fn(s, t, labels),
                             0.5 * one('block4') + 2.0 * one('block5'), rtol=1e-6)
  np.testing.assert_allclose(saliency.make_loss(layers=('block4', 'block5'))(s, t, labels),
                             one('block4') + one('block5'), rtol=1e-6)


@pytest.mark.parametrize('resize', saliency.RESIZE_MODES)
def test_resize_direction(resize):
  """Student maps 2x3, teacher maps 5x4: resized (bilinear, align corners) the configured way."""
  s, a_s, g_s, labels = random_saliency(8, h=2, w=3)
  t, a_t, g_t, _ = random_saliency(9, h=5, w=4)
  got = saliency.make_loss('gradcam_classic', 'l2', 'l1', resize=resize)(s, t, labels)
  ms = np_map('gradcam_classic', a_s, g_s, labels)
  mt = np_map('gradcam_classic', a_t, g_t, labels)
  if resize == 'student_to_teacher':
    ms = ref.bilinear_align_corners(ms, 5, 4)
  else:
    mt = ref.bilinear_align_corners(mt, 2, 3)
  want = np_distance('l1', np_norm('l2', ms), np_norm('l2', mt)).mean()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_activation_map_runs_without_grads_in_the_step(tiny):
  """map=activation asks the step for no gradients (plain forward) and gives the closed form."""
  cfg = distill.StepConfig.from_config(_attn_config(map='activation', norm='l2', distance='mse'))
  assert cfg.saliency.layers == ()
  model, p = tiny['model'], tiny['params']
  x = jnp.asarray(tiny['x'])
  cfg = distill.StepConfig(factor=1, weights=(('at', 1.0),), saliency=cfg.saliency)
  got = jax.jit(lambda sp: distill.compute_losses(cfg, model, sp, model, p['teacher'], x,
                                                  tiny['labels'])[1]['at'])(p['random'])
  a_s = np.asarray(model.apply({'params': p['random']}, x)[1]['block5'], np.float64)
  a_t = np.asarray(model.apply({'params': p['teacher']}, x)[1]['block5'], np.float64)
  want = np_distance('mse', np_norm('l2', (a_s ** 2).mean(-1, keepdims=True)),
                     np_norm('l2', (a_t ** 2).mean(-1, keepdims=True))).mean()
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


# ----------------------------------------------------------------------------- registry, config
@pytest.fixture
def clean_registry():
  before = {t: dict(getattr(saliency, t)) for t in ('MAPS', 'NORMS', 'DISTANCES')}
  yield
  for t, entries in before.items():
    table = getattr(saliency, t)
    table.clear()
    table.update(entries)


def test_register_and_select_by_name(clean_registry, tiny):
  del clean_registry
  saliency.register_map('double_act', lambda sal, layer, labels: 2.0 * sal.acts[layer][..., :1],
                        needs_grads=False)
  saliency.register_norm('shift', lambda m, temperature: m + 1.0)
  saliency.register_distance('maxabs', lambda s, t: jnp.max(jnp.abs(s - t).reshape(
      s.shape[0], -1), axis=-1))
  spec = saliency.from_config(_attn_config(map='double_act', norm='shift',
                                           distance='maxabs').attention)
  assert spec.layers == ()
  s, t = tiny['s'], tiny['t']
  a_s = 2.0 * np.asarray(s.acts['block5'][..., :1], np.float64)
  a_t = 2.0 * np.asarray(t.acts['block5'][..., :1], np.float64)
  want = np.abs(a_s - a_t).reshape(2, -1).max(-1).mean()
  np.testing.assert_allclose(float(spec.loss_fn(s, t, tiny['labels'])), want, rtol=1e-5)
  with pytest.raises(ValueError, match="map 'double_act' is already registered"):
    saliency.register_map('double_act', lambda *a: None)
  saliency.register_map('double_act', saliency.gradcam_plus, overwrite=True)
  assert saliency.MAPS['double_act'].needs_grads


@pytest.mark.parametrize('field,value,message', [
    ('map', 'gradcam++', r"unknown config.attention.map 'gradcam\+\+'; known: \[.*'gradcam_plus'"),
    ('norm', 'zscore', r"unknown config.attention.norm 'zscore'; known: \['l2', 'minmax'"),
    ('distance', 'emd', r"unknown config.attention.distance 'emd'; known: \['bce', 'cosine'"),
    ('resize', 'nearest', r"unknown config.attention.resize 'nearest'"),
    ('layers', 'block9', r"unknown activation 'block9'"),
    ('layers', 'pooled', r"'pooled' is not a spatial activation"),
    ('layers', 'block5,block5', 'lists a layer twice'),
    ('layers', '', 'config.attention.layers is empty'),
    ('layer_weights', '1,2', r'2 value\(s\) \[1.0, 2.0\] for 1 layer'),
    ('layer_weights', 'a', 'not a comma-separated list of float'),
    ('map', 'input_grad', r"map 'input_grad' is defined only at layer\(s\) \['input'\]; set "
                          r"config.attention.layers='input'"),
])
def test_bad_config_fails_at_start_up(field, value, message):
  with pytest.raises(ValueError, match=message):
    distill.StepConfig.from_config(_attn_config(**{field: value}))


def test_user_map_and_distance_that_break_the_contract_are_named(tiny):
  s = tiny['s']
  saliency.register_map('_flat_map', lambda sal, layer, labels: sal.acts[layer].sum(-1),
                        overwrite=True)
  try:
    with pytest.raises(ValueError, match=r"map '_flat_map' at layer 'block5' returned a student"):
      saliency.make_loss('_flat_map')(s, s, tiny['labels'])
  finally:
    del saliency.MAPS['_flat_map']
  saliency.register_distance('_scalar', lambda a, b: jnp.sum(a - b), overwrite=True)
  try:
    with pytest.raises(ValueError, match=r"distance '_scalar' returned shape \(\)"):
      saliency.make_loss(distance='_scalar')(s, s, tiny['labels'])
  finally:
    del saliency.DISTANCES['_scalar']


def test_command_line_overrides_select_the_parts():
  """The sweep's `--config.attention.*=...` overrides reach the built spec."""
  def parse(*overrides):
    argv = ['prog', *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict('config', _attn_config(), flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config

  config = parse('--config.attention.map=gradcam_plus_target', '--config.attention.norm=softmax',
                 '--config.attention.distance=kl', '--config.attention.temperature=0.5',
                 '--config.attention.layers=block4,block5',
                 '--config.attention.layer_weights=0.5,1.0',
                 '--config.attention.resize=teacher_to_student')
  att = config.attention
  assert (att.map, att.norm, att.distance, att.temperature, att.layers, att.layer_weights,
          att.resize) == ('gradcam_plus_target', 'softmax', 'kl', 0.5, 'block4,block5',
                          '0.5,1.0', 'teacher_to_student')
  assert distill.StepConfig.from_config(config).saliency.layers == ('block4', 'block5')
  config = parse('--config.attention.map=input_grad', '--config.attention.layers=input')
  assert distill.StepConfig.from_config(config).saliency.layers == ('input',)
  config = parse('--config.attention.map=activation')
  assert distill.StepConfig.from_config(config).saliency.layers == ()


# ----------------------------------------------------------------------------- README example
def test_readme_example_runs_and_changes_the_loss():
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}   # it must find the package
  proc = subprocess.run([sys.executable, os.path.join('examples', 'custom_saliency.py')], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  nums = {}
  for key, pattern in (('default', r'^default AT\+ .*: +(\S+)$'),
                       ('custom', r'^custom +\(.*: +(\S+)$'),
                       ('custom gradient', r'^custom gradient norm .*: +(\S+)$')):
    found = re.search(pattern, proc.stdout, re.M)
    assert found, f'{key!r} line missing from the example output:\n{proc.stdout}'
    nums[key] = float(found.group(1))
  assert all(np.isfinite(v) for v in nums.values()), proc.stdout
  assert abs(nums['custom'] - nums['default']) > 1e-3, proc.stdout
  assert nums['custom gradient'] > 0, proc.stdout
