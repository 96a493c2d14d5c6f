r"""Whole-slide inference: a finished run's model on every tissue tile of whole-slide images.

  python -m camkd_jax.slide --workdir workdirs/attn_kd_m2.5 [--model student|teacher] \
      --out slides_out SLIDE.svs [SLIDE2.ndpi ...]

Per slide, in OUT/<slide name>/:
  tiles.csv     one row per tissue tile: level-0 x, y of its top-left corner, the level read,
                level_x, level_y, the region size read there, tissue fraction, one probability
                per class, the predicted class;
  heatmap.png   each class's probability over the slide, and the predicted class map;
  overlay.png   the predicted classes over the slide's thumbnail;
  summary.json  magnification and level, tissue area (mm^2, when the MPP is known), tile counts,
                class fractions, mean probabilities, tiles/s and seconds.
OUT/run_summary.json (run_summary_p<i>.json per process under jax.distributed) lists every slide
with its outcome. A slide that cannot be read (corrupt, not a slide, no magnification metadata)
is one error line naming it; the others still finish, and the command exits with status 1.

How it runs (see camkd_jax/wsi.py for the geometry): slides are planned (metadata, level, tissue
mask) one after another on the main thread, their tiles read in fixed-size batches by a pool of
reader threads, and the batches streamed into the jitted predict step of camkd_jax.inference
with several batches read ahead and two on the device, across slide boundaries: the device does
not wait for the next slide's reads, and one compiled program serves every slide.
Under jax.distributed (--coordinator_address etc., as for training) slide i goes to process
i % process_count; each process predicts on its own devices.
"""
import collections
import csv
import json
import logging as std_logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined only when run as a command: importing the module defines
  none, so it coexists with other absl programs)."""
  flags.DEFINE_string('workdir', None, 'Finished training run (or one seed_<n> of it).')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which model of the run.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_integer('stride', 0, 'Tile step in pixels at the model magnification (0: the tile '
                       'size, i.e. tiles side by side).')
  flags.DEFINE_integer('batch_size', 64, 'Tiles per compiled batch (rounded up to the devices).')
  flags.DEFINE_integer('readers', 4, 'Reader threads (one OpenSlide handle each).')
  flags.DEFINE_integer('prefetch', 0, 'Batches read ahead (0: 2 x readers).')
  flags.DEFINE_float('slide_magnification', None, 'Level-0 magnification of every slide (overrides '
                     'the metadata; needed for slides without it).')
  flags.DEFINE_float('mpp', None, 'Level-0 micrometres per pixel of every slide (overrides the '
                     'metadata; magnification = 10 / mpp).')
  flags.DEFINE_float('tissue_fraction', 0.5, 'Minimum tissue fraction of a tile to predict it.')
  flags.DEFINE_float('min_saturation', 0.05, 'Lower bound of the Otsu saturation threshold.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (jax.distributed).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (jax.distributed).')
  flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')


CLASS_COLOURS = ('#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02', '#a6761d',
                 '#666666', '#1f78b4', '#b2df8a')


# ----------------------------------------------------------------------------- options
class Options:
  """What the runner needs besides the model (the flags, or set in tests)."""

  def __init__(self, stride=0, batch_size=64, readers=4, prefetch=0, slide_magnification=None,
               mpp=None, tissue_fraction=0.5, min_saturation=0.05, progress_every_s=2.0):
    self.stride, self.batch_size, self.readers = stride, batch_size, readers
    self.prefetch = prefetch or 2 * readers
    self.slide_magnification, self.mpp = slide_magnification, mpp
    self.tissue_fraction, self.min_saturation = tissue_fraction, min_saturation
    self.progress_every_s = progress_every_s


def my_slides(paths: List[str], process_index: int, process_count: int) -> List[str]:
  """Slide i goes to process i % process_count."""
  return [p for i, p in enumerate(paths) if i % process_count == process_index]


def output_names(paths: List[str]) -> List[str]:
  """A distinct output directory name per slide: its file stem, + _<i> when stems repeat."""
  stems = [os.path.splitext(os.path.basename(p))[0] or 'slide' for p in paths]
  counts = collections.Counter(stems)
  return [s if counts[s] == 1 else f'{s}_{i}' for i, s in enumerate(stems)]


# ----------------------------------------------------------------------------- progress
class Progress:
  """A progress line with ETA over slides and tiles (logged every few seconds)."""

  def __init__(self, num_slides: int, every_s: float):
    self.num_slides, self.every_s = num_slides, every_s
    self.t0 = self.last = time.time()
    self.done_tiles = self.planned_tiles = self.planned = self.finished = self.unplanned = 0

  def plan(self, num_tiles: int):
    self.planned += 1
    self.planned_tiles += num_tiles

  def finish_slide(self, dropped_tiles: int = 0, planned: bool = True):
    self.finished += 1
    self.unplanned += not planned
    self.planned_tiles -= dropped_tiles
    self.log(force=True)

  def tiles(self, n: int):
    self.done_tiles += n
    self.log()

  def estimate_total(self) -> float:
    """Tiles of the planned slides + the mean per planned slide for the others."""
    if not self.planned:
      return 0.0
    return self.planned_tiles * (self.num_slides - self.unplanned) / self.planned

  def line(self) -> str:
    elapsed = time.time() - self.t0
    total = self.estimate_total()
    rate = self.done_tiles / max(elapsed, 1e-9)
    frac = self.done_tiles / total if total else float(self.finished >= self.num_slides)
    eta = (total - self.done_tiles) / rate if rate > 0 else None
    from camkd_jax import reporting  # pylint: disable=g-import-not-at-top
    bar = '#' * int(round(20 * min(frac, 1.0)))
    return (f'[{bar:<20}] slides {self.finished}/{self.num_slides} | tiles {self.done_tiles}/'
            f'{total:.0f}{"" if self.planned + self.unplanned == self.num_slides else " (est.)"} | '
            f'{rate:.1f} tiles/s | ETA {reporting.format_duration(eta)}')

  def log(self, force=False):
    now = time.time()
    if force or now - self.last >= self.every_s:
      self.last = now
      logging.info('%s', self.line())


# ----------------------------------------------------------------------------- one slide's state
class SlideJob:
  """Predictions of one slide as its batches come back."""

  def __init__(self, name, plan, num_classes, batch_size):
    self.name, self.plan = name, plan
    self.probs = np.zeros((len(plan.grid), num_classes), np.float32)
    self.batches = [np.arange(i, min(i + batch_size, len(plan.grid)))
                    for i in range(0, len(plan.grid), batch_size)]
    self.done = self.predicted = 0
    self.error: Optional[str] = None
    self.t_start = time.time()

  def add(self, index, probs):
    self.probs[index] = probs
    self.done += 1

  @property
  def complete(self) -> bool:
    return self.done == len(self.batches)


# ----------------------------------------------------------------------------- the run
class SlideRunner:
  """Plans, reads, predicts and writes a list of slides with one Predictor."""

  def __init__(self, run_model, which: str, out_dir: str, options: Options, predictor=None):
    from camkd_jax import inference  # pylint: disable=g-import-not-at-top
    from camkd_jax import wsi  # pylint: disable=g-import-not-at-top
    self.wsi = wsi
    self.rm, self.which, self.out_dir, self.opt = run_model, which, out_dir, options
    self.predictor = predictor or inference.Predictor(run_model, options.batch_size)
    self.fetch = inference.fetch
    self.stride = options.stride or run_model.tile_size
    self.results: List[Dict[str, Any]] = []

  def run(self, paths: List[str], names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Processes every slide; returns one record per slide ({'slide', 'status', ...})."""
    names = names or output_names(paths)
    self.progress = Progress(len(paths), self.opt.progress_every_s)
    reader = self.wsi.TileReader(self.opt.readers)
    reads, device = collections.deque(), collections.deque()
    self.t0 = time.time()
    try:
      for job, index in self._batches(paths, names):
        reads.append((job, index, reader.submit(job.plan, index)))
        while len(reads) > self.opt.prefetch:
          self._to_device(reads.popleft(), device)
      while reads:
        self._to_device(reads.popleft(), device)
      while device:
        self._collect(device.popleft())
    finally:
      reader.close()
    order = {n: i for i, n in enumerate(names)}  # in the order given, not of completion
    return sorted(self.results, key=lambda r: order[r['name']])

  def _batches(self, paths, names):
    """(job, tile indices) of every batch of every slide, planning slides lazily."""
    for path, name in zip(paths, names):
      t = time.time()
      try:
        plan = self.wsi.plan_slide(
            path, self.rm.magnification, self.rm.tile_size, self.stride,
            self.opt.slide_magnification, self.opt.mpp, self.opt.tissue_fraction,
            self.opt.min_saturation)
      except self.wsi.SlideError as e:
        self._fail(path, name, str(e))
        continue
      job = SlideJob(name, plan, len(self.rm.class_names), self.predictor.batch_size)
      job.t_start, job.plan_seconds = t, time.time() - t
      self.progress.plan(len(plan.grid))
      logging.info('%s: %gx (%s), level %d (downsample %g, resample x%.3g), %d tissue tiles of '
                   '%d', path, plan.magnification, plan.magnification_source, plan.level,
                   plan.level_downsample, plan.scale, len(plan.grid),
                   plan.grid_shape[0] * plan.grid_shape[1])
      if not job.batches:
        self._finish(job)
      for index in job.batches:
        yield job, index

  def _to_device(self, item, device):
    job, index, future = item
    try:
      tiles = future.result()
    except self.wsi.SlideError as e:
      job.error = job.error or str(e)
      tiles = None
    if job.error:  # a failed slide's remaining batches are dropped
      job.add(index, 0.0)
      if job.complete:
        self._fail(job.plan.path, job.name, job.error, job)
      return
    device.append((job, index, self.predictor.submit(tiles)))
    while len(device) > 2:
      self._collect(device.popleft())

  def _collect(self, item):
    job, index, pending = item
    job.add(index, self.fetch(pending))
    job.predicted += len(index)
    self.progress.tiles(len(index))
    if job.complete:
      if job.error:
        self._fail(job.plan.path, job.name, job.error, job)
      else:
        self._finish(job)

  def _fail(self, path, name, message, job=None):
    logging.error('FAILED %s', message if path in message else f'{path}: {message}')
    self.results.append({'slide': os.path.abspath(path), 'name': name, 'status': 'failed',
                         'error': message})
    if job is None:
      self.progress.finish_slide(planned=False)
    else:  # its tiles that were not predicted leave the total
      self.progress.finish_slide(len(job.plan.grid) - job.predicted)

  def _finish(self, job: SlideJob):
    seconds = time.time() - job.t_start
    summary = slide_summary(job, self.rm, self.which, seconds)
    try:
      write_slide_outputs(os.path.join(self.out_dir, job.name), job, self.rm.class_names,
                          summary)
    except OSError as e:
      self._fail(job.plan.path, job.name, f'{job.plan.path}: writing its outputs failed: {e}',
                 job)
      return
    self.results.append({'slide': os.path.abspath(job.plan.path), 'name': job.name,
                         'status': 'ok', 'tiles': len(job.plan.grid),
                         'tiles_per_second': summary['tiles_per_second']})
    self.progress.finish_slide()


