"""The driver: per seed a teacher stage and a student stage, then the reports.

  run(config, workdir)
    validate the config (camkd_jax.config_checks) -> check / write workdir/config.json
    (camkd_jax.workdir) -> per seed: train_and_evaluate -> metrics.json (+ mean and sample std
    over seeds), results.md, a one-screen summary (camkd_jax.reporting)
  train_and_evaluate(config, workdir)
    data -> teacher (camkd_jax.teacher: load workdir/teacher or config.teacher.checkpoint, else
    train it: CE at f=1) -> student (camkd_jax.stage: the distillation step at
    f = base_magnification / magnification) -> figures/gradcam.png (camkd_jax.figures)

Both stages run the same loop (camkd_jax.stage.StageRunner): the compiled step of
camkd_jax.distill, evaluation of validation and test after every epoch (camkd_jax.evaluation),
selection on the validation metric, and an orbax checkpoint at every epoch end and every
config.checkpoint_every_steps steps; a rerun of the same command resumes and ends with the same
numbers. The run directory's layout is camkd_jax.runs.

Every process runs this code (multi-host): orbax calls are collective, files are written by
process 0 only, and evaluation gathers every process's predictions before computing metrics.
"""
import os
import time
from typing import Any, Dict

from absl import logging
import jax

from camkd_jax import checkpoints
from camkd_jax import config_checks
from camkd_jax import distributed
from camkd_jax import figures
from camkd_jax import models
from camkd_jax import reporting
from camkd_jax import runs
from camkd_jax import sharding
from camkd_jax import slide_level
from camkd_jax import stage as stage_lib
from camkd_jax import teacher as teacher_lib
from camkd_jax import workdir as workdir_lib


def run(config, workdir: str) -> Dict[str, Any]:
  """Validates `config`, runs every seed in `workdir` and writes metrics.json / results.md."""
  mesh = sharding.make_mesh()
  config_checks.validate_config(config, mesh.size)
  seeds = config_checks.parse_seeds(config)
  workdir_lib.prepare_workdir(config, workdir)
  logging.info('workdir %s | method %s | %d device(s), %d process(es) | seeds %s', workdir,
               config.method, mesh.size, jax.process_count(), seeds)
  results = {}
  for i, seed in enumerate(seeds):
    cfg = config.copy_and_resolve_references()
    cfg.seed = seed
    sub = runs.seed_dir(workdir, seed) if str(config.seeds).strip() else workdir
    if sub != workdir:
      checkpoints.write_json(os.path.join(sub, runs.CONFIG_FILE), runs.config_dict(cfg))
    results[seed] = train_and_evaluate(cfg, sub, mesh, later_seeds=len(seeds) - 1 - i)
  out = reporting.combine_seeds(results)
  checkpoints.write_json(os.path.join(workdir, runs.METRICS), out)
  if distributed.is_main():
    reporting.write_results(out, workdir, config.selection.metric,
                            float(config.base_magnification))
  return out


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
  teacher_cfg, student_cfg = config_checks.step_configs(config)
  model = models.from_config(config.model, data.num_classes)
  after_teacher, after_student = stage_lib.later_stage_steps(config, data.steps_per_epoch,
                                                              later_seeds)
  teacher_params, teacher_report = teacher_lib.obtain_teacher(
      config, workdir, data, mesh, model, teacher_cfg, later_steps=after_teacher)
  result = {'teacher': teacher_report, 'seeds': [int(config.seed)]}
  if data.notes:
    result['data_notes'] = list(data.notes)
  columns = [('teacher', model, teacher_params, 1, 'upsampled')]
  if config.method != 'teacher':
    stage = stage_lib.Stage('student', config, workdir, model, student_cfg,
                            int(config.num_epochs), *stage_lib.stage_seeds(config.seed, 2),
                            teacher_model=model, teacher_params=teacher_params,
                            later_steps=after_student)
    student_params, report = stage_lib.StageRunner(stage, data, mesh).run()
    report.update(magnification=float(config.magnification), factor=student_cfg.factor,
                  view=student_cfg.view, method=config.method)
    checkpoints.save_model(os.path.join(workdir, 'student'), student_params,
                           runs.model_metadata(config, data, report, 'student'))
    result['student'] = report
    columns.append(('student', model, student_params, student_cfg.factor, student_cfg.view))
  if distributed.is_main() and config.num_figure_images > 0:
    figures.save_figure(os.path.join(workdir, 'figures', 'gradcam.png'), columns, data,
                        config.num_figure_images, float(config.base_magnification))
  result['wall_time_s'] = time.time() - t0
  result['summary'] = reporting.summarize_runs([result])
  checkpoints.write_json(os.path.join(workdir, runs.METRICS), result)
  return result
