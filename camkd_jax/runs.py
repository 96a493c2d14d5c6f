"""The run directory's contract: what a training run writes where, and how it is read back.

A run directory (a workdir) holds
  config.json          the run's config (CONFIG_FILE; written first, by camkd_jax.workdir)
  seed_<n>/            one sub-run per seed when config.seeds lists seeds (seed_dir, seed_dirs),
                       each with its own config.json and the outputs below
  OUTPUTS              metrics.json, results.md, figures/, tensorboard/, checkpoints/, the exported
                       teacher/ and student/ models, data_split.csv
An exported model is a directory with PARAMS/ (orbax) and METADATA (model_metadata: architecture,
input size and standardisation, classes, seed, dataset, init, view, report); METADATA is written
last and marks the export as finished (is_finished_model). Every JSON or text file is written
atomically (atomic_write): a reader never sees half a file, and a failed write leaves the earlier
file as it was.

No TensorFlow or JAX here: importable from anywhere (checkpoints.write_json adds the multi-host
barrier and the process-0 rule around write_json).
"""
import json
import os
import re
from typing import Any, Dict, List, Optional

import numpy as np

from camkd_jax import errors

CONFIG_FILE = 'config.json'
METRICS = 'metrics.json'
METADATA = 'metadata.json'
PARAMS = 'params'
SEED_PREFIX = 'seed_'
# What a run leaves in a run directory besides config.json, in the order the end-of-run summary
# lists it (a trailing '/' marks a directory; figures/ is shown by its Grad-CAM figure).
OUTPUTS = (METRICS, 'results.md', 'figures/gradcam.png', 'tensorboard/', 'checkpoints/',
           'teacher/', 'student/', 'data_split.csv')
# What config.overwrite deletes: config.json and the top-level entry of every output.
CLEARED = (CONFIG_FILE,) + tuple(dict.fromkeys(o.split('/')[0] for o in OUTPUTS))


# ----------------------------------------------------------------------------- layout
def seed_dir(workdir: str, seed: int) -> str:
  """workdir/seed_<seed>: the sub-run of one seed of a multi-seed run."""
  return os.path.join(workdir, f'{SEED_PREFIX}{int(seed)}')


def seed_of(path: str) -> Optional[int]:
  """The seed of a seed_<n> directory (by its name), or None for any other path."""
  m = re.fullmatch(rf'{SEED_PREFIX}(-?\d+)', os.path.basename(os.path.normpath(path)))
  return int(m.group(1)) if m else None


def seed_dirs(workdir: str) -> List[str]:
  """The seed_<n>/ sub-runs of `workdir` (directories only), in increasing seed order; [] when
  there are none or `workdir` does not exist."""
  if not os.path.isdir(workdir):
    return []
  found = [(seed_of(n), os.path.join(workdir, n)) for n in os.listdir(workdir)]
  return [p for s, p in sorted(f for f in found if f[0] is not None) if os.path.isdir(p)]


def run_dirs(workdir: str) -> List[str]:
  """`workdir` itself and its seed_<n>/ sub-runs (each may hold a run's outputs)."""
  return [workdir] + seed_dirs(workdir)


# ----------------------------------------------------------------------------- writing
def atomic_write(path: str, write, mode: str = 'w', newline: Optional[str] = None):
  """write(file) into `path`.tmp<pid>, then rename over `path`: a reader never sees half a file
  and a failed write leaves the previous `path` as it was. newline='' for the csv module."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, mode, newline=newline) as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def jsonable(obj):
  """Plain JSON types: numpy scalars -> Python, non-finite floats -> None (valid JSON)."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    v = float(obj)
    return v if np.isfinite(v) else None
  return obj


def write_json(path: str, obj, indent: int = 2):
  """Atomic JSON write of `obj` (numpy values made plain, see `jsonable`); a full or read-only
  disk becomes one errors.OutputError naming the file."""
  def write(f):
    json.dump(jsonable(obj), f, indent=indent, sort_keys=False)
    f.write('\n')
  with errors.disk_writes(path, os.path.basename(path)):
    atomic_write(path, write)


# ----------------------------------------------------------------------------- config.json
def config_dict(config) -> Dict[str, Any]:
  """A ConfigDict as the plain dict config.json holds."""
  return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> Dict[str, Any]:
  """workdir/config.json as a dict; a missing, unreadable or damaged file is one
  errors.WorkdirError naming it."""
  path = os.path.join(workdir, CONFIG_FILE)
  hint = (f'{workdir} is not a camkd_jax run directory: pass the --workdir of a training run '
          '(for a multi-seed run, one of its seed_<n> directories)')
  try:
    with open(path) as f:
      config = json.load(f)
  except FileNotFoundError:
    raise errors.WorkdirError(f'{path} not found; {hint}') from None
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise errors.WorkdirError(f'{path} cannot be read ({type(e).__name__}: {e}); {hint}') \
        from None
  if not isinstance(config, dict):
    raise errors.WorkdirError(f'{path} holds a JSON {type(config).__name__}, not an object; '
                              f'{hint}')
  return config


