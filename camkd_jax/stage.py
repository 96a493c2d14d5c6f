"""One training stage, the teacher (CE at f=1) or the student (distillation), with resume.

  Stage                 what a stage trains: model, step config, epochs, seeds, the teacher
  stage_init_params     where its parameters start (random, pretrained, a copy of the teacher)
  StageRunner           the loop: the compiled step of camkd_jax.distill, the host metric fetch
                        and the non-finite check, evaluation after every epoch, stop on a signal
  Selection             the best epoch on the validation metric (the reference's rule: the first
                        epoch sets the best, later ones must beat it by more than min_delta) and
                        the orbax checkpoints (every epoch end and every
                        config.checkpoint_every_steps steps)
  ProgressLog           the log line (losses, throughput, whole-run ETA) and TensorBoard scalars

A rerun resumes from the latest checkpoint and ends with the same numbers: the data order is a
function of (seed, epoch), the augmentation of fold_in(rng, step), and the running loss sums of a
partial epoch travel in the checkpoint.
"""
import dataclasses
import os
import time
from typing import Any, Dict, List, Tuple

from absl import logging
import jax
import jax.numpy as jnp

from camkd_jax import checkpoints
from camkd_jax import distill
from camkd_jax import distributed
from camkd_jax import errors
from camkd_jax import evaluation
from camkd_jax import interrupts
from camkd_jax import metrics as metrics_lib
from camkd_jax import reporting
from camkd_jax import sharding
from camkd_jax import slide_level
from camkd_jax import weights


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


# One compiled initialiser per (model, image size); flax modules hash by their fields.
_jit_init = jax.jit(distill.init_params, static_argnums=(0, 2))


def init_params(model, seed: int, image_size: int):
  """Random parameters, jitted with an RBG key: XLA compiles threefry-based initialisers of a
  13-conv network slowly on CPU (~40 s); RngBitGenerator keys compile in a fraction of that."""
  return _jit_init(model, jax.random.key(seed, impl='rbg'), image_size)


def stage_init_params(stage, image_size: int):
  """The stage's initial parameters (host), as weights.stage_init says."""
  init = weights.stage_init(stage.config, stage.name)
  log = lambda m: logging.info('%s: %s', stage.name, m)
  if init['weights'] == 'teacher':
    log('initialised as a copy of the trained teacher (config.student.init=teacher)')
    return sharding.host_tree(stage.teacher_params)
  params = init_params(stage.model, stage.init_seed, image_size)
  params = weights.load_pretrained(init['weights'], params, log=log)
  head_rng = jax.random.fold_in(jax.random.PRNGKey(stage.init_seed), 1)
  return weights.init_head(params, init['head'], head_rng)


def init_state(stage: Stage, tx, image_size: int, mesh):
  """Fresh train state (random, pretrained or teacher-copy init), replicated over the mesh."""
  params = stage_init_params(stage, image_size)
  state = distill.create_train_state(params, tx, jax.random.PRNGKey(stage.train_seed))
  return sharding.replicate(state, mesh)


def non_finite_error(name: str, terms, bad: int, step: int, spe: int, ckpt):
  """The error of a run stopped at its first non-finite step `bad` (found at `step`)."""
  return errors.NonFiniteError(
      f'{name}: non-finite value(s) in {", ".join(terms)} at step {bad} (epoch '
      f'{bad // spe + 1}, step {bad % spe} of the epoch); detected at step {step}. '
      f'Nothing from that step on was saved: the last good checkpoint is step '
      f'{ckpt.latest_step()} in {ckpt.directory}. Lower '
      f'config.optimizer.learning_rate or the loss weights, or check the input data.')


