"""Writing your own saliency loss: register a map and a distance, then select them by name.

Run from the repository root (about ten seconds on a CPU):

  python examples/custom_saliency.py

It prints the AT term of a tiny random teacher/student pair twice: with the reference AT+
(gradcam_plus, minmax, rmse) and with the custom parts registered below, and the norm of the
gradient the custom term sends to the student (second order, through the Grad-CAM gradient).
"""
import os
import sys

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from camkd_jax import distill  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import gradcam  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import saliency  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax.models import get_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def gradcam_abs(sal, layer, labels):
  """Grad-CAM counting evidence of either sign: sum_k |w_{c,k} A_k|, all classes (B, H, W, C).

  sal.acts[layer] is (B, H, W, K); sal.grads[layer] is (C, B, H, W, K), d logit_c / d A.
  """
  del labels  # an all-class map; a per-label map would index with them
  w = gradcam.channel_weights(sal.grads[layer])           # (C, B, K) spatial mean of gradients
  a = sal.acts[layer].astype(jnp.float32)
  return jnp.einsum('bhwk,cbk->bhwc', jnp.abs(a), jnp.abs(w))


def huber(s, t, delta=0.1):
  """Per-sample mean Huber loss between two normalised map stacks -> (B,)."""
  d = jnp.abs(s - t).reshape(s.shape[0], -1)
  return jnp.mean(jnp.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta)), axis=-1)


# Register before the step is built (e.g. in a module your config file imports), so that
# --config.attention.map=gradcam_abs --config.attention.distance=huber resolve.
saliency.register_map('gradcam_abs', gradcam_abs)        # reads gradients: needs_grads=True
saliency.register_distance('huber', huber)


def at_term(config, student, teacher, t_params, images, labels):
  """The AT term as a function of the student's parameters, as the train step computes it."""
  cfg = distill.StepConfig.from_config(config)            # checks the names at start-up
  return lambda params: distill.compute_losses(
      cfg, student, params, teacher, t_params, images, labels)[1]['at']


def random_params(model, size, seed):
  """He-normal stand-ins for trained parameters (NumPy: no PRNG kernels to compile on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  r = np.random.RandomState(seed)
  he = lambda s: r.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
  return jax.tree_util.tree_map(he, shapes['params'])


def main():
  config = base.base_config('smoke=1')                    # tiny VGG16, 32x32, student at 2.5x
  config.loss.at = 10.0
  model = get_model(config.model.name, 4, width=config.model.width)
  size = config.image_size
  s_params, t_params = random_params(model, size, 0), random_params(model, size, 1)
  images = np.random.RandomState(2).rand(4, size, size, 3).astype(np.float32)
  labels = np.arange(4, dtype=np.int32)

  default = jax.jit(at_term(config, model, model, t_params, images, labels))(s_params)
  config.attention.map = 'gradcam_abs'
  config.attention.distance = 'huber'
  custom_at = at_term(config, model, model, t_params, images, labels)
  custom, grads = jax.jit(jax.value_and_grad(custom_at))(s_params)
  print(f'default AT+ (gradcam_plus, minmax, rmse): {float(default):.6f}')
  print(f'custom      (gradcam_abs, minmax, huber): {float(custom):.6f}')
  print(f'custom gradient norm (student params):    {float(optax.global_norm(grads)):.6f}')


if __name__ == '__main__':
  main()
