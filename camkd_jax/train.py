"""The driver: teacher stage, student stage, evaluation, model selection, checkpoints, reports.

  run(config, workdir)
    validate the config -> check / write workdir/config.json (camkd_jax.workdir) -> per seed:
    train_and_evaluate -> metrics.json (+ mean and sample std over seeds), results.md, a
    one-screen summary (camkd_jax.reporting)
  train_and_evaluate(config, workdir)
    data -> teacher (load workdir/teacher or config.teacher.checkpoint, else train it: CE at f=1)
    -> student (distillation step at f = base_magnification / magnification)
    -> figures/gradcam.png

Both stages run the same loop (`StageRunner`): the compiled step of camkd_jax.distill, evaluation
of validation and test after every epoch, selection on the validation metric (the reference's
rule: the first epoch sets the best, later ones must beat it by more than min_delta), and an
orbax checkpoint at every epoch end and every config.checkpoint_every_steps steps. A rerun of the
same command resumes from the latest checkpoint and ends with the same numbers: the data order is
a function of (seed, epoch), the augmentation of fold_in(rng, step), and the running loss sums of
a partial epoch travel in the checkpoint.

Every process runs this code (multi-host): orbax calls are collective, files are written by
process 0 only, and evaluation gathers every process's predictions before computing metrics.
"""
import dataclasses
import os
import signal
import time
from typing import Any, Dict, List, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from camkd_jax import checkpoints
from camkd_jax import distill
from camkd_jax import distributed
from camkd_jax import errors
from camkd_jax import interrupts
from camkd_jax import metrics as metrics_lib
from camkd_jax import models
from camkd_jax import ops
from camkd_jax import reporting
from camkd_jax import sharding
from camkd_jax import slide_level
from camkd_jax import workdir as workdir_lib
from camkd_jax.models import vgg

METHODS = ('teacher', 'ce', 'kd', 'fm', 'at', 'sr', 'attn_kd', 'custom')
DATASETS = ('synthetic_histology', 'sicapv2', 'folder', 'table')
SELECTION_METRICS = ('kappa', 'balanced_accuracy', 'accuracy', slide_level.SELECTION_METRIC)


# ----------------------------------------------------------------------------- config checks
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
    checkpoints.check_export(config.teacher.checkpoint)  # raises, naming what is missing
  models.get_model(config.model.name, 2, config.model.width, config.model.dtype)
  validate_init(config)
  distill.make_optimizer(config.optimizer)
  parse_seeds(config)
  step_configs(config)


STUDENT_INITS = ('', 'imagenet', 'random', 'teacher')
MIN_INPUT_SIZE = vgg.MIN_INPUT_SIZE


def validate_view(config, factor: int):
  """config.student.view is known; a native student's input (S / f) still reaches block5."""
  view = config.student.view
  if view not in ops.VIEWS:
    raise ValueError(f'unknown config.student.view {view!r}; known: {list(ops.VIEWS)}')
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
  from camkd_jax import weights  # pylint: disable=g-import-not-at-top
  if config.student.init not in STUDENT_INITS:
    raise ValueError(f'unknown config.student.init {config.student.init!r}; known: '
                     f"{list(STUDENT_INITS)} ('' = the same as config.model.init_weights)")
  weights.resolve_head_init(config.model.head_init, config.model.init_weights)
  for stage in ('teacher', 'student'):
    spec = stage_init(config, stage)['weights']
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
    seeds = [int(s) for s in text.replace(';', ',').split(',') if s.strip()]
  except ValueError as e:
    raise ValueError(f'config.seeds={text!r} must be comma-separated integers') from e
  if len(set(seeds)) != len(seeds) or not seeds:
    raise ValueError(f'config.seeds={text!r} must list distinct integers')
  return seeds


def step_configs(config):
  """(teacher StepConfig, student StepConfig) of the run (distill.StepConfig.from_config)."""
  return (distill.StepConfig.from_config(config, 'teacher'),
          distill.StepConfig.from_config(config, 'student'))


