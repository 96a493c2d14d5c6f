r"""The paper's study as one resumable sweep: a teacher per seed, then for every magnification and
every method a student, summarised as mean +/- std over seeds in RESULTS.md plus a plot.

  # the study on the embedded synthetic dataset as in experiments/RESULTS.md (2-core CPU, ~1.5 h
  # from scratch; a_at = 3 and a_fm = 0.01 chosen on validation, 8-epoch students)
  python experiments/reproduce.py --workers=2 --set=num_epochs=8 --set=loss.at=3 --set=loss.fm=0.01
  # how long would the grid take at the benchmark's images/s (distill, teacher, eval)?
  python experiments/reproduce.py --dataset=sicapv2 --estimate=350,455,1365
  # the same on SICAPv2 with a GPU (defaults of docs/method.md: VGG16, 512 px, 20 epochs)
  python experiments/reproduce.py --dataset=sicapv2 --data_dir=/data/sicapv2 \
      --out=experiments/RESULTS_sicapv2.md --workdir=workdirs/study_sicapv2
  # a tiny grid (CI): two cells, a few steps
  python experiments/reproduce.py --magnifications=2.5 --methods=ce,fm_at --seeds=22 \
      --smoke --workdir=/tmp/study --out=/tmp/study/RESULTS.md
  # the paired report (differences to CE within a seed, CIs, per-epoch validation kappa) from
  # committed records alone: see experiments/RESULTS_paired.md for its full command
  python experiments/reproduce.py --protocol=paper --magnifications=1.25 --methods=ce,at,fm_at \
      --set=num_epochs=10 --set=teacher.num_epochs=2 --store=experiments/results/paired_cells_1.25x \
      --workdir=/tmp/no_workdir --report_only --paired --out=/tmp/RESULTS_paired.md
  # compare saliency variants: any config field can be set for every student
  python experiments/reproduce.py --methods=at --set=attention.map=gradcam_plus_target

A cell whose workdir holds a finished metrics.json is not recomputed; an interrupted cell resumes
from its checkpoint. Hyper-parameters are fixed before the sweep (chosen on validation only).

`--store=DIR` keeps one small JSON record per finished cell (its metrics.json, the sweep's settings,
the commit and the date) in DIR, meant to be committed with the results. A study longer than one
machine's life resumes from the store: a recorded cell is not retrained even when its workdir is
gone, and the report is built from the records. A seed's teacher is retrained (its checkpoint is
needed) only when one of its students is still missing; its new metrics are compared with the
record. The store refuses records of a sweep with other settings (protocol, dataset, --set, smoke).

The page (tables, the paired statistics, figures) is written by experiments/study_report.py from
the cells' results alone: `--report_only` rebuilds it from the records.

`--workers=N` runs the grid in N processes, worker k pinned to CPU core k (on a 2-core CPU two
single-threaded workers finish the grid sooner than one process using both cores: the per-cell
start-up, evaluation and checkpointing are mostly single-threaded). The workers share one work
queue: each takes the first cell still to train that no other worker has claimed (a claim is a file
in WORKDIR/.claims made with O_EXCL) and that can start now, a student only once its seed's teacher
is finished. No worker idles while a cell is free, also when a resumed sweep has its remaining
cells bunched in one part of the grid. The parent clears stale claims before it starts the
workers. On a GPU keep the default, one process.
"""
import argparse
import importlib
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from camkd_jax import reporting  # pylint: disable=wrong-import-position
from camkd_jax import runs  # pylint: disable=wrong-import-position
import study_report  # pylint: disable=wrong-import-position

