r"""`python -m camkd_jax.benchmark` with one feature of the train step changed, for the breakdown
in experiments/BENCHMARKS.md ("Where the step's time went"). VARIANT (environment) replaces
camkd_jax.distill._train_step of the checkout on PYTHONPATH by:

  nofreeze  no non-finite guard: the optimiser update is applied unconditionally
  where     finiteness from the loss terms and the gradients' global norm, the state frozen by
            jnp.where(ok, new, old) over every buffer (the per-buffer isfinite checks removed)
  cond_out  the update computed outside, lax.cond choosing between the new and the old state
  cond      the update computed inside lax.cond (no copies either, but the update fuses
            differently and the results change in the last bits)
  (camkd_jax.distill itself masks the parameter update only: where(ok, params + updates, params))

  VARIANT=nofreeze python experiments/step_variants.py --programs=distill --terms=ce,fm,at \
      --width=1.0 --image_size=64 --factor=4 --batch_size=8 --no_augment --dtypes=float32
"""
import os
import sys

import jax
import jax.numpy as jnp
import optax

from camkd_jax import benchmark
from camkd_jax import distill

VARIANTS = ('nofreeze', 'where', 'cond_out', 'cond')


def make_train_step_variant(variant):
  """A replacement for distill._train_step with the given guard."""
  def train_step(cfg, student, teacher, tx, state, teacher_params, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    x = distill.prepare_images(batch['image'], rng, cfg.augment)
    labels = batch['label']

    def loss_fn(params):
      return distill.compute_losses(cfg, student, params, teacher, teacher_params, x, labels)

    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    grad_norm = optax.global_norm(grads)
    finite = [jnp.isfinite(terms.get(t, jnp.float32(0))) for t in distill.TERMS]
    finite += [jnp.isfinite(total), jnp.isfinite(grad_norm)]
    bad_mask = sum(jnp.where(good, 0, 1 << i) for i, good in enumerate(finite))
    ok = (bad_mask == 0) & (state['bad_step'] < 0)
    params, opt_state = state['params'], state['opt_state']

    def update(operand):
      p, o, g = operand
      updates, new_o = tx.update(g, o, p)
      return optax.apply_updates(p, updates), new_o

    if variant == 'cond':
      new_params, new_opt = jax.lax.cond(ok, update, lambda op: op[:2], (params, opt_state, grads))
    else:
      new_params, new_opt = update((params, opt_state, grads))
      if variant == 'where':
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
      elif variant == 'cond_out':
        new_params, new_opt = jax.lax.cond(ok, lambda: (new_params, new_opt),
                                           lambda: (params, opt_state))
    new_state = {
        'step': state['step'] + 1, 'params': new_params, 'opt_state': new_opt,
        'rng': state['rng'],
        'bad_step': jnp.where((state['bad_step'] < 0) & (bad_mask != 0), state['step'],
                              state['bad_step']),
        'bad_terms': jnp.where(state['bad_terms'] == 0, bad_mask, state['bad_terms']),
    }
    metrics = {f'loss/{k}': v for k, v in terms.items()}
    metrics['loss/total'], metrics['grad_norm'] = total, grad_norm
    return new_state, metrics
  return train_step


if __name__ == '__main__':
  name = os.environ.get('VARIANT', '')
  if name not in VARIANTS:
    sys.exit(f'set VARIANT to one of {", ".join(VARIANTS)}')
  distill._train_step = make_train_step_variant(name)  # pylint: disable=protected-access
  benchmark.main(sys.argv[1:])
