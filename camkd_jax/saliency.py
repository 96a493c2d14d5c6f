"""Saliency (attention-transfer) losses composed of three independent parts.

    loss = sum_l  weight_l * mean_b distance( norm(map_s(l)), norm(map_t(l)) )_b

* map(sal, layer, labels) -> (B, H, W, M), at least float32: a saliency map stack from one model's
  `gradcam.Saliency` (logits, activations, all-class gradients) at one named layer.
* norm(maps, temperature) -> maps of the same shape: per-sample normalisation.
* distance(student, teacher) -> (B,): per-sample distance; the loss takes the batch mean.

The parts are looked up by name in three plain dicts (MAPS, NORMS, DISTANCES), filled below with
the built-ins and extended with `register_map`, `register_norm`, `register_distance`, so that
`config.attention.map = 'my_map'` finds a user's function. `from_config(config.attention)` checks
every name once, at start-up, and returns the `SaliencySpec` the train step runs: the
layers whose gradients the step must compute, and a pure `loss_fn(student, teacher, labels)`.

The reference AT+ is map='gradcam_plus' (all classes), norm='minmax', distance='rmse' at
'block5' (tests/test_saliency.py checks it against a NumPy float64 formula).
Everything is traced into the one compiled step: the only Python loop is over the configured
layers (static); classes are handled by the vectorised all-class gradients of `gradcam`.
"""
import dataclasses
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from camkd_jax import gradcam
from camkd_jax import losses
from camkd_jax import ops
from camkd_jax import parsing
from camkd_jax.models.vgg import layer_order

# Guards, chosen far below any value a real map takes, so they only act on degenerate inputs.
NORM_EPS = 1e-12    # an L2 norm below this counts as zero (map left as is / cosine of 0)
BCE_EPS = 1e-6      # BCE predictions are clipped to [BCE_EPS, 1 - BCE_EPS]
KL_EPS = 1e-6       # KL uses log(p + KL_EPS): finite when a position has zero mass

RESIZE_MODES = ('student_to_teacher', 'teacher_to_student')
# Activations that are not spatial maps cannot carry a saliency map.
_NON_SPATIAL = ('pooled', 'logits')


@dataclasses.dataclass(frozen=True)
class SaliencySpec:
  """What the train step's AT term needs: the layers whose all-class gradients it computes, and
  a pure `loss_fn(student: gradcam.Saliency, teacher: gradcam.Saliency, labels) -> scalar`."""
  layers: Tuple[str, ...]
  loss_fn: Callable[..., jax.Array]


class MapDef(NamedTuple):
  """A registered saliency map."""
  fn: Callable[..., jax.Array]           # (sal: gradcam.Saliency, layer, labels) -> (B,H,W,M)
  needs_grads: bool = True               # False: reads activations only (no Grad-CAM VJP)
  layers: Optional[Tuple[str, ...]] = None   # the only layers it is defined at (None: any)


MAPS: Dict[str, MapDef] = {}
NORMS: Dict[str, Callable[..., jax.Array]] = {}
DISTANCES: Dict[str, Callable[..., jax.Array]] = {}


# ----------------------------------------------------------------------------- registry
def _register(table, what, name, value, overwrite):
  if not isinstance(name, str) or not name:
    raise ValueError(f'a {what} name must be a non-empty string, got {name!r}')
  if name in table and not overwrite:
    raise ValueError(f'{what} {name!r} is already registered; pick another name or pass '
                     f'overwrite=True to replace it')
  table[name] = value


def register_map(name: str, fn: Callable[..., jax.Array], *, needs_grads: bool = True,
                 layers: Optional[Sequence[str]] = None, overwrite: bool = False):
  """Registers `fn(sal, layer, labels) -> (B, H, W, M)` as saliency map `name`.

  Args:
    name: the value of `config.attention.map` that selects it.
    fn: pure JAX function of a `gradcam.Saliency` (logits (B, C); acts[layer] (B, H, W, K);
      grads[layer] (C, B, H, W, K) when needs_grads), the layer name and the int labels (B,).
    needs_grads: whether fn reads `sal.grads`; False skips the Grad-CAM backward pass.
    layers: restrict the map to these layers (e.g. ('input',)); None allows any spatial layer.
    overwrite: allow replacing an existing entry (built-ins included).
  """
  _register(MAPS, 'map', name, MapDef(fn, bool(needs_grads),
                                      None if layers is None else tuple(layers)), overwrite)