# method -> (config module, loss overrides). 'at' is AT+ alone, 'fm_at' the paper's FM + AT+.
METHODS = {
    'ce': ('ce_student', {}),
    'kd': ('kd', {}),
    'fm': ('fm', {}),
    'at': ('attn_kd', {'loss.fm': 0.0}),
    'fm_at': ('attn_kd', {}),
    # FM + AT+ with the student started as a copy of the trained teacher (config.student.init).
    'fm_at_tinit': ('attn_kd', {'student.init': 'teacher'}),
    # Native low-resolution students (config.student.view): the S / f image at its own size.
    'ce_native': ('ce_student', {'student.view': 'native'}),
    'fm_at_native': ('attn_kd', {'student.view': 'native'}),
}
LOSS_TERMS = ('ce', 'kd', 'fm', 'at', 'sr')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--magnifications', default='5,2.5,1.25,0.625')
  p.add_argument('--methods', default='ce,kd,fm,at,fm_at')
  p.add_argument('--seeds', default='22,32,43')
  p.add_argument('--dataset', default='synthetic_histology')
  p.add_argument('--data_dir', default='')
  p.add_argument('--smoke', action='store_true', help='tiny data/model, a few steps (CI)')
  p.add_argument('--protocol', default='', choices=('', 'default', 'paper'),
                 help="config argument protocol=...: 'paper' = ImageNet VGG16 for teacher and "
                      "students, PyTorch head init, x / 255 (see configs/base.py)")
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override for every run, e.g. num_epochs=3 (repeatable)')
  p.add_argument('--workdir', default=os.path.join(REPO, 'workdirs', 'study'))
  p.add_argument('--out', default=os.path.join(REPO, 'experiments', 'RESULTS.md'))
  p.add_argument('--plot', default='', help='PNG path (default: next to --out)')
  p.add_argument('--notes', default='', help='markdown file appended to the report')
  p.add_argument('--store', default='',
                 help='folder of per-cell result records (commit it): a study resumes from it '
                      'on a fresh machine; see the module docstring')
  p.add_argument('--report_only', action='store_true',
                 help='train nothing: summarise the cells already finished')
  p.add_argument('--estimate', default='', metavar='DISTILL[,TEACHER[,EVAL]]',
                 help='train nothing: print the time the grid would take at these images/s '
                      '(from `python -m camkd_jax.benchmark`: the distill, teacher and eval '
                      'programs; TEACHER defaults to DISTILL, EVAL to 3 x TEACHER)')
  p.add_argument('--workers', type=int, default=1,
                 help='parallel worker processes, each pinned to one CPU core (CPU sweeps)')
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # 'k/N', set by --workers
  p.add_argument('--teacher_wait_s', type=float, default=7200.0,
                 help="how long a worker's student cell waits for its seed's teacher")
  p.add_argument('--paired', action='store_true',
                 help='add the paired report: per-seed rows, differences method - CE within a '
                      'seed (mean, 95%% CI by bootstrap over seeds and by paired t, wins, share '
                      'of the teacher - CE gap closed), validation kappa per epoch, and plots of '
                      'the per-seed differences (<out>_differences.png) and of the validation '
                      'curves (<out>_curves.png)')
  p.add_argument('--select_epochs', type=int, default=0, metavar='N',
                 help='report every student as if it had been trained N epochs: the epoch '
                      'selected on validation among its first N (the same rule). Exact because '
                      'a shorter run is the prefix of a longer one (constant learning rate, data '
                      'order per (seed, epoch), augmentation per step)')
  p.add_argument('--intro', default='',
                 help='markdown file put at the top of the report; with --paired its (and '
                      "--notes') placeholders are filled from the report's own paired numbers: "
                      '{{at.mean}} (AT+ - CE), {{at.ci}}, {{at.n}}, {{at.wins}}, {{at.share}}, '
                      '{{at.verdict}}, ...; {{at@8.mean}} as if stopped after 8 epochs (see '
                      'study_report.fill_placeholders)')
  p.add_argument('--title', default='', help='the report\'s heading (default: Study results '
                 '(DATASET))')
  return p.parse_args(argv)