# ----------------------------------------------------------------------------- entry points
def run(config, workdir: str) -> Dict[str, Any]:
  """Validates `config`, runs every seed in `workdir` and writes metrics.json / results.md."""
  mesh = sharding.make_mesh()
  validate_config(config, mesh.size)
  seeds = parse_seeds(config)
  workdir_lib.prepare_workdir(config, workdir)
  logging.info('workdir %s | method %s | %d device(s), %d process(es) | seeds %s', workdir,
               config.method, mesh.size, jax.process_count(), seeds)
  runs = {}
  for i, seed in enumerate(seeds):
    cfg = config.copy_and_resolve_references()
    cfg.seed = seed
    sub = os.path.join(workdir, f'seed_{seed}') if str(config.seeds).strip() else workdir
    if sub != workdir:
      checkpoints.write_json(os.path.join(sub, 'config.json'), workdir_lib.config_dict(cfg))
    runs[seed] = train_and_evaluate(cfg, sub, mesh, later_seeds=len(seeds) - 1 - i)
  out = reporting.combine_seeds(runs)
  checkpoints.write_json(os.path.join(workdir, 'metrics.json'), out)
  if distributed.is_main():
    reporting.write_results(out, workdir, config.selection.metric,
                            float(config.base_magnification))
  return out


def stage_steps(config, steps_per_epoch: int, num_epochs: int) -> int:
  """Training steps of a stage: num_epochs epochs, capped by config.max_steps (> 0)."""
  total = int(num_epochs) * int(steps_per_epoch)
  return min(total, int(config.max_steps)) if config.max_steps > 0 else total


def later_stage_steps(config, spe: int, later_seeds: int) -> Tuple[int, int]:
  """(steps after the teacher stage, steps after the student stage) of the whole run, for the
  ETA: this seed's student, then every later seed's teacher (unless given) and student."""
  student = stage_steps(config, spe, config.num_epochs) if config.method != 'teacher' else 0
  teacher = 0 if config.teacher.checkpoint else stage_steps(config, spe,
                                                             config.teacher.num_epochs)
  after_student = later_seeds * (teacher + student)
  return student + after_student, after_student


def train_and_evaluate(config, workdir: str, mesh=None, later_seeds: int = 0) -> Dict[str, Any]:
  """One teacher + one student for config.seed; returns (and writes) the run's metrics.
  later_seeds: how many seeds run after this one (for the whole-run ETA)."""
  from camkd_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  mesh = mesh or sharding.make_mesh()
  t0 = time.time()
  # Process 0 first: on a shared data_dir concurrent TFDS builds would race on the final rename.
  data = distributed.main_process_first(lambda: input_pipeline.get_data(
      config, process_index=jax.process_index(), process_count=jax.process_count()))
  logging.info('data %s: %s examples, %d classes %s, %d steps/epoch of %d', config.data.name,
               data.num_examples, data.num_classes, data.class_names, data.steps_per_epoch,
               data.global_batch_size)
  config = input_pipeline.prepare_run(config, data, workdir)  # split record, 'auto' inputs
  data.slide_level = slide_level.setup(config, data)  # None without slide labels
  slide_level.check_selection(config, data.slide_level)
  teacher_cfg, student_cfg = step_configs(config)
  model = models.from_config(config.model, data.num_classes)
  after_teacher, after_student = later_stage_steps(config, data.steps_per_epoch, later_seeds)
  teacher_params, teacher_report = obtain_teacher(config, workdir, data, mesh, model,
                                                  teacher_cfg, later_steps=after_teacher)
  result = {'teacher': teacher_report, 'seeds': [int(config.seed)]}
  if data.notes:
    result['data_notes'] = list(data.notes)
  columns = [('teacher', model, teacher_params, 1, 'upsampled')]
  if config.method != 'teacher':
    stage = Stage('student', config, workdir, model, student_cfg, int(config.num_epochs),
                  *stage_seeds(config.seed, 2),
                  teacher_model=model, teacher_params=teacher_params, later_steps=after_student)
    student_params, report = StageRunner(stage, data, mesh).run()
    report.update(magnification=float(config.magnification), factor=student_cfg.factor,
                  view=student_cfg.view, method=config.method)
    checkpoints.save_model(os.path.join(workdir, 'student'), student_params,
                           model_metadata(config, data, report, 'student'))
    result['student'] = report
    columns.append(('student', model, student_params, student_cfg.factor, student_cfg.view))
  if distributed.is_main() and config.num_figure_images > 0:
    save_figure(os.path.join(workdir, 'figures', 'gradcam.png'), columns, data,
                config.num_figure_images, float(config.base_magnification))
  result['wall_time_s'] = time.time() - t0
  result['summary'] = reporting.summarize_runs([result])
  checkpoints.write_json(os.path.join(workdir, 'metrics.json'), result)
  return result


