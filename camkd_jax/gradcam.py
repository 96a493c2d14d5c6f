"""Grad-CAM over named intermediate activations, all classes at once, with JAX autodiff.

One forward pass of the network up to the earliest requested activation, then `jax.vjp` of the
rest (the "tail") with respect to that activation and to zero perturbations of any later ones.
The VJP is vectorised over the C one-hot cotangents with `jax.vmap`, so the gradients of every
class logit with respect to every requested activation come from one batched backward pass: no
Python loop over classes and no second forward. Everything stays differentiable, so a loss on the
student's maps back-propagates through these gradients (second order).
"""
from typing import Dict, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from camkd_jax import ops
from camkd_jax.models.vgg import layer_order


class Saliency(NamedTuple):
  """What one forward + one vectorised VJP yields."""
  logits: jax.Array                 # (B, C) float32
  acts: Dict[str, jax.Array]        # every activation computed (includes 'pooled')
  grads: Dict[str, jax.Array]       # name -> (C, B, H, W, K): d logit_c / d activation


def forward_with_grads(model, variables, x, layers: Sequence[str]) -> Saliency:
  """Logits, activations and all-class gradients w.r.t. the activations named in `layers`."""
  layers = sorted(set(layers), key=layer_order)
  first, later = layers[0], layers[1:]
  if first == 'input':
    a0 = x
  else:
    _, head_acts = model.apply(variables, x, stop=first)
    a0 = head_acts[first]
  # Shapes of the later activations, without running anything (abstract evaluation).
  shapes = jax.eval_shape(lambda a: model.apply(variables, a, start=first)[1], a0)
  zeros = {name: jnp.zeros(shapes[name].shape, shapes[name].dtype) for name in later}

  def tail(a, deltas):
    logits, acts = model.apply(variables, a, start=first, perturb=deltas)
    return logits, acts

  logits, vjp_fn, acts = jax.vjp(tail, a0, zeros, has_aux=True)
  num_classes = logits.shape[-1]
  cotangents = jnp.broadcast_to(jnp.eye(num_classes, dtype=logits.dtype)[:, None, :],
                                (num_classes,) + logits.shape)
  g0, gdeltas = jax.vmap(vjp_fn)(cotangents)
  grads = {first: g0, **gdeltas}
  if first == 'input':
    acts = {**acts, 'input': x}
  return Saliency(logits, acts, grads)


def channel_weights(grads):
  """w_{c,b,k}: spatial mean of the class gradients (C, B, H, W, K) -> (C, B, K), float32."""
  return jnp.mean(ops.at_least_f32(grads), axis=(2, 3))


def cam_plus(act, grads):
  """AT+ maps: sum_k ReLU(w_{c,k} A_k), ReLU per channel before the sum. Returns (B, H, W, C).

  Uses ReLU(w a) = ReLU(w) ReLU(a) + ReLU(-w) ReLU(-a) (exact for all signs), so the (C,B,H,W,K)
  product never materialises: two contractions over K instead.
  """
  w = channel_weights(grads)
  a = ops.at_least_f32(act)
  return (jnp.einsum('bhwk,cbk->bhwc', jax.nn.relu(a), jax.nn.relu(w))
          + jnp.einsum('bhwk,cbk->bhwc', jax.nn.relu(-a), jax.nn.relu(-w)))


def cam_classic(act, grads):
  """Classic Grad-CAM: ReLU(sum_k w_{c,k} A_k). Returns (B, H, W, C)."""
  w = channel_weights(grads)
  return jax.nn.relu(jnp.einsum('bhwk,cbk->bhwc', ops.at_least_f32(act), w))


CAM_MODES = {'atplus': cam_plus, 'classic': cam_classic}


def gradcam(model, variables, x, layer: str = 'block5', mode: str = 'atplus'):
  """Grad-CAM maps for all classes in one call.

  Returns (logits (B, C), activation (B, H, W, K), maps (B, H, W, C) float32).
  """
  if mode not in CAM_MODES:
    raise ValueError(f'unknown Grad-CAM mode {mode!r}; known: {sorted(CAM_MODES)}')
  s = forward_with_grads(model, variables, x, [layer])
  return s.logits, s.acts[layer], CAM_MODES[mode](s.acts[layer], s.grads[layer])