class ProgressLog:
  """The stage's train log line every config.log_every_steps steps (loss means of the window,
  images/s, the whole run's ETA) and its TensorBoard scalars."""

  def __init__(self, stage: Stage, data, total: int, num_epochs: int, step: int):
    self.stage, self.data, self.total, self.num_epochs = stage, data, total, num_epochs
    self.window = metrics_lib.LossMeans()
    # resume=True also when no checkpoint exists: events of a run killed before its first
    # checkpoint (same config: prepare_workdir clears another config's) are replayed identically.
    self.writer = reporting.make_writer(os.path.join(stage.workdir, 'tensorboard', stage.name),
                                        distributed.is_main(), resume=True)
    # Throughput / ETA clocks: since the end of the first step of the loop (its compilation
    # left out), and since the last log line.
    self.t_start, self.t_log = None, time.time()
    self.steps_start = self.steps_log = step

  def start(self, step: int):
    """The loop starts at `step`: the ETA clock starts after its first (compiling) step."""
    self.t_start, self.steps_start = None, step

  def stepped(self, step: int):
    if self.t_start is None:  # the first step compiled; the ETA's clock starts after it
      self.t_start, self.steps_start = time.time(), step

  def mark(self, step: int):
    """The throughput clock restarts at `step` (an epoch start or end)."""
    self.t_log, self.steps_log = time.time(), step

  def train(self, step: int, epoch: int):
    """Logs and writes the window's loss means, the throughput and the ETA; starts a window."""
    means = self.window.means()
    self.window = metrics_lib.LossMeans()
    now = time.time()
    ips = (step - self.steps_log) * self.data.global_batch_size / max(now - self.t_log, 1e-9)
    done = step - self.steps_start
    rate = done / max(now - self.t_start, 1e-9) if self.t_start and done > 0 else 0.0
    # The whole run: this stage's remaining steps and those of the stages after it.
    eta = (self.total - step + self.stage.later_steps) / rate if rate > 0 else None
    self.t_log, self.steps_log = now, step
    cfg = self.stage.config
    self.writer.write_scalars(step, {**{f'train/{k}': v for k, v in means.items()},
                                     'train/learning_rate': cfg.optimizer.learning_rate,
                                     'train/images_per_sec': ips})
    logging.info('%s epoch %d/%d step %d/%d | %s | %.0f img/s | ETA %s (whole run)',
                 self.stage.name, epoch + 1, self.num_epochs, step, self.total,
                 reporting.format_losses(means, dict(self.stage.step_config.weights)), ips,
                 reporting.format_duration(eta))

  def epoch(self, step: int, entry: Dict[str, Any], best_epoch: int, new_best: bool):
    """The epoch's train means and val / test metrics: TensorBoard and the log."""
    scalars = {f'epoch/{k}': v for k, v in entry['train'].items()}
    for split in ('val', 'test'):
      for key in ('balanced_accuracy', 'kappa', 'accuracy'):
        scalars[f'{split}/{key}'] = entry[split][key]
    self.writer.write_scalars(step, scalars)
    self.writer.flush()
    logging.info('%s epoch %d/%d | val kappa %.4f bal.acc %.4f | test kappa %.4f bal.acc %.4f | '
                 'best epoch %d%s', self.stage.name, entry['epoch'], self.num_epochs,
                 entry['val']['kappa'], entry['val']['balanced_accuracy'],
                 entry['test']['kappa'], entry['test']['balanced_accuracy'], best_epoch,
                 ' (new)' if new_best else '')

  def flush(self):
    self.writer.flush()

  def close(self):
    self.writer.close()


