"""What a run leaves for people: TensorBoard scalars, the results tables (per seed and mean ±
sample std over seeds), results.md, the console summary and the Grad-CAM figure.

TensorBoard scalars go through clu's metric writers (process 0 only).
"""
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from camkd_jax import metrics as metrics_lib


# ----------------------------------------------------------------------------- TensorBoard events
def make_writer(logdir: str, is_main: bool):
  """clu metric writer: TensorBoard scalars in `logdir` on process 0, a no-op elsewhere."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  if not is_main:
    return metric_writers.MultiWriter([])
  return metric_writers.SummaryWriter(logdir)


# ----------------------------------------------------------------------------- tables
def _fmt(x, digits=4):
  return '-' if x is None else f'{x:.{digits}f}'


def results_rows(runs: Mapping[str, Mapping]) -> List[List[str]]:
  """Rows (model, magnification, val bal.acc, val kappa, test bal.acc, test kappa, epoch)."""
  rows = []
  for label, r in runs.items():
    mag = f"{r.get('magnification', 10.0):g}x"
    rows.append([label, mag, _fmt(r['val'].get('balanced_accuracy')), _fmt(r['val'].get('kappa')),
                 _fmt(r['test'].get('balanced_accuracy')), _fmt(r['test'].get('kappa')),
                 str(r.get('epoch', '-'))])
  return rows


def mean_std_cell(mean: float, std: float, digits: int = 4) -> str:
  """'0.8123 ± 0.0456': a mean over seeds and its sample std."""
  return f'{mean:.{digits}f} ± {std:.{digits}f}'


def summary_rows(summary: Mapping[str, Mapping], magnifications: Mapping[str, float]):
  """Mean +- sample std rows from metrics.json's `summary`."""
  rows = []
  for model, s in summary.items():
    cell = lambda split, key: (mean_std_cell(s[split][key + '_mean'], s[split][key + '_std'])
                               if key + '_mean' in s.get(split, {}) else '-')
    rows.append([f'{model} (mean ± sample std)', f'{magnifications.get(model, 10.0):g}x',
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


def results_markdown(out: Dict[str, Any]) -> Tuple[str, List[List[str]]]:
  """(markdown table, rows) of metrics.json's `out`: a row per model and seed, then the means."""
  rows = []
  runs = out.get('runs') or {str(out['seeds'][0]): out}
  for seed, r in runs.items():
    labelled = {f'{m} (seed {seed})': r[m] for m in ('teacher', 'student') if m in r}
    rows += results_rows(labelled)
  if len(runs) > 1:
    mags = {'student': out['student']['magnification']} if 'student' in out else {}
    rows += summary_rows(out['summary'], mags)
  return markdown_table(rows), rows


def write_results(out: Dict[str, Any], workdir: str):
  """results.md and the console summary of metrics.json's `out` (call on process 0 only)."""
  table, rows = results_markdown(out)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('# Results\n\nMetrics of the checkpoint selected on validation '
            'kappa (test reported at that epoch).\n\n' + table
            + ''.join(f'\n**Data warning:** {n}\n' for n in out.get('data_notes', ())))
  where = ('seed_*/: figures/gradcam.png, tensorboard/, checkpoints/, teacher/, student/'
           if 'runs' in out else
           'figures/gradcam.png, tensorboard/, checkpoints/, teacher/, student/')
  print('\n' + text_table(rows) + f'\n\noutputs in {os.path.abspath(workdir)}: '
        f'metrics.json, results.md, {where}\n', flush=True)


# ----------------------------------------------------------------------------- Grad-CAM figure
def save_gradcam_figure(path: str, images: np.ndarray, labels: np.ndarray,
                        class_names: Sequence[str], columns: Sequence[Mapping]):
  """PNG with one row per image: the image, then for each model its input view and Grad-CAM map.

  images: uint8 (N, H, W, 3); columns: dicts with 'title', 'view' (N, H, W, 3) in [0, 1],
  'maps' (N, h, w) Grad-CAM of the true class, 'probs' (N, C).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n = len(images)
  ncols = 1 + 2 * len(columns)
  fig, axes = plt.subplots(n, ncols, figsize=(2.0 * ncols, 2.1 * n), squeeze=False)
  size = images.shape[1]
  for i in range(n):
    label = int(labels[i])
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(f'true {class_names[label]}', fontsize=8)
    for j, col in enumerate(columns):
      view_ax, cam_ax = axes[i, 1 + 2 * j], axes[i, 2 + 2 * j]
      view_ax.imshow(np.clip(col['view'][i], 0, 1))
      view_ax.set_title(f"{col['title']} input", fontsize=8)
      cam = np.asarray(col['maps'][i], np.float64)
      span = cam.max() - cam.min()
      cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
      cam_ax.imshow(images[i])
      cam_ax.imshow(cam, cmap='jet', alpha=0.5, interpolation='bilinear',
                    extent=(-0.5, size - 0.5, size - 0.5, -0.5))
      cam_ax.set_title(f"{col['title']} CAM p={float(col['probs'][i][label]):.2f}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def format_duration(seconds: Optional[float]) -> str:
  if seconds is None or not np.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def format_losses(losses: Dict[str, float]) -> str:
  """'loss 0.812 (ce 0.610, fm 0.120)' from {'loss/total': .., 'loss/ce': ..}."""
  terms = [(k.split('/', 1)[1], v) for k, v in losses.items()
           if k.startswith('loss/') and k != 'loss/total']
  total = losses.get('loss/total', float('nan'))
  inner = ', '.join(f'{k} {v:.3f}' for k, v in terms)
  return f'loss {total:.4f}' + (f' ({inner})' if len(terms) > 1 else '')
