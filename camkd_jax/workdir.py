"""The run's directory: its default name, the config it holds, and what config.overwrite clears.

A workdir holds one config's run. `prepare_workdir` refuses a workdir whose config.json differs
from this run's in a key that changes results (RESUMABLE_KEYS may differ: a resume can change
logging or paths) and that holds training (a checkpoint, a finished model, metrics.json), unless
config.overwrite, which deletes the earlier run's outputs (runs.CLEARED) first. A workdir
without any training (a start that failed on its data or config) is taken as fresh: the corrected
rerun just starts.
config.overwrite never deletes a finished teacher export: it is kept (and reused) when its
metadata fit the new config, and refused otherwise; config.overwrite_teacher=True deletes it.
"""
import os
import shutil
from typing import Dict, List, Optional

from absl import logging

from camkd_jax import checkpoints
from camkd_jax import distributed
from camkd_jax import errors
from camkd_jax import runs

# Keys that do not change what a run computes: a workdir may be resumed with other values.
RESUMABLE_KEYS = ('overwrite', 'overwrite_teacher', 'distributed', 'log_every_steps',
                  'checkpoint_every_steps', 'num_figure_images', 'data.data_dir',
                  'data.manual_dir')
# Keys removed from the configs that an older workdir's config.json may still hold; none of them
# changed results, so such a workdir resumes.
RETIRED_KEYS = ('shuffle_buffer',)
# Keys added to the configs later, with the value that does what older runs did: an older
# workdir's config.json without the key resumes while this run keeps that value.
ADDED_KEYS = {'data.class_names': '', 'data.val_fraction': 0.15, 'data.slide_column': '',
              'slide_level.labels': '', 'slide_level.patterns': '', 'slide_level.min_share': 0.05,
              'slide_level.min_tumour': 0.05}
def default_workdir(config_file: Optional[str], config) -> str:
  """workdirs/<config name>[_m<magnification>][_<dataset>][_smoke], e.g. workdirs/attn_kd_m2.5."""
  stem = os.path.splitext(os.path.basename((config_file or 'run').split(':')[0]))[0]
  name = stem if config.method == 'teacher' else f'{stem}_m{config.magnification:g}'
  if config.data.name != 'synthetic_histology':
    name += f'_{config.data.name}'
  if config.data.synthetic_size == 'smoke' and config.data.name == 'synthetic_histology':
    name += '_smoke'
  return os.path.join('workdirs', name)


def config_differences(old: Dict, new: Dict) -> List[str]:
  """'key: old -> new' for every result-relevant key that differs."""
  b = runs.flatten(new)
  a = {**{k: v for k, v in ADDED_KEYS.items() if k in b}, **runs.flatten(old)}
  keys = sorted((set(a) | set(b)) - set(RESUMABLE_KEYS) - set(RETIRED_KEYS))
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in keys if a.get(k, '<absent>') != b.get(k, '<absent>')]


def extends(old: Dict, new: Dict) -> bool:
  """True when `new` only asks for more student epochs than the run `old` (see the module doc)."""
  return (int(new['num_epochs']) > int(old['num_epochs']) and
          not config_differences(old, {**new, 'num_epochs': old['num_epochs']}))