def config_arg(args, magnification=None):
  parts = [f'dataset={args.dataset}']
  if args.data_dir:
    parts.append(f'data_dir={args.data_dir}')
  if args.smoke:
    parts.append('smoke=1')
  if args.protocol:
    parts.append(f'protocol={args.protocol}')
  if magnification is not None:
    parts.append(f'magnification={magnification}')
  return ','.join(parts)


def _coerce(old, value):
  if isinstance(old, bool):
    return value.lower() in ('1', 'true', 'yes')
  if isinstance(old, tuple):
    return tuple(type(old[0])(v) for v in value.split(','))
  return type(old)(value) if old is not None else value


def apply_overrides(config, overrides):
  """Sets dotted `key=value` fields; an unknown key fails naming it."""
  for item in overrides:
    key, _, value = item.partition('=')
    node, *path = key.split('.')
    target = config
    parts = [node] + path
    for part in parts[:-1]:
      target = getattr(target, part)
    if parts[-1] not in target:
      raise KeyError(f'--set {item!r}: config has no field {key!r}')
    target[parts[-1]] = _coerce(target[parts[-1]], value) if isinstance(value, str) else value
  return config


def make_config(module, arg, seed, overrides):
  config = importlib.import_module(f'configs.{module}').get_config(arg)
  config.seed = int(seed)
  return apply_overrides(config, overrides)


# Split sizes (train, validation, test) for --estimate: SICAPv2's Val1 fold (docs/method.md) and the
# embedded default; other datasets: the sizes of the prepared dataset.
SPLIT_SIZES = {'sicapv2': (7472, 2487, 2122), 'synthetic_histology': (2000, 400, 400)}