def get_path(d, dotted: str, default=None):
  """d['a']['b'] for 'a.b' (dicts or ConfigDicts), or `default` where a key is absent."""
  for k in dotted.split('.'):
    if not hasattr(d, 'keys') or k not in d.keys():
      return default
    d = d[k]
  return d


def flatten(d, prefix: str = '') -> Dict[str, Any]:
  """{'a.b': value} for every leaf of nested dicts (or ConfigDicts)."""
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    out.update(flatten(v, key + '.') if hasattr(v, 'items') else {key: v})
  return out


# ----------------------------------------------------------------------------- model exports
# What a loader needs from metadata.json (model_metadata writes more).
REQUIRED_METADATA = ('model', 'image_size', 'class_names', 'num_classes')
# Files orbax writes into every finished params/ checkpoint.
PARAMS_FILES = ('_METADATA', '_CHECKPOINT_METADATA')


def model_metadata(config, data, report, stage: str = 'teacher') -> Dict[str, Any]:
  """An export's metadata.json: what a loader must check before using its parameters, and
  where they started. `data`: image_size, class_names and num_classes of the run's data."""
  from camkd_jax import weights  # pylint: disable=g-import-not-at-top
  return {'model': {'name': config.model.name, 'width': float(config.model.width),
                    'dtype': config.model.dtype,
                    'input_mean': [float(v) for v in config.model.get('input_mean', ())],
                    'input_std': [float(v) for v in config.model.get('input_std', ())]},
          'image_size': int(data.image_size), 'class_names': list(data.class_names),
          'num_classes': int(data.num_classes), 'seed': int(config.seed),
          'dataset': config.data.name, 'init': weights.stage_init(config, stage),
          'view': config.student.view if stage == 'student' else 'upsampled', 'report': report}


def is_finished_model(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, METADATA))


def export_error(directory: str, problem: str) -> errors.ModelExportError:
  return errors.ModelExportError(
      f'{directory} is not a usable camkd_jax model export: {problem}. An export is a directory '
      f'with {PARAMS}/ and {METADATA}, as a teacher run writes to <workdir>/teacher; copy it '
      'again from its run, or retrain it (leave config.teacher.checkpoint empty).')


def read_metadata(directory: str) -> Dict[str, Any]:
  """metadata.json of an export; errors name what is missing or damaged."""
  path = os.path.join(directory, METADATA)
  if not os.path.isdir(directory):
    raise export_error(directory, f'the directory does not exist ({METADATA} not found)')
  if not os.path.isfile(path):
    raise export_error(directory, f'{METADATA} not found (the export never finished, or the '
                        'file was not copied)')
  try:
    with open(path) as f:
      meta = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise export_error(directory, f'{METADATA} is truncated or not JSON ({e})') from None
  missing = [k for k in REQUIRED_METADATA if not isinstance(meta, dict) or k not in meta]
  if missing:
    raise export_error(directory, f'{METADATA} lacks the key(s) {missing}')
  return meta


def check_export(directory: str) -> Dict[str, Any]:
  """The metadata of a complete export; errors name a missing or incomplete params/."""
  meta = read_metadata(directory)
  params = os.path.join(directory, PARAMS)
  if not os.path.isdir(params):
    raise export_error(directory, f'{PARAMS}/ not found')
  missing = [f for f in PARAMS_FILES if not os.path.isfile(os.path.join(params, f))]
  if missing:
    raise export_error(directory, f'{PARAMS}/ is incomplete (no {", ".join(missing)})')
  return meta


# metadata.json keys of a teacher that must equal this config's (metadata key: config key).
TEACHER_KEYS = {'model.name': 'model.name', 'model.width': 'model.width',
                'model.input_mean': 'model.input_mean', 'model.input_std': 'model.input_std',
                'image_size': 'image_size', 'dataset': 'data.name'}


def teacher_mismatches(meta: Dict, config, seed: Optional[int] = None,
                       class_names: Optional[List[str]] = None,
                       external: bool = False) -> List[str]:
  """'key: teacher X, this config Y' for each difference between a teacher's metadata and the
  config: the TEACHER_KEYS, the seed (`seed`: the run's, config.seed unless a seed_<n>/ run) and,
  when given (they are known with the data), the class names. `external`: a teacher trained
  elsewhere (config.teacher.checkpoint), whose seed and dataset name may differ."""
  new = flatten(config_dict(config))
  out = []
  want_seed = int(config.seed if seed is None else seed)
  if not external and meta.get('seed') is not None and int(meta['seed']) != want_seed:
    out.append(f'seed: teacher {meta["seed"]}, this config {want_seed}')
  for mkey, ckey in TEACHER_KEYS.items():
    if external and mkey == 'dataset':
      continue
    have = get_path(meta, mkey)
    want = new.get(ckey)
    if isinstance(want, (list, tuple)) or isinstance(have, (list, tuple)):
      have, want = [float(v) for v in have or ()], [float(v) for v in want or ()]
    if have != want:
      out.append(f'{mkey}: teacher {have!r}, this config {want!r}')
  if class_names is not None and meta.get('class_names') != list(class_names):
    out.append(f'class_names: teacher {meta.get("class_names")!r}, this config '
               f'{list(class_names)!r}')
  return out
