"""What a run leaves for people: TensorBoard scalars, the results tables (per seed and mean ±
sample std over seeds), results.md, the console summary and the Grad-CAM figure.

TensorBoard scalars go through clu's metric writers (process 0 only).
"""
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from camkd_jax import metrics as metrics_lib
from camkd_jax import runs as runs_lib


# ----------------------------------------------------------------------------- TensorBoard events
def make_writer(logdir: str, is_main: bool, resume: bool = False):
  """clu metric writer: TensorBoard scalars in `logdir` on process 0, a no-op elsewhere.

  resume: steps that `logdir` already holds (written before an interruption, replayed after
  the resume with the same values) are not written again, so TensorBoard shows no duplicate
  points.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  if not is_main:
    return metric_writers.MultiWriter([])
  last = last_written_step(logdir) if resume else None
  from camkd_jax import errors  # pylint: disable=g-import-not-at-top
  with errors.disk_writes(logdir, 'TensorBoard events'):
    writer = metric_writers.SummaryWriter(logdir)
  return SkipWrittenSteps(writer, -1 if last is None else last, logdir)


def last_written_step(logdir: str) -> Optional[int]:
  """The largest step of any event in `logdir`'s event files (None if there are none). A record
  cut short by a kill ends the file's reading; the records before it count."""
  files = [os.path.join(logdir, f) for f in sorted(os.listdir(logdir))
           if 'tfevents' in f] if os.path.isdir(logdir) else []
  if not files:
    return None
  from camkd_jax import quiet_tf  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  last = None
  for path in files:
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        if event.summary.value:
          last = event.step if last is None else max(last, event.step)
    except tf.errors.DataLossError:
      pass
  return last


class SkipWrittenSteps:
  """A metric writer that drops scalars of steps <= `last` (already in the event files); a full
  or read-only disk ends the run with errors.OutputError naming `logdir`."""

  def __init__(self, writer, last: int, logdir: str = ''):
    self.writer, self.last, self.logdir = writer, int(last), logdir

  def _guard(self):
    from camkd_jax import errors  # pylint: disable=g-import-not-at-top
    return errors.disk_writes(self.logdir, 'TensorBoard events')

  def write_scalars(self, step, scalars):
    if int(step) > self.last:
      with self._guard():
        self.writer.write_scalars(step, scalars)

  def flush(self):
    with self._guard():
      self.writer.flush()

  def close(self):
    with self._guard():
      self.writer.close()


# ----------------------------------------------------------------------------- tables
def _fmt(x, digits=4):
  return '-' if x is None else f'{x:.{digits}f}'


def results_rows(runs: Mapping[str, Mapping], base_magnification: float) -> List[List[str]]:
  """Rows (model, magnification, val bal.acc, val kappa, test bal.acc, test kappa, epoch); a run
  without its own magnification (the teacher) is at base_magnification."""
  rows = []
  for label, r in runs.items():
    mag = f"{r.get('magnification', base_magnification):g}x"
    rows.append([label, mag, _fmt(r['val'].get('balanced_accuracy')), _fmt(r['val'].get('kappa')),
                 _fmt(r['test'].get('balanced_accuracy')), _fmt(r['test'].get('kappa')),
                 str(r.get('epoch', '-'))])
  return rows


def mean_std_cell(mean: float, std: float, digits: int = 4) -> str:
  """'0.8123 ± 0.0456': a mean over seeds and its sample std."""
  return f'{mean:.{digits}f} ± {std:.{digits}f}'


def summary_rows(summary: Mapping[str, Mapping], magnifications: Mapping[str, float]):
  """Mean +- sample std rows from metrics.json's `summary` (magnifications: of each model)."""
  rows = []
  for model, s in summary.items():
    cell = lambda split, key: (mean_std_cell(s[split][key + '_mean'], s[split][key + '_std'])
                               if key + '_mean' in s.get(split, {}) else '-')
    rows.append([f'{model} (mean ± sample std)', f'{magnifications[model]:g}x',
                 cell('val', 'balanced_accuracy'), cell('val', 'kappa'),
                 cell('test', 'balanced_accuracy'), cell('test', 'kappa'), '-'])
  return rows


HEADER = ['model', 'magnification', 'val bal. acc.', 'val kappa', 'test bal. acc.',
          'test kappa', 'best epoch']


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def text_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
  """Fixed-width table for the console."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  fmt = lambda r: '  '.join(str(c).ljust(w) for c, w in zip(r, widths))
  return '\n'.join([fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows])


# ----------------------------------------------------------------------------- run reports
def summarize_runs(results: List[Dict]) -> Dict[str, Any]:
  """Mean and sample std over seeds of each model's val/test metrics."""
  out = {}
  for model in ('teacher', 'student'):
    runs = [r[model] for r in results if model in r]
    if runs:
      out[model] = metrics_lib.summarize(runs)
  return out