class Selection:
  """The stage's checkpoints and the best epoch so far: each orbax step holds the train state,
  the best epoch's parameters and the progress (history, best, running loss sums, the
  stage's seconds so far)."""

  def __init__(self, stage: Stage):
    self.name, self.config = stage.name, stage.config
    self.ckpt = checkpoints.StageCheckpoints(os.path.join(stage.workdir, 'checkpoints',
                                                          stage.name))
    self.saved = self.ckpt.latest_step()  # the latest checkpointed step (None: none yet)
    self.best_params = None
    # train_wall_time_s: seconds spent in this stage over every invocation (resumes and
    # continuations included), as of the last checkpoint
    self.progress = {'history': [], 'best': None, 'epoch_losses': None, 'train_wall_time_s': 0.0}
    self.clock = None  # (time.time() at restore, the stage's seconds before it)

  def restore_or_init(self, state):
    """The train state of the latest checkpoint (with its best params and progress), or the
    fresh `state` (the best params a copy of its params)."""
    self.best_params = jax.tree_util.tree_map(jnp.copy, state['params'])
    if self.saved is not None:
      state, self.best_params, self.progress = self.ckpt.restore(self.saved, state,
                                                                 self.best_params)
      logging.info('%s: resumed from %s/%d', self.name, self.ckpt.directory, self.saved)
    # the stage's time so far (a checkpoint from before this field counts from here)
    self.clock = (time.time(), float(self.progress.get('train_wall_time_s') or 0.0))
    return state

  def update(self, entry: Dict[str, Any], params) -> bool:
    """Adds the epoch's entry to the history; True (and keeps a copy of `params`) when its
    validation metric is the best so far."""
    self.progress['history'].append(entry)
    value = slide_level.selection_value(entry['val'], self.config.selection.metric)
    best = self.progress['best']
    new_best = metrics_lib.improved(value, None if best is None else best['value'],
                                    float(self.config.selection.min_delta))
    if new_best:
      self.best_params = jax.tree_util.tree_map(jnp.copy, params)
      self.progress['best'] = {'value': value, **entry}
    return new_best

  def save(self, step: int, state, epoch_losses: metrics_lib.LossMeans):
    """Checkpoint of `step` with the running loss sums of its epoch and the stage's time."""
    self.progress['epoch_losses'] = epoch_losses.state()
    start, before = self.clock
    self.progress['train_wall_time_s'] = before + time.time() - start
    self.ckpt.save(step, state, self.best_params, self.progress)
    self.saved = step

  def report(self) -> Dict[str, Any]:
    best = self.progress['best']
    history = [{k: v for k, v in h.items()} for h in self.progress['history']]
    return {'val': best['val'], 'test': best['test'], 'epoch': best['epoch'],
            'step': best['step'], 'train': best['train'], 'history': history,
            'train_wall_time_s': self.progress.get('train_wall_time_s')}

  def close(self):
    self.ckpt.close()