def register_norm(name: str, fn: Callable[..., jax.Array], *, overwrite: bool = False):
  """Registers `fn(maps (B, H, W, M), temperature) -> same shape` as normalisation `name`."""
  _register(NORMS, 'norm', name, fn, overwrite)


def register_distance(name: str, fn: Callable[..., jax.Array], *, overwrite: bool = False):
  """Registers `fn(student (B, H, W, M), teacher (B, H, W, M)) -> (B,)` as distance `name`.

  The teacher argument carries no gradient; the loss is the batch mean of the result.
  """
  _register(DISTANCES, 'distance', name, fn, overwrite)


def _lookup(table, what, name):
  if name not in table:
    raise ValueError(f'unknown config.attention.{what} {name!r}; known: {sorted(table)} '
                     f'(register your own with camkd_jax.saliency.register_{what})')
  return table[name]


# ----------------------------------------------------------------------------- maps
def gradcam_plus(sal, layer, labels):
  """AT+ Grad-CAM, all classes: sum_k ReLU(w_{c,k} A_k) -> (B, H, W, C)."""
  del labels
  return gradcam.cam_plus(sal.acts[layer], sal.grads[layer])


def gradcam_classic(sal, layer, labels):
  """Classic Grad-CAM, all classes: ReLU(sum_k w_{c,k} A_k) -> (B, H, W, C)."""
  del labels
  return gradcam.cam_classic(sal.acts[layer], sal.grads[layer])


def activation_attention(sal, layer, labels):
  """Activation-based attention (Zagoruyko & Komodakis): mean_k A_k^2 -> (B, H, W, 1)."""
  del labels
  a = ops.at_least_f32(sal.acts[layer])
  return jnp.mean(a * a, axis=-1, keepdims=True)


def input_gradient(sal, layer, labels):
  """Gradient saliency (Simonyan et al.): max over channels of |d logit_c / d x| -> (B, H, W, C).

  At layer 'input' (the only layer it is registered for) x is the image the model saw.
  """
  del labels
  g = jnp.abs(ops.at_least_f32(sal.grads[layer]))       # (C, B, H, W, K)
  return jnp.transpose(jnp.max(g, axis=-1), (1, 2, 3, 0))


def target_class(map_fn):
  """Wraps an all-class map (B, H, W, C) into the map of each sample's label (B, H, W, 1)."""
  def fn(sal, layer, labels):
    maps = map_fn(sal, layer, labels)
    idx = labels.astype(jnp.int32)[:, None, None, None]
    return jnp.take_along_axis(maps, idx, axis=-1)
  fn.__name__ = f'{getattr(map_fn, "__name__", "map")}_target'
  fn.__doc__ = f'The label\'s slice of `{getattr(map_fn, "__name__", "map")}` -> (B, H, W, 1).'
  return fn


# ----------------------------------------------------------------------------- normalisations
def _flat(x):
  return ops.at_least_f32(x).reshape(x.shape[0], -1)


def _l2_norm(flat):
  """(B,) Euclidean norms with a finite gradient at zero."""
  return losses.safe_sqrt(jnp.sum(flat * flat, axis=-1))


def minmax_norm(maps, temperature):
  """(a - min) / (max - min) per sample over the whole stack; a constant map becomes 0."""
  del temperature
  return losses.minmax_normalize(maps)


def softmax_norm(maps, temperature):
  """Softmax over all positions of each sample's stack of maps / temperature."""
  return losses.softmax_normalize(maps, temperature)


def l2_norm(maps, temperature):
  """a / ||a||_2 per sample over the whole stack; an all-zero map stays zero."""
  del temperature
  flat = _flat(maps)
  n = _l2_norm(flat)[:, None]
  return (flat / jnp.where(n > NORM_EPS, n, 1.0)).reshape(maps.shape)


def no_norm(maps, temperature):
  """The maps unchanged (at least float32)."""
  del temperature
  return ops.at_least_f32(maps)


# ----------------------------------------------------------------------------- distances
def rmse_distance(s, t):
  """sqrt(mean((s - t)^2)) per sample (the reference AT+ distance)."""
  return losses.per_sample_rmse(s, t)


def mse_distance(s, t):
  """mean((s - t)^2) per sample."""
  d = _flat(s) - _flat(t)
  return jnp.mean(d * d, axis=-1)


def l1_distance(s, t):
  """mean(|s - t|) per sample."""
  return jnp.mean(jnp.abs(_flat(s) - _flat(t)), axis=-1)


