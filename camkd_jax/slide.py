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

This module is the pipeline (Options, SlideRunner, run_slides) and the command (define_flags,
main; the error exit, quiet logging and distributed flags of camkd_jax/cli.py). What is written
per slide and per cohort is camkd_jax/slide_outputs.py, the pictures camkd_jax/slide_plots.py.
"""
import collections
import dataclasses
import os
import time
from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

from camkd_jax import cli
from camkd_jax import gleason
from camkd_jax import slide_outputs
from camkd_jax import wsi

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- options
@dataclasses.dataclass
class Options:
  """What the runner needs besides the model: the flags of the same names (their defaults are
  these), or set in tests. prefetch 0 means 2 x readers; rules holds --min_share, --min_tumour
  and --weighting (camkd_jax/gleason.py)."""
  stride: int = 0
  batch_size: int = 64
  readers: int = 4
  prefetch: int = 0
  slide_magnification: Optional[float] = None
  mpp: Optional[float] = None
  tissue_fraction: float = wsi.TISSUE_FRACTION
  min_saturation: float = wsi.MIN_SATURATION
  progress_every_s: float = 2.0
  patterns: str = ''
  rules: Optional[gleason.Rules] = None
  labels: Optional[str] = None
  overwrite: bool = False
  geojson_gzip: bool = False

  def __post_init__(self):
    self.prefetch = self.prefetch or 2 * self.readers
    self.rules = self.rules or gleason.Rules()


def _defaults(cls) -> Dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(cls)}


def define_flags():
  """The command's flags (defined only when run as a command: importing the module defines
  none, so it coexists with other absl programs). Defaults: Options' and gleason.Rules'."""
  d, r = _defaults(Options), _defaults(gleason.Rules)
  flags.DEFINE_string('workdir', None, 'Finished training run (or one seed_<n> of it).')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which model of the run.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_integer('stride', d['stride'], 'Tile step in pixels at the model magnification '
                       '(0: the tile size, i.e. tiles side by side).')
  flags.DEFINE_integer('batch_size', d['batch_size'], 'Tiles per compiled batch (rounded up to '
                       'the devices).')
  flags.DEFINE_integer('readers', d['readers'], 'Reader threads (one OpenSlide handle each).')
  flags.DEFINE_integer('prefetch', d['prefetch'], 'Batches read ahead (0: 2 x readers).')
  flags.DEFINE_float('slide_magnification', d['slide_magnification'], 'Level-0 magnification of '
                     'every slide (overrides the metadata; needed for slides without it).')
  flags.DEFINE_float('mpp', d['mpp'], 'Level-0 micrometres per pixel of every slide (overrides '
                     'the metadata; magnification = 10 / mpp).')
  flags.DEFINE_float('tissue_fraction', d['tissue_fraction'], 'Minimum tissue fraction of a tile '
                     'to predict it.')
  flags.DEFINE_float('min_saturation', d['min_saturation'], 'Lower bound of the Otsu saturation '
                     'threshold.')
  flags.DEFINE_string('patterns', d['patterns'], 'Gleason pattern of each class, e.g. '
                      '"NC=benign,G3=3,G4=4,G5=5,ART=none" ("": NC/G3/G4/G5 by name; classes '
                      'that are not Gleason patterns and no mapping: no slide score).')
  flags.DEFINE_float('min_share', r['min_share'], 'A pattern counts in the score when it covers '
                     'at least this share of the tumour (noise threshold).')
  flags.DEFINE_float('min_tumour', r['min_tumour'], 'A slide has tumour when its tumour covers '
                     'at least this share of the tissue; else it is benign (noise threshold).')
  flags.DEFINE_enum('weighting', r['weighting'], list(gleason.WEIGHTINGS), 'Pattern areas: each '
                    'tile to its predicted class (count) or split by its probabilities.')
  flags.DEFINE_string('labels', d['labels'], 'CSV/XLSX of slide_id, Gleason_primary, '
                      'Gleason_secondary (SICAPv2\'s wsi_labels.xlsx): slide-level metrics.')
  flags.DEFINE_bool('overwrite', d['overwrite'], 'Redo the slides that slides.csv lists as done.')
  flags.DEFINE_bool('geojson_gzip', d['geojson_gzip'], 'Write tiles.geojson.gz / '
                    'regions.geojson.gz (about 12x smaller; QuPath reads them, not every GeoJSON '
                    'tool does).')
  cli.define_distributed_flags()


def options_from_flags() -> Options:
  """Options of the parsed flags."""
  names = [f.name for f in dataclasses.fields(Options) if f.name in FLAGS]
  return Options(**{n: FLAGS[n].value for n in names},
                 rules=gleason.Rules(FLAGS.min_share, FLAGS.min_tumour, FLAGS.weighting))


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


def log_grade(name: str, g: Dict[str, Any]):
  """The log line of a slide's Gleason score (gleason.slide_score's dict)."""
  grade = (f"Gleason {g['score']}, grade group {g['grade_group']}" if g['grade_group']
           else 'benign')
  logging.info('%s: %s (tumour %.1f %% of tissue; patterns 3/4/5: %.1f / %.1f / %.1f %% of '
               'tumour)', name, grade, g['tumour_percent'],
               *(g['pattern_percent'][p] for p in '345'))


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
    reader = wsi.TileReader(self.opt.readers)
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
        plan = wsi.plan_slide(
            path, self.rm.magnification, self.rm.tile_size, self.stride,
            self.opt.slide_magnification, self.opt.mpp, self.opt.tissue_fraction,
            self.opt.min_saturation)
      except wsi.SlideError as e:
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
    except wsi.SlideError as e:
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
    summary = slide_outputs.slide_summary(job.plan, job.probs, self.rm, self.which, seconds,
                                          job.plan_seconds, self.patterns, self.opt.rules)
    try:
      slide_outputs.write_slide(os.path.join(self.out_dir, job.name), job.plan, job.probs,
                                self.rm.class_names, summary, self.patterns,
                                self.opt.geojson_gzip)
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
      log_grade(job.name, g)
    if self.cohort is not None:
      self.cohort.update(slide_outputs.cohort_row(job.name, job.plan.path, 'ok', '', summary))
    self.progress.finish_slide()


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


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more slide files after the flags')
  cli.quiet_logging()
  with cli.user_errors(cli.COMMAND_ERRORS + (ImportError,)):  # ImportError: no OpenSlide
    cli.initialize_distributed()
    import jax  # pylint: disable=g-import-not-at-top
    results = run_slides(FLAGS.workdir, FLAGS.model, paths, FLAGS.out, options_from_flags(),
                         jax.process_index(), jax.process_count())
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