# ----------------------------------------------------------------------------- teacher
def model_metadata(config, data, report, stage: str = 'teacher') -> Dict[str, Any]:
  """What a loader must check before using exported parameters (and where they started)."""
  return {'model': {'name': config.model.name, 'width': float(config.model.width),
                    'dtype': config.model.dtype,
                    'input_mean': [float(v) for v in config.model.get('input_mean', ())],
                    'input_std': [float(v) for v in config.model.get('input_std', ())]},
          'image_size': int(data.image_size), 'class_names': list(data.class_names),
          'num_classes': int(data.num_classes), 'seed': int(config.seed),
          'dataset': config.data.name, 'init': stage_init(config, stage),
          'view': config.student.view if stage == 'student' else 'upsampled', 'report': report}


def _get_path(d, dotted):
  for k in dotted.split('.'):
    d = d.get(k, '<absent>') if isinstance(d, dict) else '<absent>'
  return d


def check_teacher_metadata(meta, config, data, path):
  """Refuses a teacher whose architecture (name, width, input standardisation), input size or
  classes differ from this run's."""
  want = model_metadata(config, data, None)
  problems = []
  for key in ('model.name', 'model.width', 'model.input_mean', 'model.input_std', 'image_size',
              'class_names'):
    have, need = _get_path(meta, key), _get_path(want, key)
    if have != need:
      problems.append(f'{key}: teacher {have!r}, this config {need!r}')
  if problems:
    own = not config.teacher.checkpoint
    fix = ('Pass --config.overwrite=True --config.overwrite_teacher=True to delete it and train a '
           'new one, use another --workdir, or set the config to the teacher\'s values.' if own else
           'Train a matching teacher (leave config.teacher.checkpoint empty and use a fresh '
           'workdir) or set the config to the teacher\'s values.')
    raise errors.WorkdirError(f'the teacher in {path} does not match this run:\n  ' +
                              '\n  '.join(problems) + '\n' + fix)


def abstract_params(model, image_size, mesh):
  """Shapes, dtypes and (replicated) shardings of the model's parameters, computing nothing."""
  return distill.abstract_params(model, image_size, sharding.replicated(mesh))


def obtain_teacher(config, workdir, data, mesh, model, step_cfg, later_steps: int = 0):
  """The teacher's parameters (loaded, or trained and exported to workdir/teacher) + report."""
  path = config.teacher.checkpoint or os.path.join(workdir, 'teacher')
  template = abstract_params(model, data.image_size, mesh)
  if config.teacher.checkpoint or checkpoints.is_finished_model(path):
    meta = checkpoints.read_metadata(path)
    check_teacher_metadata(meta, config, data, path)
    params, meta = checkpoints.load_model(path, template)
    logging.info('teacher: loaded %s (epoch %s)', path, (meta.get('report') or {}).get('epoch'))
    report = evaluate_model(model, params, 1, data, mesh)
    report.update({k: v for k, v in (meta.get('report') or {}).items()
                   if k in ('epoch', 'step', 'train', 'history')})
    report['checkpoint'] = os.path.abspath(path)
    return params, report
  stage = Stage('teacher', config, workdir, model, step_cfg, int(config.teacher.num_epochs),
                *stage_seeds(config.seed, 1), later_steps=later_steps)
  params, report = StageRunner(stage, data, mesh).run()
  checkpoints.save_model(path, params, model_metadata(config, data, report))
  report['checkpoint'] = os.path.abspath(path)
  return params, report


# ----------------------------------------------------------------------------- evaluation
def predict(eval_step, params, data, split, mesh) -> Tuple[np.ndarray, np.ndarray]:
  """(labels, predicted classes) of every example of `split`, gathered from all processes."""
  logits, labels, masks = [], [], []
  for batch in data.eval_batches(split):
    g = sharding.shard_batch(batch, mesh)
    logits.append(eval_step(params, g['image']))
    labels.append(g['label'])
    masks.append(g['mask'])
  mask = np.concatenate([sharding.to_host(m) for m in masks]).astype(bool)
  preds = np.concatenate([np.argmax(sharding.to_host(x), axis=-1) for x in logits])
  labels = np.concatenate([sharding.to_host(y) for y in labels])
  return labels[mask], preds[mask]