def bce_distance(s, t):
  """mean(-t log s - (1 - t) log(1 - s)) per sample; maps are meant to lie in [0, 1] (minmax):
  t is clipped to [0, 1] and s to [BCE_EPS, 1 - BCE_EPS]."""
  p = jnp.clip(_flat(s), BCE_EPS, 1.0 - BCE_EPS)
  q = jnp.clip(_flat(t), 0.0, 1.0)
  return -jnp.mean(q * jnp.log(p) + (1.0 - q) * jnp.log1p(-p), axis=-1)


def _distribution(flat):
  """Each row as a distribution: ReLU, divided by its sum (uniform when the sum is 0)."""
  flat = jax.nn.relu(flat)
  total = jnp.sum(flat, axis=-1, keepdims=True)
  uniform = jnp.full_like(flat, 1.0 / flat.shape[-1])
  return jnp.where(total > NORM_EPS, flat / jnp.where(total > NORM_EPS, total, 1.0), uniform)


def kl_distance(s, t):
  """KL(teacher || student) per sample, each stack read as a distribution over positions:
  sum p (log(p + eps) - log(q + eps)), p = t / sum t, q = s / sum s (after ReLU)."""
  q = _distribution(_flat(s))
  p = _distribution(_flat(t))
  return jnp.sum(p * (jnp.log(p + KL_EPS) - jnp.log(q + KL_EPS)), axis=-1)


def cosine_distance(s, t):
  """1 - cos(s, t) per sample over the whole stack (an all-zero map has cosine 0)."""
  fs, ft = _flat(s), _flat(t)
  ns, nt = _l2_norm(fs), _l2_norm(ft)
  cos = (jnp.sum(fs * ft, axis=-1) / jnp.where(ns > NORM_EPS, ns, 1.0)
         / jnp.where(nt > NORM_EPS, nt, 1.0))
  return 1.0 - cos


# ----------------------------------------------------------------------------- built-ins
register_map('gradcam_plus', gradcam_plus)
register_map('gradcam_plus_target', target_class(gradcam_plus))
register_map('gradcam_classic', gradcam_classic)
register_map('gradcam_classic_target', target_class(gradcam_classic))
register_map('activation', activation_attention, needs_grads=False)
register_map('input_grad', input_gradient, layers=('input',))
register_map('input_grad_target', target_class(input_gradient), layers=('input',))
register_norm('minmax', minmax_norm)
register_norm('softmax', softmax_norm)
register_norm('l2', l2_norm)
register_norm('none', no_norm)
register_distance('rmse', rmse_distance)
register_distance('mse', mse_distance)
register_distance('l1', l1_distance)
register_distance('bce', bce_distance)
register_distance('kl', kl_distance)
register_distance('cosine', cosine_distance)


# ----------------------------------------------------------------------------- the loss
def match_sizes(s, t, resize='student_to_teacher'):
  """Resizes one of two NHWC map stacks (bilinear, align corners) to the other's H, W."""
  if resize == 'student_to_teacher':
    return ops.resize_align_corners(s, t.shape[1:3]), t
  if resize == 'teacher_to_student':
    return s, ops.resize_align_corners(t, s.shape[1:3])
  raise ValueError(f'unknown config.attention.resize {resize!r}; known: {list(RESIZE_MODES)}')


def _check_maps(name, layer, s, t):
  """Trace-time shape checks, so a user's map fails with its name instead of deep in XLA."""
  for who, m in (('student', s), ('teacher', t)):
    if m.ndim != 4:
      raise ValueError(f'map {name!r} at layer {layer!r} returned a {who} array of shape '
                       f'{m.shape}; a map must be (B, H, W, M)')
  if s.shape[0] != t.shape[0] or s.shape[-1] != t.shape[-1]:
    raise ValueError(f'map {name!r} at layer {layer!r}: student {s.shape} and teacher {t.shape} '
                     f'differ in batch or map count M (only H, W may differ)')


def _parse_list(value, what, cast=str):
  """'a,b' | sequence | scalar -> tuple (empty for '' / None)."""
  if value is None:
    return ()
  if isinstance(value, str):
    items = parsing.split_list(value)
  elif isinstance(value, (list, tuple)):
    items = list(value)
  else:
    items = [value]
  try:
    return tuple(cast(v) for v in items)
  except ValueError as e:
    raise ValueError(f'config.attention.{what}={value!r} is not a comma-separated list of '
                     f'{cast.__name__}: {e}') from None


