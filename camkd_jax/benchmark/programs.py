"""The jitted programs, built from the run config exactly as the trainer builds its own.

`run_config` makes the run config of one configuration (configs/base.py with --config_arg, then
the flags); `build_program` builds its program with distill.StepConfig.from_config,
models.from_config, distill.make_optimizer and distill.make_train_step / make_eval_step, on
NumPy-drawn parameters and device-resident random uint8 batches.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from camkd_jax import distill
from camkd_jax import models
from camkd_jax import sharding
from camkd_jax.benchmark.suites import Case, NUM_CLASSES


def run_config(case: Case, args):
  """The run config whose training program this case times: configs/base.py with --config_arg,
  then the benchmark's flags (model, width, image size, dtype, magnification from the factor, the
  case's loss terms and their weights, AT map and layer, augmentation, learning rate). The program
  is built from it as the trainer builds its own (distill.StepConfig.from_config,
  models.from_config, distill.make_optimizer), so the benchmark times what training runs."""
  try:
    from configs import base  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name == 'configs':
      raise SystemExit('camkd_jax.benchmark: run it from the repository root (it builds its '
                       'programs from configs/base.py)') from e
    raise SystemExit(f'camkd_jax.benchmark: configs/base.py needs the package {e.name}: '
                     f'pip install {e.name.replace("_", "-")}') from e
  c = base.base_config(args.config_arg or None)
  c.model.name, c.model.width, c.model.dtype = args.model, float(args.width), case.dtype
  c.image_size = int(args.image_size)
  c.magnification = c.base_magnification / case.student_factor(args)
  weight = {'ce': 1.0, 'kd': args.a_kd, 'fm': args.a_fm, 'at': args.a_at, 'sr': args.a_sr}
  for term in distill.TERMS:
    setattr(c.loss, term, float(weight[term]) if term in case.terms else 0.0)
  c.attention.map, c.attention.layers = args.at_map, args.at_layer
  c.augment.enabled = not args.no_augment
  c.optimizer.name, c.optimizer.learning_rate = 'adam', float(args.learning_rate)
  c.student.view = case.view
  return c


@dataclasses.dataclass
class Program:
  """A jitted program, the abstract arguments to lower it with and a way to make real ones."""
  jitted: object
  abstract_args: tuple
  make_args: object        # () -> concrete device args
  carries_state: bool      # train steps return the (donated) state as their first output
  batch: int


def _init_fn(model, image_size):
  # Parameter shapes do not depend on the image size (global average pooling), so a small
  # init image keeps initialisation cheap; 32 px still reaches block5.
  size = min(image_size, 32)
  return lambda rng: distill.init_params(model, rng, size)


def _numpy_params(init, key, seed):
  """Parameters of `init`'s shapes drawn with NumPy: He-normal (fan-in) kernels, zero biases.
  The timings do not depend on the values, and no PRNG init kernels get compiled (tens of
  seconds per model on a busy 2-core CPU)."""
  rng = np.random.default_rng(seed)

  def leaf(s):
    if len(s.shape) < 2:
      return np.zeros(s.shape, np.float32)
    std = np.sqrt(2.0 / np.prod(s.shape[:-1]))
    return (std * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map(leaf, jax.eval_shape(init, key))


def _batch(rng: np.random.Generator, batch, size):
  return {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (batch,), dtype=np.int32)}


def _abstract_batch(batch, size):
  return {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}


def build_program(case: Case, args, mesh) -> Program:
  """Builds the jitted program with distill.make_train_step / make_eval_step."""
  config = run_config(case, args)
  model = models.from_config(config.model, NUM_CLASSES)
  init = _init_fn(model, args.image_size)
  key = jax.random.PRNGKey(args.seed)
  np_rng = np.random.default_rng(args.seed)
  size = args.image_size

  if case.program == 'eval':
    sharding.check_batch_size(args.eval_batch_size, mesh, 'eval_batch_size')
    fn = distill.make_eval_step(model, case.student_factor(args), mesh, case.view)
    abstract = (jax.eval_shape(init, key),
                jax.ShapeDtypeStruct((args.eval_batch_size, size, size, 3), jnp.uint8))

    def make_args():
      params = sharding.replicate(_numpy_params(init, key, args.seed), mesh)
      images = _batch(np_rng, args.eval_batch_size, size)['image']
      return params, sharding.shard_batch({'image': images}, mesh)['image']
    return Program(fn, abstract, make_args, False, args.eval_batch_size)

  sharding.check_batch_size(args.batch_size, mesh)
  stage = 'teacher' if case.program == 'teacher' else 'student'
  cfg = distill.StepConfig.from_config(config, stage)
  tx = distill.make_optimizer(config.optimizer)
  teacher = model if cfg.needs_teacher else None  # one architecture, as in training
  fn = distill.make_train_step(cfg, model, tx, mesh, teacher=teacher)
  skey, tkey, rkey = jax.random.split(key, 3)
  make_state = lambda: distill.create_train_state(init(skey), tx, rkey)
  tinit = _init_fn(teacher, size) if teacher is not None else None
  abstract = (jax.eval_shape(make_state),
              jax.eval_shape(tinit, tkey) if tinit else None,
              _abstract_batch(args.batch_size, size))

  def make_args():
    params = _numpy_params(init, skey, args.seed)
    state = sharding.replicate(jax.jit(lambda p: distill.create_train_state(p, tx, rkey))(
        params), mesh)
    tparams = (sharding.replicate(_numpy_params(tinit, tkey, args.seed + 1), mesh)
               if tinit else None)
    # Two different batches alternate, so no step can reuse a cached result.
    batches = [sharding.shard_batch(_batch(np_rng, args.batch_size, size), mesh)
               for _ in range(2)]
    return state, tparams, batches
  return Program(fn, abstract, make_args, True, args.batch_size)