def evaluate(eval_step, params, data, mesh) -> Dict[str, Dict]:
  """{'val': metrics, 'test': metrics} (balanced accuracy, kappa, accuracy, confusion)."""
  out = {}
  for key, split in (('val', 'validation'), ('test', 'test')):
    labels, preds = predict(eval_step, params, data, split, mesh)
    out[key] = metrics_lib.classification_metrics(labels, preds, data.num_classes)
    if getattr(data, 'slide_level', None) is not None:  # reported, not selected on
      out[key]['slide_level'] = data.slide_level.evaluate(split, preds, labels)
  return out


def evaluate_model(model, params, factor, data, mesh, view='upsampled'):
  return evaluate(distill.make_eval_step(model, factor, mesh, view), params, data, mesh)


# ----------------------------------------------------------------------------- the stage loop
@dataclasses.dataclass
class Stage:
  """One training stage: the teacher (CE at f=1) or the student (distillation)."""
  name: str
  config: Any
  workdir: str
  model: Any
  step_config: distill.StepConfig
  num_epochs: int
  init_seed: int                # parameter initialisation
  train_seed: int               # the train state's key (augmentation: fold_in(key, step))
  teacher_model: Any = None
  teacher_params: Any = None
  later_steps: int = 0          # steps of the stages after this one (the whole-run ETA)


def stage_seeds(seed: int, stage_index: int) -> Tuple[int, int]:
  """(init seed, train seed) of the teacher (stage 1) or the student (stage 2) of a run seed."""
  base = int(seed) * 7919 + 4 * stage_index
  return base % 2 ** 31, (base + 1) % 2 ** 31


# One compiled initialiser per (model, image size); flax modules hash by their fields.
_jit_init = jax.jit(distill.init_params, static_argnums=(0, 2))


def init_params(model, seed: int, image_size: int):
  """Random parameters, jitted with an RBG key: XLA compiles threefry-based initialisers of a
  13-conv network slowly on CPU (~40 s); RngBitGenerator keys compile in a fraction of that."""
  return _jit_init(model, jax.random.key(seed, impl='rbg'), image_size)


def stage_init(config, stage_name: str) -> Dict[str, str]:
  """{'weights': '' | 'imagenet' | path | 'teacher', 'head': 'normal' | 'pytorch' | 'teacher'}:
  where a stage's parameters start. The teacher follows config.model.init_weights; the student
  follows config.student.init ('' = the same as the teacher, 'imagenet', 'random', 'teacher')."""
  from camkd_jax import weights  # pylint: disable=g-import-not-at-top
  spec = config.model.init_weights
  if stage_name == 'student':
    choice = config.student.init
    if choice == 'teacher':
      return {'weights': 'teacher', 'head': 'teacher'}
    spec = {'': spec, 'imagenet': 'imagenet', 'random': ''}.get(choice, choice)
  return {'weights': spec, 'head': weights.resolve_head_init(config.model.head_init, spec)}


def stage_init_params(stage, image_size: int):
  """The stage's initial parameters (host), as `stage_init` says."""
  from camkd_jax import weights  # pylint: disable=g-import-not-at-top
  init = stage_init(stage.config, stage.name)
  log = lambda m: logging.info('%s: %s', stage.name, m)
  if init['weights'] == 'teacher':
    log('initialised as a copy of the trained teacher (config.student.init=teacher)')
    return host_tree(stage.teacher_params)
  params = init_params(stage.model, stage.init_seed, image_size)
  params = weights.load_pretrained(init['weights'], params, log=log)
  head_rng = jax.random.fold_in(jax.random.PRNGKey(stage.init_seed), 1)
  return weights.init_head(params, init['head'], head_rng)


def _host_value(x) -> np.ndarray:
  """A replicated array as numpy (works on every process, multi-host included)."""
  return np.asarray(x.addressable_data(0))


def _host_scalar(x) -> int:
  return int(_host_value(x))


def host_tree(tree):
  """A replicated pytree as numpy arrays (process-local copy)."""
  return jax.tree_util.tree_map(_host_value, tree)