def trained_state(workdir: str) -> List[str]:
  """What in `workdir` (and its seed_*/ runs) holds training: checkpoint steps, finished model
  exports, metrics.json. Empty after a start that failed before its first checkpoint."""
  found = []
  if not os.path.isdir(workdir):
    return found
  for run in runs.run_dirs(workdir):
    for stage in ('teacher', 'student'):
      ckpt = os.path.join(run, 'checkpoints', stage)
      steps = [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
      if steps:
        found.append(f'{ckpt} (step {max(map(int, steps))})')
      if runs.is_finished_model(os.path.join(run, stage)):
        found.append(os.path.join(run, stage))
    if os.path.isfile(os.path.join(run, runs.METRICS)):
      found.append(os.path.join(run, runs.METRICS))
  return found


def trained_teachers(workdir: str) -> List[str]:
  """Finished teacher exports in `workdir` and its seed_*/ runs."""
  if not os.path.isdir(workdir):
    return []
  return [os.path.join(r, 'teacher') for r in runs.run_dirs(workdir)
          if runs.is_finished_model(os.path.join(r, 'teacher'))]


def prepare_workdir(config, workdir: str):
  """Refuses a workdir holding another config's training (unless config.overwrite), writes
  config.json. A workdir whose earlier start failed before any checkpoint is taken as fresh."""
  path = os.path.join(workdir, runs.CONFIG_FILE)
  new = runs.config_dict(config)
  old = None
  if os.path.isfile(path):
    try:
      old = runs.read_config(workdir)
    except errors.WorkdirError:  # cut short (e.g. a full disk before the atomic writes)
      logging.warning('%s is not valid JSON; replacing it', path)
  # Every process decides on the same file: none may delete or rewrite it before all read it.
  checkpoints.sync('camkd_jax_read_config')
  diff = config_differences(old, new) if old is not None else []
  if diff and extends(old, new):
    logging.info('%s: continuing the run to %d student epochs (it was configured for %d); the '
                 'student resumes from its latest checkpoint', workdir, int(new['num_epochs']),
                 int(old['num_epochs']))
  elif diff:
    state = trained_state(workdir)
    shown = '\n  '.join(diff[:12]) + ('\n  ...' if len(diff) > 12 else '')
    if not state:
      logging.warning('%s holds no checkpoint or trained model of its earlier config (a start '
                      'that failed early): starting afresh with this config; %d key(s) differ:'
                      '\n  %s', workdir, len(diff), shown)
      clear_workdir(config, workdir, quiet=True)
    elif not config.overwrite:
      raise errors.WorkdirError(
          f'{workdir} holds a run of a different config ({len(diff)} key(s) differ):\n  {shown}\n'
          f'It holds: {", ".join(state[:4])}. Use another --workdir, or pass '
          f'--config.overwrite=True to delete that run and start afresh (a trained teacher is '
          f'kept and reused if it fits; --config.overwrite_teacher=True deletes it too).')
    else:
      clear_workdir(config, workdir)
  with errors.disk_writes(workdir, 'the run directory'):
    if distributed.is_main():
      os.makedirs(workdir, exist_ok=True)
    checkpoints.write_json(path, new)


def clear_workdir(config, workdir: str, quiet: bool = False):
  """Deletes what an earlier run wrote (config.overwrite with a different config), except its
  trained teacher(s): kept when their metadata fit this config (and reused), refused when not,
  deleted only with config.overwrite_teacher."""
  keep_teacher = not config.get('overwrite_teacher', False)
  teachers = trained_teachers(workdir)
  if keep_teacher:
    for t in teachers:
      problems = runs.teacher_mismatches(runs.read_metadata(t), config,
                                         runs.seed_of(os.path.dirname(t)))
      if problems:
        raise errors.WorkdirError(
            f'config.overwrite would keep the trained teacher in {t}, but it does not fit this '
            'config:\n  ' + '\n  '.join(problems) + '\nPass --config.overwrite_teacher=True '
            'to delete it and train a new one, move it elsewhere (and point '
            'config.teacher.checkpoint at it), or use another --workdir.')
  teacher = os.path.abspath(config.teacher.checkpoint) if config.teacher.checkpoint else ''
  if (not keep_teacher and teacher and
      teacher.startswith(os.path.abspath(workdir) + os.sep)):
    raise errors.WorkdirError(
        f'config.teacher.checkpoint={config.teacher.checkpoint} lies inside {workdir}, which '
        'config.overwrite_teacher would delete; copy the teacher elsewhere')
  if not quiet:
    logging.warning('config.overwrite: deleting the earlier run in %s%s', workdir,
                    f' (keeping the trained teacher(s) {teachers})' if teachers and keep_teacher
                    else '')
  if distributed.is_main():
    for run in runs.run_dirs(workdir):
      _clear_run(run, keep_teacher)
  checkpoints.sync('camkd_jax_clear_workdir')


def _clear_run(run: str, keep_teacher: bool):
  """Deletes CLEARED in one run directory (teacher/ kept if asked when it is finished)."""
  for name in os.listdir(run):
    p = os.path.join(run, name)
    if name not in runs.CLEARED:
      continue
    if keep_teacher and name == 'teacher' and runs.is_finished_model(p):
      continue
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
