"""The compiled programs: distillation/teacher train step and eval step, sharded over a mesh.

One `jax.jit` program per step does, on the accelerator:
  uint8 batch -> [0, 1] -> augmentation (same view for both models) -> student view (avg-pool f,
  bilinear upsample) -> teacher forward (+ Grad-CAM VJP when AT+ is on; no parameter gradients)
  -> student forward (+ Grad-CAM VJP) -> every loss term with a non-zero weight -> gradient of the
  total w.r.t. the student's parameters (second order through the Grad-CAM gradient) -> optax update.
A term whose weight is zero is never traced, so it is absent from the compiled program.

The train state is a plain dict pytree {'step', 'params', 'opt_state', 'rng', 'bad_step',
'bad_terms'} whose buffers are donated. A non-finite loss term or gradient freezes the parameters at
the first bad step and records the step and which terms; the driver checks this on logging steps
and before checkpointing or evaluating, so no NaN reaches a checkpoint and the hot loop never
waits on the host.
"""
import dataclasses
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from camkd_jax import gradcam
from camkd_jax import losses
from camkd_jax import ops
from camkd_jax import saliency as saliency_lib
from camkd_jax import sharding

TERMS = ('ce', 'kd', 'fm', 'at', 'sr')
# Bit i of the state's `bad_terms` mask: a non-finite TERMS[i], then the total, then a gradient.
BAD_TERM_NAMES = TERMS + ('total', 'gradients')


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static description of one train step (everything that changes the compiled program)."""
  factor: int = 1
  view: str = 'upsampled'    # the student's input: 'upsampled' (reference) or 'native' (S / f)
  weights: Tuple[Tuple[str, float], ...] = (('ce', 1.0),)
  temperature: float = 1.0
  kd_form: str = 'reference'
  fm_layer: str = 'block5'
  saliency: saliency_lib.SaliencySpec = saliency_lib.DEFAULT  # the reference AT+
  augment: Any = None        # camkd_jax.augment.AugmentParams or None

  def weight(self, term):
    return dict(self.weights).get(term, 0.0)

  @property
  def active_terms(self):
    return tuple(t for t in TERMS if self.weight(t) != 0.0)

  @property
  def needs_teacher(self):
    return any(self.weight(t) != 0.0 for t in ('kd', 'fm', 'at', 'sr'))

  @classmethod
  def from_config(cls, config, stage: str = 'student') -> 'StepConfig':
    """The step of a training stage, from the run's config; the one definition that the trainer,
    the benchmark and the study use.

    'teacher': CE at full resolution (f = 1). 'student': f = base_magnification / magnification,
    the config.loss weights, config.student.view and the AT map x norm x distance of
    config.attention (unknown names fail here, at start-up). Both with config.augment.
    """
    from camkd_jax import augment as augment_lib  # pylint: disable=g-import-not-at-top
    aug = augment_lib.AugmentParams.from_config(config.augment)
    if stage == 'teacher':
      return cls(factor=1, weights=(('ce', 1.0),), augment=aug)
    if stage != 'student':
      raise ValueError(f'unknown stage {stage!r}; known: teacher, student')
    weights = tuple((t, float(getattr(config.loss, t))) for t in TERMS)
    negative = [t for t, w in weights if w < 0]
    if negative:
      raise ValueError(f'loss weights must be >= 0; got negative config.loss.{negative[0]}')
    return cls(
        factor=ops.magnification_factor(config.magnification, config.base_magnification),
        weights=weights, temperature=float(config.loss.temperature),
        view=config.student.view, kd_form=config.loss.kd_form, fm_layer=config.loss.fm_layer,
        saliency=saliency_lib.from_config(config.attention), augment=aug)


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """optax optimiser from `config.optimizer` (adam | sgd | adamw)."""
  lr = float(opt_cfg.learning_rate)
  name = opt_cfg.name
  if name == 'adam':
    return optax.adam(lr)
  if name == 'adamw':
    return optax.adamw(lr)
  if name == 'sgd':
    return optax.sgd(lr, momentum=0.9)
  raise ValueError(f'unknown config.optimizer.name {name!r}; known: adam, adamw, sgd')


# ----------------------------------------------------------------------------- state
def init_params(model, rng, image_size: int):
  """Random float32 parameters for `model` at `image_size`."""
  return model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))['params']


def abstract_params(model, image_size: int, placement):
  """Shapes and dtypes of `model`'s parameters placed with `placement` (a jax Sharding),
  computing nothing: the template orbax restores into."""
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), image_size))
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placement), shapes)


def create_train_state(params, tx, rng) -> Dict[str, Any]:
  """The train state pytree (step 0). Params are copied: the step donates the state's buffers,
  which must not delete the caller's arrays."""
  params = jax.tree_util.tree_map(jnp.array, params)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'rng': rng, 'bad_step': jnp.full((), -1, jnp.int32),
          'bad_terms': jnp.zeros((), jnp.int32)}


def decode_bad_terms(mask: int, names: Sequence[str] = BAD_TERM_NAMES):
  """Names of the terms flagged in a `bad_terms` bitmask."""
  return [n for i, n in enumerate(names) if int(mask) >> i & 1]


# ----------------------------------------------------------------------------- the step
def prepare_images(batch_images, rng, augment):
  """uint8 NHWC -> float32 [0, 1], augmented on device when `augment` params are given."""
  x = batch_images.astype(jnp.float32) / 255.0
  if augment is not None and augment.enabled:
    from camkd_jax import augment as aug  # pylint: disable=g-import-not-at-top
    x = aug.augment_batch(rng, x, augment)
  return x


