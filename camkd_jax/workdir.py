"""The run's directory: its default name, the config it holds, and what config.overwrite clears.

A workdir holds one config's run. `prepare_workdir` refuses a workdir whose config.json differs
from this run's in a key that changes results (RESUMABLE_KEYS may differ: a resume can change
logging or paths), unless config.overwrite, which deletes the earlier run's OUTPUTS first.
"""
import json
import os
import shutil
from typing import Any, Dict, List, Optional

from absl import logging

from camkd_jax import checkpoints
from camkd_jax import distributed

# Keys that do not change what a run computes: a workdir may be resumed with other values.
RESUMABLE_KEYS = ('overwrite', 'distributed', 'log_every_steps', 'checkpoint_every_steps',
                  'num_figure_images', 'data.data_dir', 'data.manual_dir')
# Keys removed from the configs that an older workdir's config.json may still hold; none of them
# changed results, so such a workdir resumes.
RETIRED_KEYS = ('shuffle_buffer',)
# Keys added to the configs later, with the value that does what older runs did: an older
# workdir's config.json without the key resumes while this run keeps that value.
ADDED_KEYS = {'data.class_names': '', 'data.val_fraction': 0.15}
# Everything a run writes into its workdir (what config.overwrite clears).
OUTPUTS = ('config.json', 'metrics.json', 'results.md', 'figures', 'tensorboard', 'checkpoints',
           'teacher', 'student')


def default_workdir(config_file: Optional[str], config) -> str:
  """workdirs/<config name>[_m<magnification>][_<dataset>][_smoke], e.g. workdirs/attn_kd_m2.5."""
  stem = os.path.splitext(os.path.basename((config_file or 'run').split(':')[0]))[0]
  name = stem if config.method == 'teacher' else f'{stem}_m{config.magnification:g}'
  if config.data.name != 'synthetic_histology':
    name += f'_{config.data.name}'
  if config.data.synthetic_size == 'smoke' and config.data.name == 'synthetic_histology':
    name += '_smoke'
  return os.path.join('workdirs', name)


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    out.update(_flatten(v, key + '.') if isinstance(v, dict) else {key: v})
  return out


def config_dict(config) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def config_differences(old: Dict, new: Dict) -> List[str]:
  """'key: old -> new' for every result-relevant key that differs."""
  b = _flatten(new)
  a = {**{k: v for k, v in ADDED_KEYS.items() if k in b}, **_flatten(old)}
  keys = sorted((set(a) | set(b)) - set(RESUMABLE_KEYS) - set(RETIRED_KEYS))
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in keys if a.get(k, '<absent>') != b.get(k, '<absent>')]


def prepare_workdir(config, workdir: str):
  """Refuses a workdir holding another config's run (unless config.overwrite); writes
  config.json."""
  path = os.path.join(workdir, 'config.json')
  new = config_dict(config)
  old = None
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
  # Every process decides on the same file: none may delete or rewrite it before all read it.
  checkpoints.sync('camkd_jax_read_config')
  if old is not None:
    diff = config_differences(old, new)
    if diff and not config.overwrite:
      shown = '\n  '.join(diff[:12]) + ('\n  ...' if len(diff) > 12 else '')
      raise ValueError(
          f'{workdir} holds a run of a different config ({len(diff)} key(s) differ):\n  {shown}\n'
          f'Use another --workdir, or pass --config.overwrite=True to delete that run and start '
          f'afresh.')
    if diff:
      clear_workdir(config, workdir)
  if distributed.is_main():
    os.makedirs(workdir, exist_ok=True)
  checkpoints.write_json(path, new)


def clear_workdir(config, workdir: str):
  """Deletes what an earlier run wrote (config.overwrite with a different config)."""
  teacher = os.path.abspath(config.teacher.checkpoint) if config.teacher.checkpoint else ''
  if teacher and teacher.startswith(os.path.abspath(workdir) + os.sep):
    raise ValueError(f'config.teacher.checkpoint={config.teacher.checkpoint} lies inside '
                     f'{workdir}, which config.overwrite would delete; copy the teacher elsewhere')
  logging.warning('config.overwrite: deleting the earlier run in %s', workdir)
  if distributed.is_main():
    for name in os.listdir(workdir):
      if name in OUTPUTS or name.startswith('seed_'):
        p = os.path.join(workdir, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  checkpoints.sync('camkd_jax_clear_workdir')
