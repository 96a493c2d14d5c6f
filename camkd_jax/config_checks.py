"""Start-up checks of a run's config: every key the run would trip over later is named now.

  validate_config(config, num_devices)   raises errors.ConfigError naming the key and the fix
  parse_seeds(config)                    config.seeds '22,32,43' -> [22, 32, 43]
  step_configs(config)                   the (teacher, student) distill.StepConfig of the run

The keys and their defaults are defined in configs/base.py.
"""
from typing import List

from absl import logging

from camkd_jax import distill
from camkd_jax import errors
from camkd_jax import models
from camkd_jax import ops
from camkd_jax import parsing
from camkd_jax import runs
from camkd_jax import slide_level
from camkd_jax import weights
from camkd_jax.models import vgg

METHODS = ('teacher', 'ce', 'kd', 'fm', 'at', 'sr', 'attn_kd', 'custom')
DATASETS = ('synthetic_histology', 'sicapv2', 'folder', 'table')
SELECTION_METRICS = ('kappa', 'balanced_accuracy', 'accuracy', slide_level.SELECTION_METRIC)


def validate_config(config, num_devices: int):
  """Fails early, naming the config key, on anything the run would trip over later (ConfigError,
  or ModelExportError for a broken config.teacher.checkpoint)."""
  try:
    _validate_config(config, num_devices)
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e


def _validate_config(config, num_devices: int):
  for key in ('magnification', 'base_magnification'):
    value = float(config[key])
    if not value > 0:  # NaN included
      raise ValueError(
          f'config.{key}={value:g} is not a magnification: use a positive objective power such '
          f'as 10, 5, 2.5, 1.25 or 0.625 (base_magnification / a power of two)')
  if config.method not in METHODS:
    raise ValueError(f'unknown config.method {config.method!r}; known: {list(METHODS)}')
  if config.data.name not in DATASETS:
    raise ValueError(f'unknown config.data.name {config.data.name!r}; known: {list(DATASETS)}')
  if config.selection.metric not in SELECTION_METRICS:
    raise ValueError(f'unknown config.selection.metric {config.selection.metric!r}; known: '
                     f'{list(SELECTION_METRICS)}')
  try:
    factor = ops.magnification_factor(config.magnification, config.base_magnification)
  except ValueError as e:
    raise ValueError(f'config.magnification: {e}') from e
  if config.image_size % factor:
    raise ValueError(f'config.image_size={config.image_size} is not divisible by the student '
                     f'factor {factor} (config.magnification={config.magnification})')
  validate_view(config, factor)
  for key in ('batch_size', 'eval_batch_size'):
    value = int(config[key])
    if value <= 0 or value % num_devices:
      raise ValueError(f'config.{key}={value} is not a positive multiple of the number of '
                       f'devices ({num_devices}); choose a multiple of {num_devices}')
  for key in ('num_epochs', 'log_every_steps'):
    if int(config[key]) <= 0:
      raise ValueError(f'config.{key} must be > 0, got {config[key]}')
  if int(config.teacher.num_epochs) <= 0:
    raise ValueError(f'config.teacher.num_epochs must be > 0, got {config.teacher.num_epochs}')
  if int(config.checkpoint_every_steps) < 0:
    raise ValueError('config.checkpoint_every_steps must be >= 0 (0: only at epoch ends)')
  if config.teacher.checkpoint:
    runs.check_export(config.teacher.checkpoint)  # raises, naming what is missing
  models.get_model(config.model.name, 2, config.model.width, config.model.dtype)
  validate_init(config)
  distill.make_optimizer(config.optimizer)
  parse_seeds(config)
  step_configs(config)


STUDENT_INITS = ('', 'imagenet', 'random', 'teacher')
MIN_INPUT_SIZE = vgg.MIN_INPUT_SIZE


def validate_view(config, factor: int):
  """config.student.view is known; a native student's input (S / f) still reaches block5."""
  view = ops.check_view(config.student.view, 'config.student.view')
  size = ops.student_input_size(int(config.image_size), factor, view)
  if config.method != 'teacher' and size < MIN_INPUT_SIZE:
    raise ValueError(
        f'config.student.view=native at magnification {config.magnification:g}x gives the student '
        f'{size}x{size} px inputs (config.image_size={config.image_size} / factor {factor}), but '
        f'VGG16 needs at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (four 2x2 pools before block5). '
        f'Use a magnification of at least '
        f'{config.base_magnification * MIN_INPUT_SIZE / config.image_size:g}x, a larger '
        'config.image_size, or config.student.view=upsampled.')
  spatial = [t for t in ('fm', 'at') if float(config.loss[t])]
  if config.method != 'teacher' and view == 'native' and size < 2 * MIN_INPUT_SIZE and spatial:
    logging.warning(
        'config.student.view=native: the student\'s %dx%d px input leaves a 1x1 block5 map, so '
        '%s compare(s) maps with no spatial extent (measured: the native 2.5x FM + AT+ student '
        'of 64 px images stays near chance; see docs/native.md). Consider a larger '
        'config.image_size or a higher magnification.', size, size, ' and '.join(
            t.upper() if t == 'fm' else 'AT+' for t in spatial))


def validate_init(config):
  """Known init choices; pretrained trunks only at width 1.0; the ImageNet file present."""
  if config.student.init not in STUDENT_INITS:
    raise ValueError(f'unknown config.student.init {config.student.init!r}; known: '
                     f"{list(STUDENT_INITS)} ('' = the same as config.model.init_weights)")
  weights.resolve_head_init(config.model.head_init, config.model.init_weights)
  for stage in ('teacher', 'student'):
    spec = weights.stage_init(config, stage)['weights']
    if spec and spec != 'teacher':
      what = 'config.model.init_weights' if stage == 'teacher' else 'config.student.init'
      weights.check_pretrained_width(spec, config.model.width, what)
      if spec == 'imagenet':
        weights.imagenet_vgg16_path()  # raises, naming the install command


def parse_seeds(config) -> List[int]:
  """config.seeds '22,32,43' -> [22, 32, 43]; '' -> [config.seed]."""
  text = str(config.seeds).strip()
  if not text:
    return [int(config.seed)]
  try:
    seeds = [int(s) for s in parsing.split_list(text.replace(';', ','))]
  except ValueError as e:
    raise ValueError(f'config.seeds={text!r} must be comma-separated integers') from e
  if len(set(seeds)) != len(seeds) or not seeds:
    raise ValueError(f'config.seeds={text!r} must list distinct integers')
  return seeds


def step_configs(config):
  """(teacher StepConfig, student StepConfig) of the run (distill.StepConfig.from_config)."""
  return (distill.StepConfig.from_config(config, 'teacher'),
          distill.StepConfig.from_config(config, 'student'))