# ----------------------------------------------------------------------------- outputs
def slide_summary(job: SlideJob, rm, which: str, seconds: float) -> Dict[str, Any]:
  plan, probs = job.plan, job.probs
  pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
  n = len(pred)
  names = list(rm.class_names)
  return {
      'slide': os.path.abspath(plan.path),
      'vendor': plan.properties.get('openslide.vendor'),
      'dimensions': list(plan.dimensions),
      'magnification': plan.magnification, 'magnification_source': plan.magnification_source,
      'mpp': plan.mpp,
      'model': {'which': which, 'path': rm.path, 'magnification': rm.magnification,
                'factor': rm.factor, 'view': rm.view, 'tile_size': rm.tile_size,
                'image_size': rm.image_size, 'class_names': names},
      'level': plan.level, 'level_downsample': plan.level_downsample,
      'resample': plan.scale, 'read_size': plan.read_size, 'stride': plan.stride,
      'grid': list(plan.grid_shape), 'tiles_in_grid': int(np.prod(plan.grid_shape)),
      'tissue_tiles': n, 'tissue_threshold': plan.threshold,
      'tissue_area_mm2': plan.tissue_area_mm2(),
      'class_counts': {c: int((pred == i).sum()) for i, c in enumerate(names)},
      'class_fractions': {c: float((pred == i).mean()) if n else None
                          for i, c in enumerate(names)},
      'mean_probabilities': {c: float(probs[:, i].mean()) if n else None
                             for i, c in enumerate(names)},
      'seconds': seconds, 'plan_seconds': job.plan_seconds,
      'tiles_per_second': n / seconds if seconds > 0 else None,
  }