def estimate_seconds(sizes, batch_size, teacher_epochs, student_epochs, methods, num_mags,
                     num_seeds, distill_rate, teacher_rate=None, eval_rate=None):
  """Seconds of compute for the grid at the given images/s, steps and evaluation only.

  An epoch is train // batch steps of `batch_size` images; after every epoch the model is
  evaluated on validation + test. The teacher and the CE-only students run the teacher program
  (one network, forward + backward), the distilling students the distill program (KD and FM are
  a little cheaper than AT+, so this is an upper bound for them). Start-up, compilation and
  checkpointing are not included.
  """
  teacher_rate = teacher_rate or distill_rate
  eval_rate = eval_rate or 3.0 * teacher_rate
  train, val, test = sizes
  images = (train // batch_size) * batch_size
  epoch_eval = (val + test) / eval_rate
  teacher = teacher_epochs * (images / teacher_rate + epoch_eval)
  students = {m: student_epochs * (images / (teacher_rate if m == 'ce' else distill_rate)
                                   + epoch_eval) for m in methods}
  total = num_seeds * (teacher + num_mags * sum(students.values()))
  return {'teacher': teacher, 'students': students, 'total': total}


def print_estimate(args):
  """--estimate: the grid's compute time at the given images/s, from the configs' epochs."""
  mags, methods, seeds = cells(args)
  try:
    rates = [float(r) for r in args.estimate.split(',')]
  except ValueError:
    raise SystemExit(f'--estimate={args.estimate!r}: expected images/s numbers, e.g. 900,2500')
  if not 1 <= len(rates) <= 3 or min(rates) <= 0:
    raise SystemExit(f'--estimate={args.estimate!r}: give 1 to 3 positive images/s')
  teacher = teacher_config(args, seeds[0])
  student = method_config(methods[0], config_arg(args, mags[0]), seeds[0], args.set)
  if args.dataset in SPLIT_SIZES:
    sizes = SPLIT_SIZES[args.dataset]
  else:
    from camkd_jax import datasets  # pylint: disable=g-import-not-at-top
    source = datasets.get_source(teacher)
    sizes = tuple(source.num_examples(s) for s in ('train', 'validation', 'test'))
  est = estimate_seconds(sizes, int(student.batch_size), int(teacher.teacher.num_epochs),
                         int(student.num_epochs), methods, len(mags), len(seeds), *rates)
  print(f'{args.dataset}: splits {sizes}, batch {student.batch_size}, teacher '
        f'{teacher.teacher.num_epochs} epochs, students {student.num_epochs} epochs; images/s '
        f'distill/teacher/eval = {"/".join(f"{r:g}" for r in rates)}')
  print(f'  teacher: {reporting.format_duration(est["teacher"])} each, {len(seeds)} seed(s)')
  for m, sec in est['students'].items():
    print(f'  {study_report.METHOD_LABELS[m]} student: {reporting.format_duration(sec)} each, '
          f'x {len(mags)} magnification(s) '
          f'x {len(seeds)} seed(s)')
  print(f'  total: {reporting.format_duration(est["total"])} of steps and evaluation '
        f'({est["total"] / 3600:.1f} h; start-up and compilation not included)')
  return est


def method_overrides(overrides, weights):
  """The --set items that apply to a method whose loss weights are `weights` (None: teacher).

  `--set=loss.at=3` sets the weight of AT+ *where the method uses AT+*: it never switches a term on
  for a method that does not have it (CE only stays CE only), nor changes the CE-only teacher.
  """
  keep = []
  for item in overrides:
    key = item.partition('=')[0]
    if key.startswith('loss.') and key[5:] in LOSS_TERMS:
      if weights is None or weights.get(key[5:], 0.0) == 0.0:
        continue
    keep.append(item)
  return keep


def teacher_config(args, seed):
  """The CE-only teacher's config: the --set items other than loss weights."""
  return make_config('teacher', config_arg(args), seed, method_overrides(args.set, None))


def method_config(method, arg, seed, overrides):
  """The student config of `method`: its config file, its own weights, then the --set items."""
  module, loss = METHODS[method]
  config = make_config(module, arg, seed, [])
  apply_overrides(config, [f'{k}={v}' for k, v in loss.items()])
  weights = {t: float(config.loss[t]) for t in LOSS_TERMS}
  return apply_overrides(config, method_overrides(overrides, weights))


def finished(workdir, key, config=None, note=True):
  """The metrics.json of the finished run in `workdir` (None if there is none). With `config`:
  None too when the run's config.json differs from it in a key that changes results (e.g. a
  sweep rerun with --set=num_epochs=16 over the workdirs of an 8-epoch sweep): such a cell runs
  again, and the workdir then continues the run (more epochs) or refuses the other config.
  `note`: say so (once per cell; the polling of a waiting worker does not)."""
  path = os.path.join(workdir, runs.METRICS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    out = json.load(f)
  if key not in out:
    return None
  if config is not None and os.path.isfile(os.path.join(workdir, runs.CONFIG_FILE)):
    from camkd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    diff = workdir_lib.config_differences(runs.read_config(workdir), runs.config_dict(config))
    if diff:
      if note:
        print(f'  note: {path} was written by another config ({"; ".join(diff[:3])}); the '
              'cell runs again', flush=True)
      return None
  return out


def cell_config(args, cell, teacher_wd):
  """The config a cell runs with; a student's teacher is the export in `teacher_wd`."""
  method, mag, seed = cell
  if method == 'teacher':
    return teacher_config(args, seed)
  config = method_config(method, config_arg(args, mag), seed, args.set)
  config.teacher.checkpoint = os.path.join(teacher_wd, 'teacher')
  return config


# The settings that must agree between a store's records and the sweep that reads or adds to it.
STORE_KEYS = ('dataset', 'data_dir', 'smoke', 'protocol', 'set')


def store_settings(args):
  return {'dataset': args.dataset, 'data_dir': args.data_dir, 'smoke': bool(args.smoke),
          'protocol': args.protocol, 'set': sorted(args.set)}


def store_record_path(store, workdir):
  return os.path.join(store, os.path.basename(os.path.normpath(workdir)) + '.json')


def check_store(args):
  """Creates `args.store` with its settings, or checks that they are this sweep's."""
  if not args.store:
    return
  path = os.path.join(args.store, 'sweep.json')
  mine = store_settings(args)
  if not os.path.exists(path):
    runs.atomic_write(path, lambda f: json.dump(mine, f, indent=1))
    return
  with open(path) as f:
    theirs = json.load(f)
  diff = {k: (theirs.get(k), mine[k]) for k in STORE_KEYS if theirs.get(k) != mine[k]}
  if diff:
    lines = '; '.join(f'{k}: store {a!r}, this sweep {b!r}' for k, (a, b) in diff.items())
    raise SystemExit(f'--store={args.store} holds the records of a sweep with other settings '
                     f'({lines}). Use the same settings to add to it, or another --store.')


def stored(args, workdir, key):
  """The metrics.json kept in the store for this cell, or None."""
  if not args.store:
    return None
  path = store_record_path(args.store, workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  return record['metrics'] if key in record.get('metrics', {}) else None


def _commit():
  import subprocess  # pylint: disable=g-import-not-at-top
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''


def record_cell(args, workdir, cell, metrics, extra=None):
  """Writes the store's record of a finished cell (never replaces an existing one)."""
  path = store_record_path(args.store, workdir)
  if os.path.exists(path):
    return
  method, mag, seed = cell
  record = {'cell': os.path.basename(os.path.normpath(workdir)), 'method': method,
            'magnification': mag, 'seed': seed, 'settings': store_settings(args),
            'commit': _commit(), 'recorded': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
            'metrics': metrics, **(extra or {})}
  runs.atomic_write(path, lambda f: json.dump(record, f, indent=1))


def teacher_fingerprint(metrics):
  """A short hash of a teacher's training history (per-epoch losses and metrics, full precision).

  Students whose records carry the same fingerprint distilled from the same teacher: a paired
  comparison needs that. A teacher retrained on another CPU (a resumed sweep) may get another
  history, hence another fingerprint (an AMD EPYC and an Intel Xeon, both with AVX-512 and one
  thread, gave the same history bit for bit).
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  text = json.dumps(metrics['teacher'].get('history', []), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_dir(args, cell):
  """The workdir of a cell: teacher_s22, at_m1.25_s22, ..."""
  method, mag, seed = cell
  name = f'teacher_s{seed}' if method == 'teacher' else f'{method}_m{mag:g}_s{seed}'
  return os.path.join(args.workdir, name)


def kappas(report):
  return {split: report[split]['kappa'] for split in study_report.SPLITS}


def cells(args):
  mags = [float(m) for m in args.magnifications.split(',')]
  methods = [m.strip() for m in args.methods.split(',')]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise SystemExit(f'unknown method(s) {unknown}; known: {list(METHODS)}')
  seeds = [int(s) for s in args.seeds.split(',')]
  return mags, methods, seeds


def cell_logging():
  """The driver's per-epoch lines (metrics, ETA) are absl INFO logs: shows them outside absl.app,
  without the INFO chatter of orbax, TFDS and JAX (the commands' filter, cli.quiet_library_record,
  here on absl's logger: absl's handler is not installed outside absl.app). Idempotent."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from camkd_jax import cli  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  absl_logger = logging.get_absl_logger()
  if cli.quiet_library_record not in absl_logger.filters:
    absl_logger.addFilter(cli.quiet_library_record)


def run_cell(config, workdir):
  from camkd_jax import train  # pylint: disable=g-import-not-at-top
  cell_logging()
  return train.run(config, workdir)


def sweep(args):
  """Runs every missing cell; returns {('teacher', seed) | (method, mag, seed): metrics}."""
  mags, methods, seeds = cells(args)
  check_store(args)
  # Seed-major: a seed's teacher, then its students, so that the seeds finish one after another
  # and a partial grid holds complete pairs (every method of a seed) as early as possible.
  todo = [cell for s in seeds
          for cell in [('teacher', None, s)] + [(m, g, s) for g in mags for m in methods]]
  k, n = worker_share(args.worker)
  tag = f'study w{k}' if n > 1 else 'study'
  dirs = [(cell_dir(args, cell), study_report.cell_key(cell)) for cell in todo]
  # A cell is done when its workdir or the store holds its metrics. A teacher is also trained
  # when it is only in the store but one of its students still has to be trained (they need its
  # checkpoint). Every worker computes the same plan.
  teacher_index = {seed: todo.index(('teacher', None, seed)) for seed in seeds}
  configs = [cell_config(args, cell, dirs[teacher_index[cell[2]]][0]) for cell in todo]
  # metrics.json in the workdir, of this sweep's config (or None)
  local = [finished(wd, key, c) for (wd, key), c in zip(dirs, configs)]
  done = [out or stored(args, wd, key) for out, (wd, key) in zip(local, dirs)]
  students_left = {seed for (method, _, seed), out in zip(todo, done)
                   if method != 'teacher' and out is None}
  train = [out is None or (method == 'teacher' and seed in students_left and local[i] is None)
           for i, ((method, _, seed), out) in enumerate(zip(todo, done))]

  def record(i):
    if args.store and local[i] is not None:
      method, _, seed = todo[i]
      extra = {}
      teacher = local[teacher_index[seed]]
      if method != 'teacher' and teacher is not None:  # the teacher it was distilled from
        extra['teacher_kappa'] = kappas(teacher['teacher'])
      if teacher is not None:
        extra['teacher_fingerprint'] = teacher_fingerprint(teacher)
      record_cell(args, dirs[i][0], todo[i], done[i], extra)

  t0 = time.time()
  if not args.report_only:
    # One process trains every cell left in grid order; a worker those it claims from the queue.
    to_train = [i for i in range(len(todo)) if train[i]]
    queue = iter(to_train) if n == 1 else claimed_cells(args, todo, to_train, dirs, teacher_index,
                                                        configs)
    pending = len(to_train) if n == 1 else -(-len(to_train) // n)  # for the ETA: a fair share
    for done_here, i in enumerate(queue):
      method, mag, seed = todo[i]
      wd, key = dirs[i]
      out = done[i]
      elapsed = time.time() - t0
      remaining = max(pending - done_here, 1)
      eta = elapsed / done_here * remaining if done_here else float('nan')
      again = ' (again: its students need the checkpoint)' if out is not None else ''
      print(f'[{tag} {i + 1}/{len(todo)}] {method} m={mag} seed={seed} -> {wd}{again} '
            f'(ETA {reporting.format_duration(eta)})', flush=True)
      if method != 'teacher':
        t = teacher_index[seed]
        teacher_wd = dirs[t][0]
        # perhaps trained by another worker meanwhile
        local[t] = wait_for_teacher(teacher_wd, configs[t], args.teacher_wait_s)
      new = local[i] = run_cell(configs[i], wd)
      if out is not None and kappas(out[key]) != kappas(new[key]):
        print(f'  note: retrained {method} seed={seed} differs from its stored record: '
              f'{kappas(new[key])} now, {kappas(out[key])} recorded (the record is kept; its '
              'students trained now use the new checkpoint and record its kappa)', flush=True)
      done[i] = out or new
      record(i)  # at once: a later failure must not lose it
  results = {}
  for i, cell in enumerate(todo):
    if done[i] is not None:
      record(i)
      results[cell] = done[i]
  return results, time.time() - t0


CLAIMS = '.claims'


def claim(args, workdir):
  """True if this process is the first to claim the cell in `workdir` (an O_EXCL file)."""
  path = os.path.join(args.workdir, CLAIMS, os.path.basename(os.path.normpath(workdir)))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    return False
  return True


def teacher_ready(workdir, config):
  """The teacher in `workdir` is finished, by `config` (the sweep's teacher config; None: any)."""
  return finished(workdir, 'teacher', config, note=False) is not None


def next_cell(args, todo, left, dirs, teacher_index, configs):
  """The index of the first cell in `left` that can start now and that this process claims.

  A student can start once its seed's teacher is finished (its metrics.json exists, written by
  the sweep's teacher config `configs[t]`: not a teacher of another config still in the workdir,
  which a worker is about to train again); a teacher at once. Cells another worker claimed are
  dropped from `left`; so is the one returned. None: every cell left waits for a teacher that
  another worker is training.
  """
  for i in list(left):
    method, _, seed = todo[i]
    t = teacher_index[seed]
    if method != 'teacher' and not teacher_ready(dirs[t][0], configs[t]):
      continue
    left.remove(i)
    if claim(args, dirs[i][0]):
      return i
  return None


def claimed_cells(args, todo, to_train, dirs, teacher_index, configs, poll_s=5.0):
  """Yields the cells this worker trains, taken from the queue shared with the other workers."""
  left = list(to_train)
  waited = 0.0
  while left:
    i = next_cell(args, todo, left, dirs, teacher_index, configs)
    if i is not None:
      waited = 0.0
      yield i
      continue
    if not left:
      break
    if not waited:
      print(f'  waiting for a teacher: {len(left)} cell(s) left, none free', flush=True)
    if waited > args.teacher_wait_s:
      raise SystemExit(f'cells {[dirs[i][0] for i in left]} still wait for their teachers after '
                       f'{args.teacher_wait_s:.0f} s; is the worker training them alive? Rerun '
                       'the same command to resume.')
    time.sleep(poll_s)
    waited += poll_s


def worker_share(spec):
  """'k/N' -> (k, N); '' -> (0, 1)."""
  if not spec:
    return 0, 1
  try:
    k, n = (int(x) for x in spec.split('/'))
  except ValueError:
    raise SystemExit(f'--worker={spec!r}: expected k/N, e.g. 0/2') from None
  if not 0 <= k < n:
    raise SystemExit(f'--worker={spec!r}: k must be in [0, N)')
  return k, n


def wait_for_teacher(workdir, config, timeout_s, poll_s=5.0):
  """The metrics of the teacher in `workdir` once it is finished by `config` (blocks while
  another worker trains it)."""
  t0 = time.time()
  announced = False
  while (metrics := finished(workdir, 'teacher', config, note=False)) is None:
    if time.time() - t0 > timeout_s:
      raise SystemExit(f'teacher {workdir} not finished after {timeout_s:.0f} s; is its worker '
                       'alive? Rerun the same command to resume.')
    if not announced:
      print(f'  waiting for teacher {workdir}', flush=True)
      announced = True
    time.sleep(poll_s)
  return metrics


def run_workers(args, argv):
  """Starts `args.workers` copies of this script, worker k pinned to core k; waits for all."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
  base = [a for a in argv if not a.startswith('--workers')]
  # Build (or verify) the dataset once here: workers building it together would race on TFDS's
  # final rename.
  from camkd_jax import datasets  # pylint: disable=g-import-not-at-top
  datasets.get_source(teacher_config(args, 0))
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(args.workdir, CLAIMS), ignore_errors=True)  # from a killed sweep
  procs = []
  for k in range(args.workers):
    def pin(core=cores[k % len(cores)] if cores else None):
      if core is not None:
        os.sched_setaffinity(0, {core})
    cmd = [sys.executable, os.path.abspath(__file__), *base, f'--worker={k}/{args.workers}']
    procs.append(subprocess.Popen(cmd, preexec_fn=pin))
  codes = [p.wait() for p in procs]
  failed = [k for k, c in enumerate(codes) if c != 0]
  if failed:
    raise SystemExit(f'worker(s) {failed} failed (exit codes {codes}); their cells are unfinished. '
                     'Rerun the same command to resume them.')


def study_labels(args):
  """(teacher label, selection text) from the grid's own config, not assumed: e.g. ('10x',
  'validation kappa')."""
  _, _, seeds = cells(args)
  config = teacher_config(args, seeds[0])
  metric = str(config.selection.metric)
  selection = {'kappa': 'validation kappa', 'slide_kappa': 'validation slide-level kappa'}.get(
      metric, f'validation {metric}')
  return f'{float(config.base_magnification):g}x', selection




def select_epochs(args, results, epochs=None):
  """--select_epochs=N (or `epochs`): every student's metrics re-selected within its first N
  epochs."""
  epochs = epochs or args.select_epochs
  out = {}
  for cell, metrics in results.items():
    if cell[0] == 'teacher':
      out[cell] = metrics
      continue
    config = method_config(cell[0], config_arg(args, cell[1]), cell[2], args.set)
    min_delta = float(config.selection.min_delta)
    student = study_report.select_within(metrics['student'], epochs, min_delta)
    out[cell] = {**metrics, 'student': student}
  return out


def teacher_fingerprints(args, results):
  """{cell: fingerprint of the teacher it was distilled from (a teacher: its own)}: from the
  cell's store record when there is one, else from the seed's teacher in `results`."""
  out = {}
  for cell in results:
    fp = None
    if args.store:
      path = store_record_path(args.store, cell_dir(args, cell))
      if os.path.exists(path):
        with open(path) as f:
          fp = json.load(f).get('teacher_fingerprint')
    if fp is None and ('teacher', None, cell[2]) in results:
      fp = teacher_fingerprint(results[('teacher', None, cell[2])])
    out[cell] = fp
  return out


def main(argv=None, args=None):
  """Runs (or reads) the grid of `argv` and writes its report; `args`: `argv` already parsed."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv) if args is None else args
  mags, methods, seeds = cells(args)
  if args.estimate:
    return print_estimate(args)
  if args.workers > 1 and not args.report_only and not args.worker:
    t0 = time.time()
    run_workers(args, argv)
    args.report_only = True
    results, _ = sweep(args)
    wall = time.time() - t0
  else:
    results, wall = sweep(args)
  if args.worker:
    return None  # the parent writes the report once every worker is done
  if args.select_epochs:
    results = select_epochs(args, results)
  # the earlier views the intro and notes quote ({{at@8.mean}}), seen from the same results
  views = {n: select_epochs(args, results, n)
           for n in study_report.placeholder_epochs(args.intro, args.notes)} if args.paired else {}
  import shlex  # pylint: disable=g-import-not-at-top
  return study_report.write_report(
      results, args.out, mags, methods, seeds,
      title=args.title or f'Study results ({args.dataset})',
      # the command that made the page, quoted: copy and run
      command='python experiments/reproduce.py ' + shlex.join(sys.argv[1:]),
      seeds_text=args.seeds, labels=study_labels(args), wall=wall, plot_path=args.plot,
      intro=args.intro, notes=args.notes,
      fingerprints=teacher_fingerprints(args, results) if args.paired else None, views=views)


def cli_main(argv=None):
  """The command line: main() with Ctrl-C / SIGTERM stopping the cell in flight at a step boundary,
  checkpointed, and one `error:` line (exit 130 / 143) naming the step a rerun of the same command
  resumes from; a refused workdir or bad data also end in one line (exit 2). The parent of
  --workers only waits: its workers (same process group) take the signal and stop that way."""
  from camkd_jax import cli  # pylint: disable=g-import-not-at-top
  from camkd_jax import interrupts  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.workers <= 1 or args.worker or args.report_only:
    interrupts.install()
  with cli.user_errors(cli.USER_ERRORS):
    return main(argv, args)


if __name__ == '__main__':
  cli_main()