def combine_seeds(runs: Dict[int, Dict]) -> Dict[str, Any]:
  """metrics.json of the whole run: one seed as is; several seeds with their means and `runs`."""
  results = list(runs.values())
  if len(results) == 1:
    return results[0]
  out = {'seeds': [int(s) for s in runs], 'summary': summarize_runs(results),
         'runs': {str(s): r for s, r in runs.items()}}
  if results[0].get('data_notes'):  # the same data for every seed
    out['data_notes'] = results[0]['data_notes']
  for model in ('teacher', 'student'):
    if model in out['summary']:
      s = out['summary'][model]
      out[model] = {split: {k[:-5]: v for k, v in s[split].items() if k.endswith('_mean')}
                    for split in ('val', 'test')}
      out[model]['epoch'] = [r[model]['epoch'] for r in results]
      if model == 'student':
        out[model].update(magnification=results[0]['student']['magnification'],
                          factor=results[0]['student']['factor'])
  return out


def results_markdown(out: Dict[str, Any],
                     base_magnification: float) -> Tuple[str, List[List[str]]]:
  """(markdown table, rows) of metrics.json's `out`: a row per model and seed, then the means.
  base_magnification: the run's config.base_magnification, the teacher's."""
  rows = []
  runs = out.get('runs') or {str(out['seeds'][0]): out}
  for seed, r in runs.items():
    labelled = {f'{m} (seed {seed})': r[m] for m in ('teacher', 'student') if m in r}
    rows += results_rows(labelled, base_magnification)
  if len(runs) > 1:
    mags = {'teacher': base_magnification}
    if 'student' in out:
      mags['student'] = out['student']['magnification']
    rows += summary_rows(out['summary'], mags)
  return markdown_table(rows), rows


def existing_outputs(workdir: str) -> List[str]:
  """The outputs (runs_lib.OUTPUTS) present in `workdir` ('seed_*/x' when only the seed runs
  hold x)."""
  seeds = runs_lib.seed_dirs(workdir)
  out = []
  for name in runs_lib.OUTPUTS:
    if os.path.exists(os.path.join(workdir, name)):
      out.append(name)
    elif seeds and all(os.path.exists(os.path.join(d, name)) for d in seeds):
      out.append(f'seed_*/{name}')
  return out


SLIDE_HEADER = ['model', 'val slides', 'val grade-group kappa', 'val grade-group acc.',
                'test slides', 'test grade-group kappa', 'test grade-group acc.']


def slide_level_markdown(out: Dict[str, Any]) -> str:
  """The slide-level section of results.md ('' when no run has slide-level metrics)."""
  rows = []
  runs = out.get('runs') or {str(out['seeds'][0]): out}
  for seed, r in runs.items():
    for model in ('teacher', 'student'):
      cells = [(r.get(model) or {}).get(s, {}).get('slide_level') for s in ('val', 'test')]
      if any(cells):
        rows.append([f'{model} (seed {seed})'] + [
            x for c in cells for x in ((str(c['num_slides']), _fmt(c['kappa']),
                                        _fmt(c['accuracy'])) if c else ('-', '-', '-'))])
  if not rows:
    return ''
  return ('\n## Slide level\n\nThe ISUP grade group of each slide from the selected checkpoint\'s '
          'patch predictions (camkd_jax/gleason.py rules) against the slide labels: quadratic '
          'kappa and accuracy over the labelled slides.\n\n'
          + markdown_table(rows, SLIDE_HEADER))


def write_results(out: Dict[str, Any], workdir: str, selection_metric: str,
                  base_magnification: float):
  """results.md and the console summary of metrics.json's `out` (call on process 0 only).
  selection_metric, base_magnification: the run's config.selection.metric and
  config.base_magnification (the teacher's magnification)."""
  from camkd_jax import errors  # pylint: disable=g-import-not-at-top
  table, rows = results_markdown(out, base_magnification)
  text = ('# Results\n\nMetrics of the checkpoint selected on validation '
          f'{selection_metric.replace("_", " ")} (config.selection.metric={selection_metric}; '
          'test reported at that epoch).\n\n' + table + slide_level_markdown(out)
          + ''.join(f'\n**Data warning:** {n}\n' for n in out.get('data_notes', ())))
  path = os.path.join(workdir, 'results.md')
  with errors.disk_writes(path, 'results.md'):
    runs_lib.atomic_write(path, lambda f: f.write(text))
  print('\n' + text_table(rows) + f'\n\noutputs in {os.path.abspath(workdir)}: '
        f'{", ".join(existing_outputs(workdir))}\n', flush=True)