def write_slide_outputs(directory: str, job: SlideJob, class_names, summary):
  os.makedirs(directory, exist_ok=True)
  write_tiles_csv(os.path.join(directory, 'tiles.csv'), job.plan, job.probs, class_names)
  save_heatmaps(os.path.join(directory, 'heatmap.png'), job.plan, job.probs, class_names)
  save_overlay(os.path.join(directory, 'overlay.png'), job.plan, job.probs, class_names)
  _write_json(os.path.join(directory, 'summary.json'), summary)


def _write_json(path, obj):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


def write_tiles_csv(path, plan, probs, class_names):
  origins = plan.origins
  d = plan.level_downsample
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['x', 'y', 'level', 'level_x', 'level_y', 'level_size', 'row', 'col', 'tissue']
               + [f'prob_{c}' for c in class_names] + ['prediction'])
    for i, (x, y) in enumerate(origins):
      w.writerow([int(x), int(y), plan.level, int(round(x / d)), int(round(y / d)),
                  plan.read_size, int(plan.grid[i, 0]), int(plan.grid[i, 1]),
                  f'{plan.tissue[i]:.3f}'] + [f'{p:.6f}' for p in probs[i]]
                 + [class_names[int(np.argmax(probs[i]))]])


def probability_grids(plan, probs) -> np.ndarray:
  """(C, rows, cols) probabilities on the tile grid, NaN where no tissue tile was predicted."""
  grids = np.full((probs.shape[1],) + tuple(plan.grid_shape), np.nan, np.float32)
  grids[:, plan.grid[:, 0], plan.grid[:, 1]] = probs.T
  return grids


