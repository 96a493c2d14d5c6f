r"""Whole-slide inference: a finished run's model on every tissue tile of whole-slide images.

  python -m camkd_jax.slide --workdir workdirs/attn_kd_m2.5 [--model student|teacher] \
      --out slides_out [--labels wsi_labels.xlsx] SLIDE.svs [SLIDE2.ndpi ...]

Per slide, in OUT/<slide name>/ (camkd_jax/slide_outputs.py): tiles.csv, tiles.geojson and
regions.geojson (QuPath objects in level-0 pixels), heatmap.png, overlay.png, summary.json (with
the slide's Gleason score and grade group when the classes are Gleason patterns,
camkd_jax/gleason.py). OUT/slides.csv has one row per slide, rewritten as slides finish; a rerun
skips the slides it lists as done unless --overwrite. With --labels (SICAPv2's wsi_labels.xlsx
layout, camkd_jax/slide_labels.py) the grades are compared with the labels in
OUT/slide_metrics.json and the log.
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
import logging as std_logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

from camkd_jax import errors
from camkd_jax import gleason
from camkd_jax import slide_outputs

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
  flags.DEFINE_string('patterns', '', 'Gleason pattern of each class, e.g. '
                      '"NC=benign,G3=3,G4=4,G5=5,ART=none" ("": NC/G3/G4/G5 by name; classes '
                      'that are not Gleason patterns and no mapping: no slide score).')
  flags.DEFINE_float('min_share', 0.05, 'A pattern counts in the score when it covers at least '
                     'this share of the tumour (noise threshold).')
  flags.DEFINE_float('min_tumour', 0.05, 'A slide has tumour when its tumour covers at least '
                     'this share of the tissue; else it is benign (noise threshold).')
  flags.DEFINE_enum('weighting', 'count', ['count', 'probability'], 'Pattern areas: each tile '
                    'to its predicted class (count) or split by its probabilities.')
  flags.DEFINE_string('labels', None, 'CSV/XLSX of slide_id, Gleason_primary, '
                      'Gleason_secondary (SICAPv2\'s wsi_labels.xlsx): slide-level metrics.')
  flags.DEFINE_bool('overwrite', False, 'Redo the slides that slides.csv lists as done.')
  flags.DEFINE_bool('geojson_gzip', False, 'Write tiles.geojson.gz / regions.geojson.gz (about '
                    '12x smaller; QuPath reads them, not every GeoJSON tool does).')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (jax.distributed).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (jax.distributed).')
  flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')


# ----------------------------------------------------------------------------- options
class Options:
  """What the runner needs besides the model (the flags, or set in tests)."""

  def __init__(self, stride=0, batch_size=64, readers=4, prefetch=0, slide_magnification=None,
               mpp=None, tissue_fraction=0.5, min_saturation=0.05, progress_every_s=2.0,
               patterns='', rules=None, labels=None, overwrite=False, geojson_gzip=False):
    self.stride, self.batch_size, self.readers = stride, batch_size, readers
    self.prefetch = prefetch or 2 * readers
    self.slide_magnification, self.mpp = slide_magnification, mpp
    self.tissue_fraction, self.min_saturation = tissue_fraction, min_saturation
    self.progress_every_s = progress_every_s
    self.patterns, self.rules = patterns, rules or gleason.Rules()  # see camkd_jax/gleason.py
    self.labels, self.overwrite, self.geojson_gzip = labels, overwrite, geojson_gzip


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

  def __init__(self, run_model, which: str, out_dir: str, options: Options, predictor=None,
               cohort: Optional[slide_outputs.CohortTable] = None):
    from camkd_jax import inference  # pylint: disable=g-import-not-at-top
    from camkd_jax import wsi  # pylint: disable=g-import-not-at-top
    self.wsi = wsi
    self.rm, self.which, self.out_dir, self.opt = run_model, which, out_dir, options
    self.patterns = gleason.class_patterns(run_model.class_names, options.patterns)
    self.cohort = cohort
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
    if self.cohort is not None:
      self.cohort.update(slide_outputs.cohort_row(name, path, 'failed', message))
    if job is None:
      self.progress.finish_slide(planned=False)
    else:  # its tiles that were not predicted leave the total
      self.progress.finish_slide(len(job.plan.grid) - job.predicted)

  def _finish(self, job: SlideJob):
    seconds = time.time() - job.t_start
    summary = slide_summary(job, self.rm, self.which, seconds, self.patterns, self.opt.rules)
    try:
      write_slide_outputs(os.path.join(self.out_dir, job.name), job, self.rm.class_names,
                          summary, self.patterns, self.opt.geojson_gzip)
    except OSError as e:
      self._fail(job.plan.path, job.name, f'{job.plan.path}: writing its outputs failed: {e}',
                 job)
      return
    self.results.append({'slide': os.path.abspath(job.plan.path), 'name': job.name,
                         'status': 'ok', 'tiles': len(job.plan.grid),
                         'tiles_per_second': summary['tiles_per_second']})
    g = summary.get('gleason')
    if g:
      self.results[-1].update(score=g['score'], grade_group=g['grade_group'])
      grade = (f"Gleason {g['score']}, grade group {g['grade_group']}" if g['grade_group']
               else 'benign')
      logging.info('%s: %s (tumour %.1f %% of tissue; patterns 3/4/5: %.1f / %.1f / %.1f %% of '
                   'tumour)', job.name, grade, g['tumour_percent'],
                   *(g['pattern_percent'][p] for p in '345'))
    if self.cohort is not None:
      self.cohort.update(slide_outputs.cohort_row(job.name, job.plan.path, 'ok', '', summary))
    self.progress.finish_slide()


# ----------------------------------------------------------------------------- outputs
def slide_summary(job: SlideJob, rm, which: str, seconds: float, patterns=None,
                  rules: gleason.Rules = gleason.Rules()) -> Dict[str, Any]:
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
      **slide_gleason(plan, probs, patterns, rules, names),
  }


def tile_area_mm2(plan) -> Optional[float]:
  """Level-0 area of one grid cell (stride x stride model pixels) in mm^2, None without MPP."""
  if not plan.mpp:
    return None
  return float((plan.stride * plan.s0 * plan.mpp) ** 2 / 1e6)


def slide_gleason(plan, probs, patterns, rules, class_names) -> Dict[str, Any]:
  """{'gleason': the slide score} when the classes are Gleason patterns, else {}."""
  if patterns is None:
    return {}
  g = gleason.slide_score(probs, patterns, rules, tile_area_mm2(plan))
  g['class_patterns'] = dict(zip(class_names, patterns))
  return {'gleason': g}


def write_slide_outputs(directory: str, job: SlideJob, class_names, summary, patterns=None,
                        geojson_gzip=False):
  slide_outputs.write_slide(directory, job.plan, job.probs, class_names, summary, patterns,
                            geojson_gzip)


# ----------------------------------------------------------------------------- command line
def run_slides(workdir, which, paths, out_dir, options: Options, process_index=0,
               process_count=1) -> List[Dict[str, Any]]:
  """Loads the run's model and processes this process's share of `paths` into `out_dir`
  (skipping the slides that slides.csv lists as done, unless options.overwrite)."""
  from camkd_jax import inference  # pylint: disable=g-import-not-at-top
  from camkd_jax import slide_labels  # pylint: disable=g-import-not-at-top
  if options.labels:  # a bad labels file fails now, not after the slides
    n = len(slide_labels.read_labels(options.labels))
    logging.info('--labels %s: %d labelled slides', options.labels, n)
  rm = inference.load_run_model(workdir, which)
  logging.info('%s model of %s: %gx, tile %d px (factor %d, view %s), classes %s', which,
               workdir, rm.magnification, rm.tile_size, rm.factor, rm.view, list(rm.class_names))
  patterns = gleason.class_patterns(rm.class_names, options.patterns)
  if patterns is None and options.labels:
    raise ValueError(f'--labels needs a Gleason score, but the classes {list(rm.class_names)} are '
                     'not NC/G3/G4/G5; map them with --patterns, e.g. '
                     '"benign=benign,low=3,high=4"')
  names = output_names(paths)
  mine = my_slides(list(range(len(paths))), process_index, process_count)
  os.makedirs(out_dir, exist_ok=True)
  cohort = slide_outputs.CohortTable(
      slide_outputs.cohort_path(out_dir, process_index, process_count), [names[i] for i in mine])
  done = [i for i in mine if not options.overwrite and cohort.done(names[i], out_dir)]
  todo = [i for i in mine if i not in done]
  if done:
    logging.info('%d slide(s) already done in %s, skipped (--overwrite redoes them): %s',
                 len(done), cohort.path, ', '.join(names[i] for i in done))
  t0 = time.time()
  results = []
  if todo:
    results = SlideRunner(rm, which, out_dir, options, cohort=cohort).run(
        [paths[i] for i in todo], [names[i] for i in todo])
  seconds = time.time() - t0
  results += [{'slide': os.path.abspath(paths[i]), 'name': names[i], 'status': 'ok',
               'skipped': True} for i in done]
  order = {names[i]: k for k, i in enumerate(mine)}
  results.sort(key=lambda r: order[r['name']])
  tiles = sum(r.get('tiles', 0) for r in results)
  name = 'run_summary.json' if process_count == 1 else f'run_summary_p{process_index}.json'
  slide_outputs.write_json(os.path.join(out_dir, name), {
      'workdir': os.path.abspath(workdir), 'model': which, 'process': process_index,
      'processes': process_count, 'seconds': seconds, 'tiles': tiles,
      'tiles_per_second': tiles / seconds if seconds > 0 else None, 'slides': results})
  failed = [r for r in results if r['status'] != 'ok']
  logging.info('%d slide(s) done, %d failed, %d tiles in %.1f s (%.1f tiles/s); outputs in %s',
               len(results) - len(failed), len(failed), tiles, seconds,
               tiles / max(seconds, 1e-9), os.path.abspath(out_dir))
  if process_count == 1:
    slide_outputs.finish_cohort(out_dir, 1, options.labels)
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
  try:
    rules = gleason.Rules(FLAGS.min_share, FLAGS.min_tumour, FLAGS.weighting)
    options = Options(FLAGS.stride, FLAGS.batch_size, FLAGS.readers, FLAGS.prefetch,
                      FLAGS.slide_magnification, FLAGS.mpp, FLAGS.tissue_fraction,
                      FLAGS.min_saturation, patterns=FLAGS.patterns, rules=rules,
                      labels=FLAGS.labels, overwrite=FLAGS.overwrite,
                      geojson_gzip=FLAGS.geojson_gzip)
    results = run_slides(FLAGS.workdir, FLAGS.model, paths, FLAGS.out, options,
                         jax.process_index(), jax.process_count())
  except (FileNotFoundError, ValueError, ImportError, errors.UserError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    return 2
  # Every process waits for the others: none leaves the distributed runtime while others work.
  from camkd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.sync('camkd_jax_slide_done')
  if jax.process_count() > 1 and jax.process_index() == 0:
    slide_outputs.finish_cohort(FLAGS.out, jax.process_count(), FLAGS.labels)
  return 1 if any(r['status'] != 'ok' for r in results) else 0


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