def _check_layers(map_name, layers):
  if not layers:
    raise ValueError('config.attention.layers is empty; name at least one activation, e.g. '
                     "'block5'")
  if len(set(layers)) != len(layers):
    raise ValueError(f'config.attention.layers lists a layer twice: {list(layers)}')
  for layer in layers:
    layer_order(layer)  # unknown names fail there, listing the known ones
    if layer in _NON_SPATIAL:
      raise ValueError(f'config.attention.layers: {layer!r} is not a spatial activation; use '
                       "'input' or 'block1'..'block5'")
  allowed = MAPS[map_name].layers
  if allowed is not None and not set(layers) <= set(allowed):
    raise ValueError(f'map {map_name!r} is defined only at layer(s) {list(allowed)}; set '
                     f"config.attention.layers='{','.join(allowed)}' (got {','.join(layers)!r})")


def make_loss(map_name: str = 'gradcam_plus', norm: str = 'minmax', distance: str = 'rmse',
              layers: Sequence[str] = ('block5',), layer_weights: Optional[Sequence[float]] = None,
              resize: str = 'student_to_teacher', temperature: float = 0.01):
  """Checks the parts and returns the pure `loss_fn(student, teacher, labels) -> scalar`.

  student, teacher: `gradcam.Saliency` of the two models (teacher maps get no gradient);
  labels: int (B,). Unknown names and malformed layer lists raise ValueError here, not in the step.
  """
  map_def = _lookup(MAPS, 'map', map_name)
  norm_fn = _lookup(NORMS, 'norm', norm)
  dist_fn = _lookup(DISTANCES, 'distance', distance)
  layers = tuple(layers)
  _check_layers(map_name, layers)
  weights = (1.0,) * len(layers) if not layer_weights else tuple(float(w) for w in layer_weights)
  if len(weights) != len(layers):
    raise ValueError(f'config.attention.layer_weights has {len(weights)} value(s) {list(weights)} '
                     f'for {len(layers)} layer(s) {list(layers)}; give one weight per layer or '
                     "'' for all 1.0")
  if resize not in RESIZE_MODES:
    raise ValueError(f'unknown config.attention.resize {resize!r}; known: {list(RESIZE_MODES)}')
  if norm == 'softmax' and not temperature > 0:
    raise ValueError(f'config.attention.temperature must be > 0 for softmax, got {temperature}')

  def loss_fn(student, teacher, labels):
    total = None
    for layer, weight in zip(layers, weights):
      s = ops.at_least_f32(map_def.fn(student, layer, labels))
      t = ops.at_least_f32(jax.lax.stop_gradient(map_def.fn(teacher, layer, labels)))
      _check_maps(map_name, layer, s, t)
      s, t = match_sizes(s, t, resize)
      d = dist_fn(norm_fn(s, temperature), norm_fn(t, temperature))
      if d.shape != (s.shape[0],):
        raise ValueError(f'distance {distance!r} returned shape {d.shape}; it must return one '
                         f'value per sample, shape ({s.shape[0]},)')
      term = jnp.mean(d) if weight == 1.0 else weight * jnp.mean(d)
      total = term if total is None else total + term
    return total

  return loss_fn


def build(map_name: str = 'gradcam_plus', norm: str = 'minmax', distance: str = 'rmse',
          layers: Sequence[str] = ('block5',), layer_weights: Optional[Sequence[float]] = None,
          resize: str = 'student_to_teacher', temperature: float = 0.01):
  """The `SaliencySpec` for these parts (see `make_loss`).

  The spec lists the layers whose gradients the step computes: all configured layers for maps
  that read gradients, none for activation-only maps (the step then runs a plain forward, whose
  activations hold every block).
  """
  loss_fn = make_loss(map_name, norm, distance, layers, layer_weights, resize, temperature)
  grad_layers = tuple(layers) if MAPS[map_name].needs_grads else ()
  return SaliencySpec(layers=grad_layers, loss_fn=loss_fn)


def from_config(attention_cfg):
  """`SaliencySpec` from `config.attention` (map, norm, distance, layers, layer_weights,
  resize, temperature); every name is checked here, at start-up."""
  return build(map_name=attention_cfg.map, norm=attention_cfg.norm, distance=attention_cfg.distance,
               layers=_parse_list(attention_cfg.layers, 'layers'),
               layer_weights=_parse_list(attention_cfg.layer_weights, 'layer_weights', float),
               resize=attention_cfg.resize, temperature=float(attention_cfg.temperature))


# The reference AT+ (gradcam_plus, minmax, rmse at block5): the default of distill.StepConfig.
DEFAULT = build()