def _forward(model, params, x, layers):
  """Plain forward, or forward + all-class gradients when `layers` is non-empty."""
  if layers:
    return gradcam.forward_with_grads(model, {'params': params}, x, layers)
  logits, acts = model.apply({'params': params}, x)
  return gradcam.Saliency(logits, acts, {})


def compute_losses(cfg: StepConfig, student, params, teacher, teacher_params, x, labels):
  """All active loss terms for student params on images x (full resolution, float)."""
  w = cfg.weight
  at_layers = cfg.saliency.layers if w('at') else ()
  xs = ops.student_view(x, cfg.factor, cfg.view)
  t = None
  if cfg.needs_teacher:
    t = _forward(teacher, teacher_params, x, at_layers)
    t = jax.tree_util.tree_map(jax.lax.stop_gradient, t)
  s = _forward(student, params, xs, at_layers)
  terms = {}
  if w('ce'):
    terms['ce'] = losses.cross_entropy(s.logits, labels)
  if w('kd'):
    terms['kd'] = losses.kd_loss(s.logits, t.logits, cfg.temperature, cfg.kd_form)
  if w('fm'):
    terms['fm'] = losses.fm_loss(s.acts[cfg.fm_layer], t.acts[cfg.fm_layer])
  if w('at'):
    terms['at'] = cfg.saliency.loss_fn(s, t, labels)
  if w('sr'):
    on_teacher_head = teacher.apply({'params': teacher_params}, s.acts['pooled'],
                                    method=teacher.head)
    terms['sr'] = losses.sr_loss(on_teacher_head, t.logits)
  total = sum(w(k) * v for k, v in terms.items())
  return total, terms


def _train_step(cfg, student, teacher, tx, state, teacher_params, batch):
  rng = jax.random.fold_in(state['rng'], state['step'])
  x = prepare_images(batch['image'], rng, cfg.augment)
  labels = batch['label']

  def loss_fn(params):
    return compute_losses(cfg, student, params, teacher, teacher_params, x, labels)

  (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))

  # Non-finite guard: freeze at the first bad step and remember which terms. A non-finite
  # gradient makes the global norm non-finite, so one scalar checks all gradients (a finite
  # gradient whose squared norm overflows float32, |g| > ~1e19, counts as non-finite too).
  finite = [jnp.isfinite(terms.get(t, jnp.float32(0))) for t in TERMS]
  finite += [jnp.isfinite(total), jnp.isfinite(grad_norm)]
  bad_mask = sum(jnp.where(good, 0, 1 << i) for i, good in enumerate(finite))
  ok = (bad_mask == 0) & (state['bad_step'] < 0)

  # The parameters are frozen by where(ok, params + updates, params), one elementwise update that
  # XLA does in place in the donated buffers. A where(ok, new, old) over the whole state (the
  # optimiser moments too) made XLA copy every buffer first, and a lax.cond around the update
  # changed how the update fuses, and so the last bits of the results (experiments/BENCHMARKS.md,
  # "Where the step's time went"). The moments of a bad step are not kept frozen: the run stops
  # at the next check, before anything of that step is saved or evaluated.
  updates, new_opt = tx.update(grads, state['opt_state'], state['params'])
  new_params = jax.tree_util.tree_map(lambda p, u: jnp.where(ok, p + u, p), state['params'],
                                      updates)
  new_state = {
      'step': state['step'] + 1,
      'params': new_params,
      'opt_state': new_opt,
      'rng': state['rng'],
      'bad_step': jnp.where((state['bad_step'] < 0) & (bad_mask != 0), state['step'],
                            state['bad_step']),
      'bad_terms': jnp.where(state['bad_terms'] == 0, bad_mask, state['bad_terms']),
  }
  metrics = {f'loss/{k}': v for k, v in terms.items()}
  metrics['loss/total'] = total
  metrics['grad_norm'] = grad_norm
  return new_state, metrics


def make_train_step(cfg: StepConfig, student, tx, mesh: Mesh, teacher=None, donate=True):
  """Jitted `train_step(state, teacher_params, batch) -> (state, metrics)` over `mesh`.

  batch = {'image': uint8 (B, H, W, 3), 'label': int32 (B,)}, sharded on `data`; state and teacher
  params replicated. For the teacher stage pass a CE-only cfg with factor 1 and teacher=None
  (teacher_params may then be None).
  """
  if cfg.needs_teacher and teacher is None:
    raise ValueError(f'terms {cfg.active_terms} need a teacher model')
  rep, bat = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  fn = lambda state, tparams, batch: _train_step(cfg, student, teacher, tx, state, tparams, batch)
  return jax.jit(fn, in_shardings=(rep, rep, bat), out_shardings=(rep, rep),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(model, factor: int, mesh: Mesh, view: str = 'upsampled'):
  """Jitted `eval_step(params, images_uint8) -> logits (B, C) float32` on the student view of
  full-resolution images (a native student runs on the pooled S / f image)."""
  def fn(params, images):
    x = ops.student_view(images.astype(jnp.float32) / 255.0, factor, view)
    logits, _ = model.apply({'params': params}, x)
    return logits
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def make_cam_step(model, factor: int, layer: str = 'block5', mode: str = 'atplus',
                  view: str = 'upsampled'):
  """Jitted `(params, images_uint8, labels) -> (maps of the true class (B, h, w), probs)`, used
  for the figures (maps at the model's own block size: smaller for a native student)."""
  def fn(params, images, labels):
    x = ops.student_view(images.astype(jnp.float32) / 255.0, factor, view)
    logits, _, maps = gradcam.gradcam(model, {'params': params}, x, layer, mode)
    true_maps = jnp.take_along_axis(maps, labels[:, None, None, None], axis=-1)[..., 0]
    return true_maps, jax.nn.softmax(logits)
  return jax.jit(fn)