class StageRunner:
  """Trains one stage with resume, per-epoch evaluation, selection and checkpoints."""

  def __init__(self, stage: Stage, data, mesh):
    self.stage, self.data, self.mesh = stage, data, mesh
    cfg = stage.config
    self.spe = data.steps_per_epoch
    self.total = stage_steps(cfg, self.spe, stage.num_epochs)
    self.num_epochs = -(-self.total // self.spe)
    self.tx = distill.make_optimizer(cfg.optimizer)
    self.ckpt = checkpoints.StageCheckpoints(os.path.join(stage.workdir, 'checkpoints',
                                                          stage.name))
    self.pending: List[Dict[str, Any]] = []
    self.window = metrics_lib.LossMeans()
    self.train_step = distill.make_train_step(stage.step_config, stage.model, self.tx, mesh,
                                              teacher=stage.teacher_model)
    self.eval_step = distill.make_eval_step(stage.model, stage.step_config.factor, mesh,
                                            stage.step_config.view)
    self.saved = self.ckpt.latest_step()  # the latest checkpointed step (None: none yet)
    interrupts.progress(stage.name, self.saved or 0, self.saved)
    self.state, self.best_params, self.progress = self.restore_or_init()
    self.epoch_losses = metrics_lib.LossMeans.from_state(self.progress.get('epoch_losses'))
    # resume=True also when no checkpoint exists: events of a run killed before its first
    # checkpoint (same config: prepare_workdir clears another config's) are replayed identically.
    self.writer = reporting.make_writer(os.path.join(stage.workdir, 'tensorboard', stage.name),
                                        distributed.is_main(), resume=True)
    # Throughput / ETA clocks: since the end of the first step of run() (its compilation left
    # out), and since the last log line.
    self.t_start, self.t_log = None, time.time()
    self.steps_start = self.steps_log = _host_scalar(self.state['step'])

  # -- state
  def init_state(self):
    """Fresh train state (random, pretrained or teacher-copy init), replicated over the mesh."""
    params = stage_init_params(self.stage, self.data.image_size)
    state = distill.create_train_state(params, self.tx,
                                       jax.random.PRNGKey(self.stage.train_seed))
    return sharding.replicate(state, self.mesh)

  def restore_or_init(self):
    """(train state, best params, progress) of the latest checkpoint, or fresh ones."""
    state = self.init_state()
    best = jax.tree_util.tree_map(jnp.copy, state['params'])
    progress = {'history': [], 'best': None, 'epoch_losses': None}
    step = self.saved
    if step is not None:
      state, best, progress = self.ckpt.restore(step, state, best)
      logging.info('%s: resumed from %s/%d', self.stage.name, self.ckpt.directory, step)
    return state, best, progress

  # -- loop
  def run(self) -> Tuple[Any, Dict[str, Any]]:
    """Trains to the end (or resumes); returns (best params, report of the best epoch)."""
    st = self.stage
    step = _host_scalar(self.state['step'])
    logging.info('%s: steps %d..%d of %d (%d epoch(s) of %d), factor %d, terms %s', st.name,
                 step, self.total, self.total, self.num_epochs, self.spe, st.step_config.factor,
                 st.step_config.active_terms)
    self.t_start, self.steps_start = None, step
    interrupts.progress(st.name, step, self.saved)
    with interrupts.deferred():  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
      while step < self.total:
        step = self.train_epoch(step)
        self.end_epoch(step)
        self.stop_if_interrupted(step)
    self.writer.close()
    self.ckpt.close()
    return self.best_params, self.report()

  def train_epoch(self, step: int) -> int:
    """Runs from `step` to the end of its epoch (or self.total); returns the step reached."""
    epoch, start = divmod(step, self.spe)
    stop = min((epoch + 1) * self.spe, self.total)
    every = int(self.stage.config.checkpoint_every_steps)
    self.t_log, self.steps_log = time.time(), step
    batches = self.data.train_batches(epoch, start)
    for batch in batches:
      self.state, m = self.train_step(self.state, self.stage.teacher_params,
                                      sharding.shard_batch(batch, self.mesh))
      self.pending.append(m)
      step += 1
      if self.t_start is None:  # the first step compiled; the ETA's clock starts after it
        self.t_start, self.steps_start = time.time(), step
      if step % self.stage.config.log_every_steps == 0 or step == stop:
        self.log_train(step, epoch)
      if every and step % every == 0 and step < stop:
        self.save(step)
      interrupts.progress(self.stage.name, step, self.saved)
      if step == stop:
        return step
      self.stop_if_interrupted(step)
    raise RuntimeError(f'{self.stage.name}: the input pipeline ended epoch {epoch} after step '
                       f'{step}, before step {stop} (steps_per_epoch={self.spe})')

  def fetch(self):
    """Pending device metrics -> host, added step by step to the running means."""
    if not self.pending:
      return
    host = [{k: float(_host_value(v)) for k, v in m.items()} for m in self.pending]
    self.pending = []
    self.window.add(host)
    self.epoch_losses.add(host)

  def check_finite(self, step):
    """Stops the run at the first non-finite step, before anything of it is saved."""
    bad = _host_scalar(self.state['bad_step'])
    if bad < 0:
      return
    terms = distill.decode_bad_terms(_host_scalar(self.state['bad_terms']))
    raise errors.NonFiniteError(
        f'{self.stage.name}: non-finite value(s) in {", ".join(terms)} at step {bad} (epoch '
        f'{bad // self.spe + 1}, step {bad % self.spe} of the epoch); detected at step {step}. '
        f'Nothing from that step on was saved: the last good checkpoint is step '
        f'{self.ckpt.latest_step()} in {self.ckpt.directory}. Lower '
        f'config.optimizer.learning_rate or the loss weights, or check the input data.')

  def log_train(self, step, epoch):
    self.fetch()
    self.check_finite(step)
    means = self.window.means()
    self.window = metrics_lib.LossMeans()
    now = time.time()
    ips = (step - self.steps_log) * self.data.global_batch_size / max(now - self.t_log, 1e-9)
    done = step - self.steps_start
    rate = done / max(now - self.t_start, 1e-9) if self.t_start and done > 0 else 0.0
    # The whole run: this stage's remaining steps and those of the stages after it.
    eta = (self.total - step + self.stage.later_steps) / rate if rate > 0 else None
    self.t_log, self.steps_log = now, step
    self.writer.write_scalars(step, {**{f'train/{k}': v for k, v in means.items()},
                                     'train/learning_rate': self.stage.config.optimizer
                                     .learning_rate, 'train/images_per_sec': ips})
    logging.info('%s epoch %d/%d step %d/%d | %s | %.0f img/s | ETA %s (whole run)',
                 self.stage.name, epoch + 1, self.num_epochs, step, self.total,
                 reporting.format_losses(means, dict(self.stage.step_config.weights)), ips,
                 reporting.format_duration(eta))

  def end_epoch(self, step):
    """Evaluates, updates the best parameters and saves the epoch-end checkpoint."""
    self.fetch()
    self.check_finite(step)
    cfg = self.stage.config
    epoch = (step - 1) // self.spe + 1
    result = evaluate(self.eval_step, self.state['params'], self.data, self.mesh)
    entry = {'epoch': epoch, 'step': step, 'train': self.epoch_losses.means(), **result}
    self.progress['history'].append(entry)
    self.epoch_losses = metrics_lib.LossMeans()
    value = slide_level.selection_value(result['val'], cfg.selection.metric)
    best = self.progress['best']
    new_best = metrics_lib.improved(value, None if best is None else best['value'],
                                    float(cfg.selection.min_delta))
    if new_best:
      self.best_params = jax.tree_util.tree_map(jnp.copy, self.state['params'])
      self.progress['best'] = {'value': value, **entry}
    self.write_epoch_scalars(step, entry)
    logging.info('%s epoch %d/%d | val kappa %.4f bal.acc %.4f | test kappa %.4f bal.acc %.4f | '
                 'best epoch %d%s', self.stage.name, epoch, self.num_epochs,
                 result['val']['kappa'], result['val']['balanced_accuracy'],
                 result['test']['kappa'], result['test']['balanced_accuracy'],
                 self.progress['best']['epoch'], ' (new)' if new_best else '')
    self.save(step)
    self.t_log, self.steps_log = time.time(), step

  def write_epoch_scalars(self, step, entry):
    scalars = {f'epoch/{k}': v for k, v in entry['train'].items()}
    for split in ('val', 'test'):
      for key in ('balanced_accuracy', 'kappa', 'accuracy'):
        scalars[f'{split}/{key}'] = entry[split][key]
    self.writer.write_scalars(step, scalars)
    self.writer.flush()

  def save(self, step):
    """Checkpoint of `step` (never of a state past a non-finite step)."""
    self.fetch()
    self.check_finite(step)
    self.progress['epoch_losses'] = self.epoch_losses.state()
    self.ckpt.save(step, self.state, self.best_params, self.progress)
    self.saved = step
    interrupts.progress(self.stage.name, step, step)
    self.writer.flush()

  def stop_if_interrupted(self, step):
    """After SIGINT / SIGTERM: checkpoints `step` (if not yet) and raises errors.Interrupted.

    Called once per training step. With several processes all of them stop at the same step:
    SIGTERM through JAX's preemption sync (distributed.reached_preemption_sync_point, every
    step), SIGINT by agreeing (distributed.agreed_signal, a collective) at every log step and
    epoch end. A process signalled alone, or before the others, stops together with them."""
    own = interrupts.pending()
    by_peer = False
    if jax.process_count() > 1:
      signum = signal.SIGTERM if distributed.reached_preemption_sync_point() else None
      by_peer = signum is not None  # JAX's service took the signal: which process is not known
      sync = not (step % self.stage.config.log_every_steps and step % self.spe
                  and step != self.total)
      if signum is None and sync:
        signum = distributed.agreed_signal(own)
        by_peer = signum is not None and own is None
    else:
      signum = own
    if signum is None:
      return
    if by_peer:
      logging.warning('%s: %s received by the process group; all processes stop at step %d',
                      self.stage.name, interrupts.signal_name(signum), step)
    if step != self.saved:
      logging.warning('%s: %s received; saving a checkpoint of step %d before stopping',
                      self.stage.name, interrupts.signal_name(signum), step)
      self.save(step)
    self.writer.close()
    interrupts.progress(self.stage.name, step, self.saved)
    interrupts.stop(signum, by_peer=by_peer)

  def report(self) -> Dict[str, Any]:
    best = self.progress['best']
    history = [{k: v for k, v in h.items()} for h in self.progress['history']]
    return {'val': best['val'], 'test': best['test'], 'epoch': best['epoch'],
            'step': best['step'], 'train': best['train'], 'history': history}


# ----------------------------------------------------------------------------- figure
def figure_examples(data, num_images: int) -> Tuple[np.ndarray, np.ndarray]:
  """(images, labels) of up to `num_images` validation examples, one class after another (round
  robin over the classes, first examples first); reads batches only until every class has its
  share or the split ends."""
  per_class = -(-num_images // max(data.num_classes, 1))
  picked = {c: [] for c in range(data.num_classes)}
  for batch in data.eval_batches('validation'):
    for i in np.flatnonzero(batch['mask']):
      c = int(batch['label'][i])
      if len(picked[c]) < per_class:
        picked[c].append(np.asarray(batch['image'][i]))
    if all(len(v) >= per_class for v in picked.values()):
      break
  order = [(c, picked[c][k]) for k in range(per_class) for c in picked if k < len(picked[c])]
  order = order[:num_images]
  return (np.stack([im for _, im in order]),
          np.asarray([c for c, _ in order], np.int32))


def save_figure(path, columns, data, num_images, base_magnification):
  """Validation images across the classes with each model's input view and Grad-CAM map of the
  true class; a column of factor f > 1 is titled with its magnification, base_magnification / f,
  and shows its map over the image it saw as well as over the full-resolution image."""
  images, labels = figure_examples(data, num_images)
  cols = []
  for title, model, params, factor, view_name in columns:
    cam = distill.make_cam_step(model, factor, view=view_name)
    maps, probs = cam(host_tree(params), images, labels)
    view = ops.student_view(jnp.asarray(images, jnp.float32) / 255.0, factor, view_name)
    cols.append({'title': f'{title} ({base_magnification / factor:g}x)' if factor > 1 else title,
                 'view': np.asarray(view), 'maps': np.asarray(maps), 'probs': np.asarray(probs),
                 'on_view': factor > 1})
  reporting.save_gradcam_figure(path, images, labels, data.class_names, cols)