def _extent(plan):
  """imshow extent (level-0 pixels) of the tile grid: cell (r, c) centred on its tile."""
  s0 = plan.s0
  off = (plan.tile - plan.stride) * s0 / 2
  rows, cols = plan.grid_shape
  return (off, off + cols * plan.stride * s0, off + rows * plan.stride * s0, off)


def _class_map(plan, probs):
  grids = probability_grids(plan, probs)
  valid = ~np.isnan(grids[0])
  cls = np.where(valid, np.nan_to_num(grids, nan=-1).argmax(0), -1).astype(float)
  return np.where(valid, cls, np.nan)


def save_heatmaps(path, plan, probs, class_names):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  c = len(class_names)
  grids = probability_grids(plan, probs)
  fig, axes = plt.subplots(1, c + 1, figsize=(3.2 * (c + 1), 3.4), squeeze=False)
  for i, name in enumerate(class_names):
    ax = axes[0, i]
    im = ax.imshow(grids[i], vmin=0, vmax=1, cmap='magma', interpolation='nearest',
                   extent=_extent(plan))
    ax.set_title(f'P({name})')
  fig.colorbar(im, ax=axes[0, :c].tolist(), shrink=0.8)
  cmap = colors.ListedColormap(CLASS_COLOURS[:c])
  axes[0, c].imshow(_class_map(plan, probs), cmap=cmap, vmin=-0.5, vmax=c - 0.5,
                    interpolation='nearest', extent=_extent(plan))
  axes[0, c].set_title('predicted class')
  _legend(axes[0, c], class_names)
  for ax in axes[0]:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(os.path.basename(plan.path), fontsize=9)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _legend(ax, class_names):
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  ax.legend(handles=[Patch(color=CLASS_COLOURS[i], label=n) for i, n in enumerate(class_names)],
            loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)


