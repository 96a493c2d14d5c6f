"""Loss terms of the distillation objective, as pure functions (docs/method.md, "The objective").

Total = CE + a_kd KD + a_fm FM + a_at AT+ + a_sr SR; AT+ is composed in camkd_jax/saliency.py from
the normalisations and the per-sample RMSE below. Every loss takes arrays and returns a float32
scalar; teacher-side inputs are wrapped in stop_gradient here so callers cannot leak
gradients into the teacher. Nothing here reads a config.
"""
import jax
import jax.numpy as jnp

from camkd_jax import ops

# Below this range a min-max normalised map is treated as constant (the reference would give NaN).
MINMAX_EPS = 1e-12


def safe_sqrt(x):
  """sqrt with a finite gradient at 0 (gradient 0 there instead of inf/NaN)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def rmse(a, b):
  """sqrt(mean((a - b)^2)) over all elements."""
  d = ops.at_least_f32(a) - ops.at_least_f32(b)
  return safe_sqrt(jnp.mean(d * d))


def cross_entropy(logits, labels):
  """Batch mean of softmax cross-entropy with integer labels."""
  logp = jax.nn.log_softmax(ops.at_least_f32(logits))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def kd_loss(student_logits, teacher_logits, temperature=1.0, form='reference'):
  """Soft-label distillation.

  form='reference': mean_b sum_c -softmax(t/T)_c log_softmax(s)_c (no T on the student, no T^2).
  form='hinton': T^2 * mean_b KL(softmax(t/T) || softmax(s/T)).
  """
  t = ops.at_least_f32(jax.lax.stop_gradient(teacher_logits))
  s = ops.at_least_f32(student_logits)
  target = jax.nn.softmax(t / temperature)
  if form == 'reference':
    return jnp.mean(jnp.sum(-target * jax.nn.log_softmax(s), axis=-1))
  if form == 'hinton':
    kl = jnp.sum(target * (jax.nn.log_softmax(t / temperature)
                           - jax.nn.log_softmax(s / temperature)), axis=-1)
    return temperature ** 2 * jnp.mean(kl)
  raise ValueError(f'unknown KD form {form!r}; known: reference, hinton')


def fm_loss(student_feat, teacher_feat):
  """Feature matching: student map resized (bilinear, align corners) to the teacher's size, then
  sqrt(mean((F_s - F_t)^2)) over the whole batch tensor."""
  t = ops.at_least_f32(jax.lax.stop_gradient(teacher_feat))
  s = ops.resize_align_corners(ops.at_least_f32(student_feat), t.shape[1:3])
  return rmse(s, t)


def minmax_normalize(maps):
  """Per-sample min-max over the whole (H, W, C) stack; a constant map becomes all zeros."""
  maps = ops.at_least_f32(maps)
  axes = tuple(range(1, maps.ndim))
  lo = jnp.min(maps, axis=axes, keepdims=True)
  hi = jnp.max(maps, axis=axes, keepdims=True)
  span = hi - lo
  return (maps - lo) / jnp.where(span > MINMAX_EPS, span, 1.0)


def softmax_normalize(maps, temperature=0.01):
  """Per-sample softmax over all positions (H, W, C) of maps / temperature."""
  maps = ops.at_least_f32(maps)
  b = maps.shape[0]
  return jax.nn.softmax(maps.reshape(b, -1) / temperature, axis=-1).reshape(maps.shape)


def per_sample_rmse(a, b):
  """(B,) of sqrt(mean over all non-batch axes of (a - b)^2)."""
  d = ops.at_least_f32(a) - ops.at_least_f32(b)
  return safe_sqrt(jnp.mean((d * d).reshape(d.shape[0], -1), axis=-1))


def sr_loss(student_on_teacher_head, teacher_logits):
  """SR ("last" mode): RMSE between the teacher's classifier applied to the student's pooled
  features and the teacher's logits."""
  return rmse(student_on_teacher_head, jax.lax.stop_gradient(teacher_logits))