# ----------------------------------------------------------------------------- Grad-CAM figure
def _normalised(cam) -> np.ndarray:
  cam = np.asarray(cam, np.float64)
  span = cam.max() - cam.min()
  return (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)


def _overlay(ax, image, cam, title):
  """`cam` (any resolution) stretched over `image` (its own pixel grid)."""
  h, w = image.shape[:2]
  ax.imshow(image)
  ax.imshow(_normalised(cam), cmap='jet', alpha=0.5, interpolation='bilinear',
            extent=(-0.5, w - 0.5, h - 0.5, -0.5))
  ax.set_title(title, fontsize=8)


def figure_panels(columns: Sequence[Mapping]) -> List[Tuple[int, str]]:
  """(column index, panel kind) per figure column after the image: 'view' (the model's input)
  and 'cam_view' (its map over that input) when col['on_view'], then 'cam' (its map over the
  full-resolution image)."""
  panels = []
  for j, col in enumerate(columns):
    if col.get('on_view'):  # the teacher's input is the image itself: no panel of its own
      panels += [(j, 'view'), (j, 'cam_view')]
    panels.append((j, 'cam'))
  return panels


def save_gradcam_figure(path: str, images: np.ndarray, labels: np.ndarray,
                        class_names: Sequence[str], columns: Sequence[Mapping]):
  """PNG with one row per image: the image, then for each model its input view and Grad-CAM map
  over the full-resolution image; a model with `on_view` (a low-magnification student) also has
  its map drawn over the input it saw.

  images: uint8 (N, H, W, 3); columns: dicts with 'title', 'view' (N, h, w, 3) in [0, 1],
  'maps' (N, h', w') Grad-CAM of the true class, 'probs' (N, C), optional 'on_view'.
  The PNG is written to a temporary file and renamed: an earlier figure is never half replaced.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n = len(images)
  panels = figure_panels(columns)
  fig, axes = plt.subplots(n, 1 + len(panels), figsize=(2.0 * (1 + len(panels)), 2.1 * n),
                           squeeze=False)
  for i in range(n):
    label = int(labels[i])
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(f'true {class_names[label]}', fontsize=8)
    for k, (j, kind) in enumerate(panels):
      col, ax = columns[j], axes[i, 1 + k]
      view = np.clip(col['view'][i], 0, 1)
      p = float(col['probs'][i][label])
      if kind == 'view':
        ax.imshow(view)
        ax.set_title(f"{col['title']} input {view.shape[0]}px", fontsize=8)
      elif kind == 'cam_view':
        _overlay(ax, view, col['maps'][i], f"{col['title']} CAM on its input")
      else:
        _overlay(ax, images[i], col['maps'][i], f"{col['title']} CAM p={p:.2f}")
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  from camkd_jax import errors  # pylint: disable=g-import-not-at-top
  with errors.disk_writes(path, 'the Grad-CAM figure'):
    runs_lib.atomic_write(path, lambda f: fig.savefig(f, dpi=80, format='png'), mode='wb')
  plt.close(fig)
  return path


def format_duration(seconds: Optional[float]) -> str:
  if seconds is None or not np.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def format_losses(losses: Dict[str, float], weights: Optional[Mapping[str, float]] = None) -> str:
  """'loss 0.812 (ce 0.610, fm 0.120)' from {'loss/total': .., 'loss/ce': ..}; with the loss
  weights, the total is shown as their sum over the raw terms:
  'loss 0.8120 = 1*ce 0.6100 + 0.1*fm 1.2000 (weight*raw term)'."""
  terms = [(k.split('/', 1)[1], v) for k, v in losses.items()
           if k.startswith('loss/') and k != 'loss/total']
  total = losses.get('loss/total', float('nan'))
  if weights is not None:
    inner = ' + '.join(f'{weights.get(k, 0.0):g}*{k} {v:.4f}' for k, v in terms)
    return f'loss {total:.4f} = {inner} (weight*raw term)' if inner else f'loss {total:.4f}'
  inner = ', '.join(f'{k} {v:.3f}' for k, v in terms)
  return f'loss {total:.4f}' + (f' ({inner})' if len(terms) > 1 else '')
