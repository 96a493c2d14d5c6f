"""Writes a finished-run directory (config.json + teacher/ + student/ exports) for tests."""
import os

import jax
import numpy as np

from camkd_jax import checkpoints
from camkd_jax import distill
from camkd_jax import runs
from camkd_jax import sharding
from camkd_jax.models import get_model

CLASS_NAMES = ('NC', 'G3', 'G4', 'G5')
MEAN, STD = (0.842, 0.582, 0.733), (0.123, 0.120, 0.081)


def tiny_model(width=0.0625, num_classes=4):
  return get_model('vgg16', num_classes, width, 'float32', MEAN, STD)


def random_params(model, image_size, seed=0):
  """He-normal (fan-out) kernels, N(0, 0.01) head, zero biases, drawn with NumPy: the shapes of
  model.init without its 30 s eager threefry initialisers on a 2-core CPU."""
  shapes = jax.eval_shape(lambda: distill.init_params(model, jax.random.PRNGKey(0), image_size))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'bias' in name:
      return np.zeros(s.shape, np.float32)
    std = 0.01 if 'classifier' in name else np.sqrt(2.0 / (np.prod(s.shape[:2]) * s.shape[-1]))
    return (rng.standard_normal(s.shape) * std).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


class ExportData:
  """What runs.model_metadata reads of a run's data."""

  def __init__(self, image_size):
    self.image_size, self.class_names, self.num_classes = (image_size, list(CLASS_NAMES),
                                                           len(CLASS_NAMES))


def run_config(image_size=32, factor=4, seed=0, width=0.0625, config_extra=None):
  """The config of a tiny CE run (configs/ce_student.py:smoke=1) with these settings;
  config_extra: nested {key: value} overrides, e.g. {'student': {'view': 'native'}}."""
  from configs import ce_student  # pylint: disable=g-import-not-at-top
  config = ce_student.get_config('smoke=1')
  config.image_size, config.magnification, config.seed = image_size, 10.0 / factor, seed
  config.model.width, config.model.input_mean, config.model.input_std = width, MEAN, STD

  def apply(node, extra):
    for k, v in extra.items():
      apply(node[k], v) if isinstance(v, dict) else setattr(node, k, v)
  apply(config, config_extra or {})
  return config


def export_run(workdir, image_size=32, factor=4, teacher_params=None, student_params=None,
               seed=0, config_extra=None, width=0.0625):
  """A run directory as the trainer leaves it (its config.json, teacher/ and student/ with their
  metadata); random parameters unless given."""
  model = tiny_model(width)
  os.makedirs(workdir, exist_ok=True)
  config = run_config(image_size, factor, seed, width, config_extra)
  runs.write_json(os.path.join(workdir, runs.CONFIG_FILE), runs.config_dict(config))
  if teacher_params is None:
    teacher_params = random_params(model, image_size, 2 * seed)
  if student_params is None:
    student_params = random_params(model, image_size, 2 * seed + 1)
  data = ExportData(image_size)
  student_report = {'epoch': 1, 'magnification': 10.0 / factor, 'factor': factor,
                    'method': config.method}
  checkpoints.save_model(os.path.join(workdir, 'teacher'), teacher_params,
                         runs.model_metadata(config, data, {'epoch': 1}))
  checkpoints.save_model(os.path.join(workdir, 'student'), student_params,
                         runs.model_metadata(config, data, student_report, 'student'))
  return model, teacher_params, student_params


def synthetic_patches(n, size, seed):
  """n patches of the synthetic histology generator, classes cycling 0..3 (uint8, int32)."""
  from camkd_jax.datasets import synthetic_histology  # pylint: disable=g-import-not-at-top
  labels = np.arange(n) % len(CLASS_NAMES)
  images = np.stack([synthetic_histology.render_patch(np.random.default_rng([seed, 99, i]),
                                                      int(c), size)
                     for i, c in enumerate(labels)])
  return images, labels.astype(np.int32)


def train_tiny_teacher(image_size=32, steps=300, num_train=1024, num_test=256, seed=0):
  """A tiny VGG trained with CE at f=1 on fresh synthetic patches (~25 s on 2 CPU cores).

  Returns (model, params, test accuracy on `num_test` held-out patches, num_test)."""
  import optax  # pylint: disable=g-import-not-at-top
  model = tiny_model()
  x, y = synthetic_patches(num_train, image_size, seed + 1)
  mesh = sharding.make_mesh()
  tx = optax.adam(1e-3)
  params = random_params(model, image_size, seed)
  state = sharding.replicate(distill.create_train_state(params, tx, jax.random.PRNGKey(1)), mesh)
  step = distill.make_train_step(distill.StepConfig(factor=1), model, tx, mesh)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, num_train, 32)
    state, _ = step(state, None, sharding.shard_batch({'image': x[idx], 'label': y[idx]}, mesh))
  params = jax.device_get(state['params'])
  xt, yt = synthetic_patches(num_test, image_size, seed + 2)
  logits = distill.make_eval_step(model, 1, mesh)(params, xt)
  accuracy = float((np.asarray(logits).argmax(1) == yt).mean())
  return model, params, accuracy, num_test