class StageRunner:
  """Trains one stage with resume, per-epoch evaluation, selection and checkpoints."""

  def __init__(self, stage: Stage, data, mesh):
    self.stage, self.data, self.mesh = stage, data, mesh
    cfg = stage.config
    self.spe = data.steps_per_epoch
    self.total = stage_steps(cfg, self.spe, stage.num_epochs)
    self.num_epochs = -(-self.total // self.spe)
    self.tx = distill.make_optimizer(cfg.optimizer)
    self.selection = Selection(stage)
    self.pending: List[Dict[str, Any]] = []
    self.train_step = distill.make_train_step(stage.step_config, stage.model, self.tx, mesh,
                                              teacher=stage.teacher_model)
    self.eval_step = distill.make_eval_step(stage.model, stage.step_config.factor, mesh,
                                            stage.step_config.view)
    saved = self.selection.saved
    interrupts.progress(stage.name, saved or 0, saved)
    self.state = self.selection.restore_or_init(
        init_state(stage, self.tx, data.image_size, mesh))
    self.epoch_losses = metrics_lib.LossMeans.from_state(
        self.selection.progress.get('epoch_losses'))
    self.log = ProgressLog(stage, data, self.total, self.num_epochs,
                           sharding.host_scalar(self.state['step']))

  def run(self) -> Tuple[Any, Dict[str, Any]]:
    """Trains to the end (or resumes); returns (best params, report of the best epoch)."""
    st = self.stage
    step = sharding.host_scalar(self.state['step'])
    logging.info('%s: steps %d..%d of %d (%d epoch(s) of %d), factor %d, terms %s', st.name,
                 step, self.total, self.total, self.num_epochs, self.spe, st.step_config.factor,
                 st.step_config.active_terms)
    self.log.start(step)
    interrupts.progress(st.name, step, self.selection.saved)
    with interrupts.deferred():  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
      while step < self.total:
        step = self.train_epoch(step)
        self.end_epoch(step)
        self.stop_if_interrupted(step)
    self.log.close()
    self.selection.close()
    return self.selection.best_params, self.selection.report()

  def train_epoch(self, step: int) -> int:
    """Runs from `step` to the end of its epoch (or self.total); returns the step reached."""
    epoch, start = divmod(step, self.spe)
    stop = min((epoch + 1) * self.spe, self.total)
    every = int(self.stage.config.checkpoint_every_steps)
    self.log.mark(step)
    batches = self.data.train_batches(epoch, start)
    for batch in batches:
      self.state, m = self.train_step(self.state, self.stage.teacher_params,
                                      sharding.shard_batch(batch, self.mesh))
      self.pending.append(m)
      step += 1
      self.log.stepped(step)
      if step % self.stage.config.log_every_steps == 0 or step == stop:
        self.fetch(step)
        self.log.train(step, epoch)
      if every and step % every == 0 and step < stop:
        self.save(step)
      interrupts.progress(self.stage.name, step, self.selection.saved)
      if step == stop:
        return step
      self.stop_if_interrupted(step)
    raise RuntimeError(f'{self.stage.name}: the input pipeline ended epoch {epoch} after step '
                       f'{step}, before step {stop} (steps_per_epoch={self.spe})')

  def fetch(self, step: int):
    """Pending device metrics -> host, added step by step to the running means; then stops the
    run at the first non-finite step, before anything of it is saved."""
    if self.pending:
      host = [{k: float(sharding.host_value(v)) for k, v in m.items()} for m in self.pending]
      self.pending = []
      self.log.window.add(host)
      self.epoch_losses.add(host)
    bad = sharding.host_scalar(self.state['bad_step'])
    if bad >= 0:
      terms = distill.decode_bad_terms(sharding.host_scalar(self.state['bad_terms']))
      raise non_finite_error(self.stage.name, terms, bad, step, self.spe, self.selection.ckpt)

  def end_epoch(self, step: int):
    """Evaluates, updates the best parameters and saves the epoch-end checkpoint."""
    self.fetch(step)
    epoch = (step - 1) // self.spe + 1
    result = evaluation.evaluate(self.eval_step, self.state['params'], self.data, self.mesh)
    entry = {'epoch': epoch, 'step': step, 'train': self.epoch_losses.means(), **result}
    self.epoch_losses = metrics_lib.LossMeans()
    new_best = self.selection.update(entry, self.state['params'])
    self.log.epoch(step, entry, self.selection.progress['best']['epoch'], new_best)
    self.save(step)
    self.log.mark(step)

  def save(self, step: int):
    """Checkpoint of `step` (never of a state past a non-finite step)."""
    self.fetch(step)
    self.selection.save(step, self.state, self.epoch_losses)
    interrupts.progress(self.stage.name, step, step)
    self.log.flush()

  def stop_if_interrupted(self, step: int):
    """After SIGINT / SIGTERM: checkpoints `step` (if not yet) and raises errors.Interrupted.
    Called once per training step; with several processes all of them stop at the same step
    (distributed.stop_signal, which agrees at every log step and epoch end)."""
    sync = not (step % self.stage.config.log_every_steps and step % self.spe
                and step != self.total)
    signum, by_peer = distributed.stop_signal(interrupts.pending(), sync)
    if signum is None:
      return
    name = interrupts.signal_name(signum)
    if by_peer:
      logging.warning('%s: %s received by the process group; all processes stop at step %d',
                      self.stage.name, name, step)
    if step != self.selection.saved:
      logging.warning('%s: %s received; saving a checkpoint of step %d before stopping',
                      self.stage.name, name, step)
      self.save(step)
    self.log.close()
    interrupts.progress(self.stage.name, step, self.selection.saved)
    interrupts.stop(signum, by_peer=by_peer)