def save_overlay(path, plan, probs, class_names):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  c = len(class_names)
  w, h = plan.dimensions
  fig, ax = plt.subplots(figsize=(7, 7 * h / max(w, 1) + 0.5))
  ax.imshow(plan.thumbnail, extent=(0, w, h, 0))
  ax.imshow(_class_map(plan, probs), cmap=colors.ListedColormap(CLASS_COLOURS[:c]),
            vmin=-0.5, vmax=c - 0.5, alpha=0.45, interpolation='nearest', extent=_extent(plan))
  ax.set_xlim(0, w)
  ax.set_ylim(h, 0)
  ax.set_axis_off()
  _legend(ax, class_names)
  ax.set_title(os.path.basename(plan.path), fontsize=9)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


# ----------------------------------------------------------------------------- command line
def run_slides(workdir, which, paths, out_dir, options: Options, process_index=0,
               process_count=1) -> List[Dict[str, Any]]:
  """Loads the run's model and processes this process's share of `paths` into `out_dir`."""
  from camkd_jax import inference  # pylint: disable=g-import-not-at-top
  rm = inference.load_run_model(workdir, which)
  logging.info('%s model of %s: %gx, tile %d px (factor %d, view %s), classes %s', which,
               workdir, rm.magnification, rm.tile_size, rm.factor, rm.view, list(rm.class_names))
  names = output_names(paths)
  mine = my_slides(list(range(len(paths))), process_index, process_count)
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  results = SlideRunner(rm, which, out_dir, options).run([paths[i] for i in mine],
                                                         [names[i] for i in mine])
  seconds = time.time() - t0
  tiles = sum(r.get('tiles', 0) for r in results)
  name = 'run_summary.json' if process_count == 1 else f'run_summary_p{process_index}.json'
  _write_json(os.path.join(out_dir, name), {
      'workdir': os.path.abspath(workdir), 'model': which, 'process': process_index,
      'processes': process_count, 'seconds': seconds, 'tiles': tiles,
      'tiles_per_second': tiles / seconds if seconds > 0 else None, 'slides': results})
  failed = [r for r in results if r['status'] != 'ok']
  logging.info('%d slide(s) done, %d failed, %d tiles in %.1f s (%.1f tiles/s); outputs in %s',
               len(results) - len(failed), len(failed), tiles, seconds,
               tiles / max(seconds, 1e-9), os.path.abspath(out_dir))
  return results


def _quiet_libraries(record):
  """Drops INFO lines of orbax / JAX internals; warnings stay."""
  noisy = any(f'{os.sep}{lib}{os.sep}' in record.pathname for lib in ('orbax', 'jax'))
  return not (noisy and record.levelno < std_logging.WARNING)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more slide files after the flags')
  logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
  from camkd_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(None, coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  options = Options(FLAGS.stride, FLAGS.batch_size, FLAGS.readers, FLAGS.prefetch,
                    FLAGS.slide_magnification, FLAGS.mpp, FLAGS.tissue_fraction,
                    FLAGS.min_saturation)
  try:
    results = run_slides(FLAGS.workdir, FLAGS.model, paths, FLAGS.out, options,
                         jax.process_index(), jax.process_count())
  except (FileNotFoundError, ValueError, ImportError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    return 2
  # Every process waits for the others: none leaves the distributed runtime while others work.
  from camkd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.sync('camkd_jax_slide_done')
  return 1 if any(r['status'] != 'ok' for r in results) else 0


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
