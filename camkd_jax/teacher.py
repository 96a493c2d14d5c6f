"""The run's teacher: loaded (workdir/teacher or config.teacher.checkpoint) when a finished export
fits this run, else trained (CE at f=1) and exported to workdir/teacher.

A teacher is refused, naming each difference, when its architecture (name, width, input
standardisation), input size or classes differ from this run's (runs.teacher_mismatches).
"""
import os

from absl import logging

from camkd_jax import checkpoints
from camkd_jax import distill
from camkd_jax import errors
from camkd_jax import evaluation
from camkd_jax import runs
from camkd_jax import sharding
from camkd_jax import stage as stage_lib


def check_teacher_metadata(meta, config, class_names, path):
  """Refuses a teacher whose metadata differ from this run's config and classes (one
  errors.WorkdirError listing every difference and the remedy)."""
  own = not config.teacher.checkpoint
  problems = runs.teacher_mismatches(meta, config, class_names=class_names, external=not own)
  if problems:
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
  if config.teacher.checkpoint or runs.is_finished_model(path):
    meta = runs.read_metadata(path)
    check_teacher_metadata(meta, config, data.class_names, path)
    params, meta = checkpoints.load_model(path, template)
    logging.info('teacher: loaded %s (epoch %s)', path, (meta.get('report') or {}).get('epoch'))
    report = evaluation.evaluate_model(model, params, 1, data, mesh)
    report.update({k: v for k, v in (meta.get('report') or {}).items()
                   if k in ('epoch', 'step', 'train', 'history')})
    report['checkpoint'] = os.path.abspath(path)
    return params, report
  stage = stage_lib.Stage('teacher', config, workdir, model, step_cfg,
                          int(config.teacher.num_epochs), *stage_lib.stage_seeds(config.seed, 1),
                          later_steps=later_steps)
  params, report = stage_lib.StageRunner(stage, data, mesh).run()
  checkpoints.save_model(path, params, runs.model_metadata(config, data, report))
  report['checkpoint'] = os.path.abspath(path)
  return params, report
