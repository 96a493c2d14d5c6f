"""The study's report, built from its cells' results (metrics.json contents or store records).

A page (`write_report`): the command that made it, the mean +- std table over seeds, each seed's
values, test kappa against magnification; with `paired`, the differences to CE within a seed (95 %
CIs by bootstrap and paired t, wins, the share of the teacher - CE gap closed, the seed count for a
target CI width), validation kappa after every epoch, and their figures; its intro and notes may
quote those numbers as `{{...}}` placeholders filled from the same results (`fill_placeholders`),
and the paired numbers are kept beside the page as `<page>_paired.json`. Pure NumPy and matplotlib
over camkd_jax.metrics / reporting: no JAX, no TensorFlow.

A result set is {cell: metrics}, a cell (method, magnification, seed), a teacher
('teacher', None, seed); `cell_key` names the report of the cell's own model in its metrics.
"""
import json
import os
import re
import textwrap

import numpy as np

from camkd_jax import errors
from camkd_jax import metrics as metrics_lib
from camkd_jax import reporting
from camkd_jax import runs

METHOD_LABELS = {'ce': 'CE only', 'kd': 'KD', 'fm': 'FM', 'at': 'AT+', 'fm_at': 'FM + AT+',
                 'fm_at_tinit': 'FM + AT+ (teacher init)', 'ce_native': 'CE only (native)',
                 'fm_at_native': 'FM + AT+ (native)'}
SPLITS = ('val', 'test')
METRICS = ('balanced_accuracy', 'kappa')


def cell_key(cell):
  """The cell's own report in its metrics.json: 'teacher' for a teacher cell, else 'student'."""
  return 'teacher' if cell[0] == 'teacher' else 'student'


# ----------------------------------------------------------------------------- over seeds
def _mean_std_n(values):
  """(mean, sample std, n) of per-seed values."""
  ms = metrics_lib.mean_std(values)
  return ms['mean'], ms['std'], len(values)


def aggregate(results):
  """{(method, mag): {split: {metric: (mean, std, n)}}}, teacher under ('teacher', None)."""
  groups = {}
  for cell, out in results.items():
    groups.setdefault(cell[:2], []).append(out[cell_key(cell)])
  table = {}
  for group, reports in groups.items():
    table[group] = {split: {m: _mean_std_n([r[split][m] for r in reports]) for m in METRICS}
                    for split in SPLITS}
  return table


def cell_seconds(cell, out):
  """(seconds, whole) a cell took: its stage's train_wall_time_s (every run of the cell, resumed
  and continued ones included; whole=True) or, in records without it, the wall_time_s of the
  cell's last run (whole=False). (None, False) when neither is recorded."""
  stage = out.get(cell_key(cell))
  seconds = stage.get('train_wall_time_s') if isinstance(stage, dict) else None
  if seconds:
    return float(seconds), True
  return out.get('wall_time_s') or None, False


def wall_text(results, wall):
  """The sweep's cost: cells trained in this invocation, and the recorded cells' own times."""
  times = [cell_seconds(cell, out) for cell, out in results.items() if isinstance(out, dict)]
  times = [t for t in times if t[0]]
  last_only = sum(not whole for _, whole in times)
  if not last_only:
    source = 'their records\' train_wall_time_s: every run of a cell'
  elif last_only == len(times):
    source = ('their records\' wall_time_s: the last run of each cell, so a resumed or '
              'continued cell counts short')
  else:
    source = (f'train_wall_time_s where recorded: every run of a cell; {last_only} older '
              'record(s) hold only the wall_time_s of their last run, so a resumed or continued '
              'one counts short')
  recorded = (f'the {len(times)} cells in this report took {sum(t for t, _ in times) / 3600:.1f} h '
              f'of training in all ({source})' if times else
              'no cell here records its training time')
  if wall >= 60:
    return f'Wall time of this invocation: {wall / 60:.1f} min; {recorded}.'
  return f'No cell was trained by this invocation (all came from records); {recorded}.'


def markdown(table, wall, mags, methods, results, *, title, command, seeds, labels):
  """The page's head: title, the command that made it, the cost, the mean +- std table.

  `seeds` is the seed list as given on the command line, `labels` (teacher label, selection
  text), e.g. ('10x', 'validation kappa')."""
  teacher_label, selection = labels
  # One seed has no spread: its value alone (a '± 0.000' would claim one).
  pm = lambda x: reporting.mean_std_cell(x[0], x[1], 3) if x[2] > 1 else f'{x[0]:.3f}'
  cells = lambda r: [pm(r[split][m]) for split in SPLITS for m in METRICS] + [
      str(r['val']['kappa'][2])]
  rows = []
  if ('teacher', None) in table:
    rows.append(['teacher', teacher_label] + cells(table[('teacher', None)]))
  rows += [[METHOD_LABELS[method], f'{mag:g}x'] + cells(table[(method, mag)])
           for mag in mags for method in methods if (method, mag) in table]
  header = ['method', 'magnification', 'val bal. acc.', 'val kappa', 'test bal. acc.',
            'test kappa', 'n']
  return (f'# {title}\n\n'
          f'Produced by `{command.strip()}` (mean ± sample std over seeds {seeds}; '
          f'the metrics of the checkpoint selected on {selection}). '
          f'{wall_text(results, wall)}\n\n'
          + reporting.markdown_table(rows, header))


def per_seed_markdown(results, mags, methods, seeds, teacher_label='10x'):
  """Test kappa (val kappa) of every cell, one column per seed: the spread behind each mean."""
  def cell(out):
    return '-' if out is None else f'{out["test"]["kappa"]:.3f} ({out["val"]["kappa"]:.3f})'
  teachers = [(results.get(('teacher', None, s)) or {}).get('teacher') for s in seeds]
  rows = [['teacher', teacher_label] + [cell(t) for t in teachers]]
  for mag in mags:
    for method in methods:
      if not any((method, mag, s) in results for s in seeds):
        continue
      rows.append([METHOD_LABELS[method], f'{mag:g}x'] + [
          cell((results.get((method, mag, s)) or {}).get('student')) for s in seeds])
  header = ['method', 'magnification'] + [f'seed {s}' for s in seeds]
  return ('\nPer seed, test kappa (validation kappa in brackets) of the selected checkpoint:\n\n'
          + reporting.markdown_table(rows, header))


def completeness(results, mags, methods, seeds):
  """'' when every cell of the grid is finished, else a PARTIAL line naming what is missing."""
  grid = [c for s in seeds
          for c in [('teacher', None, s)] + [(m, g, s) for g in mags for m in methods]]
  missing = [c for c in grid if c not in results]
  if not missing:
    return ''
  return (f'**PARTIAL**: {len(grid) - len(missing)} of {len(grid)} cells of the grid are '
          f'finished; {len(missing)} still to run (the command without --report_only resumes '
          'them).\n\n')


def plot(table, mags, methods, path, teacher_label='10x'):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  xs = sorted(mags)
  for i, method in enumerate(methods):
    pts = [(m, table[(method, m)]['test']['kappa']) for m in xs if (method, m) in table]
    if not pts:
      continue
    # Methods side by side around each magnification, so that error bars do not hide each other.
    dodge = 2.0 ** (0.06 * (i - (len(methods) - 1) / 2))
    x = [p[0] * dodge for p in pts]
    y = np.array([p[1][0] for p in pts])
    e = np.array([p[1][1] for p in pts])
    ax.errorbar(x, y, yerr=e, marker='o', capsize=3, label=METHOD_LABELS[method])
  if ('teacher', None) in table:  # a partial grid may not have one yet
    t = table[('teacher', None)]['test']['kappa']
    ax.axhline(t[0], color='k', ls='--', label=f'teacher {teacher_label} ({t[0]:.3f})')
  ax.set_xscale('log', base=2)
  ax.set_xlim(min(xs) / 1.4, max(xs) * 1.4)
  ax.set_xticks(xs)
  ax.set_xticklabels([f'{m:g}x' for m in xs])
  ax.set_xlabel('student magnification')
  ax.set_ylabel('test quadratic kappa')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- paired report
BASELINE = 'ce'
PAIRED_METRIC = ('test', 'kappa')  # the per-seed value compared (split, metric)


def select_within(report, epochs, min_delta):
  """`report` (a stage's metrics: history of every epoch) as if the stage had stopped after
  `epochs` epochs: the selection rule of the run (metrics_lib.improved on validation kappa) over
  the first `epochs` entries. A run shorter than that is returned as it is."""
  history = report.get('history') or []
  if len(history) <= epochs:
    return report
  best = None
  for entry in history[:epochs]:
    if metrics_lib.improved(entry['val']['kappa'], None if best is None else best['val']['kappa'],
                            min_delta):
      best = entry
  return {**report, 'val': best['val'], 'test': best['test'], 'epoch': best['epoch'],
          'step': best['step'], 'train': best['train'], 'history': history[:epochs]}


def _value(metrics, key='student'):
  split, metric = PAIRED_METRIC
  return float(metrics[key][split][metric])


def paired_table(results, fingerprints, mags, methods, seeds):
  """{(method, mag): {'seeds', 'method', 'baseline', 'teacher'}} over the seeds where the method,
  CE and the teacher are all finished and the method and CE distilled from the same teacher; and
  the (method, mag, seed) cells left out because their teacher differs from CE's."""
  pairs, mismatched = {}, []
  for mag in mags:
    for method in methods:
      if method == BASELINE:
        continue
      rows = {'seeds': [], 'method': [], 'baseline': [], 'teacher': []}
      for seed in seeds:
        m, b, t = (method, mag, seed), (BASELINE, mag, seed), ('teacher', None, seed)
        if not all(c in results for c in (m, b, t)):
          continue
        if fingerprints.get(m) != fingerprints.get(b):
          mismatched.append(m)
          continue
        rows['seeds'].append(seed)
        rows['method'].append(_value(results[m]))
        rows['baseline'].append(_value(results[b]))
        rows['teacher'].append(_value(results[t], 'teacher'))
      if rows['seeds']:
        pairs[(method, mag)] = rows
  return pairs, mismatched


TARGET_HALF_WIDTH = 0.03  # the 95 % CI half-width the study plans its seed count for


def difference_stats(rows, resamples=10000, seed=0):
  """The summary of one method's per-seed differences method - CE (rows: see paired_table)."""
  d = np.subtract(rows['method'], rows['baseline'])
  t = metrics_lib.paired_t(d)
  boot = metrics_lib.bootstrap_ci(d, resamples=resamples, seed=seed)
  sd = lambda v: float(np.std(v, ddof=1)) if len(d) > 1 else float('nan')
  return {'n': len(d), 'seeds': list(rows['seeds']), 'diffs': d.tolist(), 't': t,
          'bootstrap': boot, 'wins': metrics_lib.wins(d),
          'gap_closed': metrics_lib.gap_closed(rows['method'], rows['baseline'], rows['teacher']),
          'gap': float(np.subtract(rows['teacher'], rows['baseline']).mean()),
          'baseline_mean': float(np.mean(rows['baseline'])), 'baseline_sd': sd(rows['baseline']),
          'teacher_mean': float(np.mean(rows['teacher'])), 'teacher_sd': sd(rows['teacher']),
          'seeds_for_target': metrics_lib.seeds_for_half_width(t['std'], TARGET_HALF_WIDTH)}


def paired_stats(results, fingerprints, mags, methods, seeds):
  """({(method, mag): difference_stats of its pairs}, the cells left out): see paired_table."""
  pairs, mismatched = paired_table(results, fingerprints, mags, methods, seeds)
  return {key: difference_stats(rows) for key, rows in pairs.items()}, mismatched


def _fmt(x, spec='+.3f', suffix=''):
  """`x` formatted with `spec` (and `suffix`), or 'n/a' when it is not finite (too few seeds)."""
  return 'n/a' if not np.isfinite(x) else f'{x:{spec}}{suffix}'


def _interval(lo, hi):
  return 'n/a' if not np.isfinite(lo) else f'[{lo:+.3f}, {hi:+.3f}]'


def paired_markdown(results, fingerprints, mags, methods, seeds):
  """The paired sections: per-seed rows, the difference table, validation kappa per epoch."""
  stats, mismatched = paired_stats(results, fingerprints, mags, methods, seeds)
  split, metric = PAIRED_METRIC
  out = [f'\n## Paired comparison: {split} {metric}, method - CE within a seed\n',
         'Every method of a seed distils from the same teacher checkpoint (its fingerprint is '
         'checked) with the same data order and augmentation stream, so the difference within a '
         'seed cancels the teacher and the data. CI: 95 % percentile bootstrap over seeds '
         '(10,000 resamples, generator seed 0) and paired t (t distribution with n - 1 degrees '
         'of freedom). Share of the gap closed: mean(method - CE) / mean(teacher - CE). sd: the '
         'sample std of the per-seed differences; seeds for +-0.03: the fewest seeds whose '
         'paired-t half-width, t_{n-1} sd / sqrt(n), is at most 0.03 at that sd (the planning '
         'rule for the seed count; the sd of a few seeds is itself uncertain).\n']
  if mismatched:
    out.append('Left out (distilled from another teacher than CE of the same seed): '
               + ', '.join(f'{METHOD_LABELS[m]} {g:g}x seed {s}' for m, g, s in mismatched)
               + '.\n')
  rows = []
  for (method, mag), st in stats.items():
    t, b, w = st['t'], st['bootstrap'], st['wins']
    rows.append([f'{METHOD_LABELS[method]} - CE', f'{mag:g}x', str(st['n']), _fmt(t['mean']),
                 _interval(b['lo'], b['hi']), _interval(t['lo'], t['hi']), _fmt(t['p'], '.3f'),
                 f'{w["wins"]} / {st["n"]}', f'{st["baseline_mean"]:.3f}',
                 f'{st["teacher_mean"]:.3f}', _fmt(100 * st['gap_closed'], '.0f', ' %'),
                 _fmt(t['std'], '.3f'), _fmt(st['seeds_for_target'], '.0f')])
  if rows:
    out.append(reporting.markdown_table(rows, [
        'difference', 'magnification', 'seeds', 'mean', '95 % CI (bootstrap)', '95 % CI (t)',
        'p (t)', 'wins', 'CE mean', 'teacher mean', 'gap closed', 'sd',
        f'seeds for +-{TARGET_HALF_WIDTH:g}']))
  else:
    out.append('No seed has both CE and another method finished yet.\n')
  # Per-seed rows: every method's value and selected epoch, the differences.
  for mag in mags:
    have = [s for s in seeds if (BASELINE, mag, s) in results]
    if not have:
      continue
    others = [m for m in methods if m != BASELINE]
    header = ['seed', 'teacher'] + [METHOD_LABELS[m] for m in methods] + [
        f'{METHOD_LABELS[m]} - CE' for m in others]
    body = []
    for s in seeds:
      t = results.get(('teacher', None, s))
      cells = [str(s), '-' if t is None else f'{_value(t, "teacher"):.3f}']
      for m in methods:
        r = results.get((m, mag, s))
        cells.append('-' if r is None else
                     f'{_value(r):.3f} (e{r["student"]["epoch"]})')
      for m in others:
        ok = (m, mag) in stats and s in stats[(m, mag)]['seeds']
        cells.append(_fmt(_value(results[(m, mag, s)]) - _value(results[(BASELINE, mag, s)]))
                     if ok else '-')
      if any(c != '-' for c in cells[2:]):
        body.append(cells)
    out.append(f'\nPer seed at {mag:g}x: {split} {metric} of the selected checkpoint (its epoch '
               'in brackets) and the differences to CE:\n\n'
               + reporting.markdown_table(body, header))
  out.append(epoch_markdown(results, mags, methods, seeds))
  return '\n'.join(out), stats


def last_epoch_count(results, mags, methods, seeds):
  """(students whose selected epoch is their last one, students) among the grid's cells."""
  last = total = 0
  for mag in mags:
    for m in methods:
      for s in seeds:
        r = results.get((m, mag, s))
        if r is not None:
          total += 1
          last += r['student']['epoch'] == len(r['student'].get('history') or [])
  return last, total


def epoch_markdown(results, mags, methods, seeds):
  """Validation kappa after every epoch of every student (the selected one in bold) and how
  often the selected epoch is the last one."""
  rows, width = [], 0
  for mag in mags:
    for m in methods:
      for s in seeds:
        r = results.get((m, mag, s))
        if r is None:
          continue
        h = r['student'].get('history') or []
        sel = r['student']['epoch']
        width = max(width, len(h))
        rows.append([METHOD_LABELS[m], f'{mag:g}x', str(s)] + [
            f'**{e["val"]["kappa"]:.3f}**' if e['epoch'] == sel else f'{e["val"]["kappa"]:.3f}'
            for e in h] + [str(sel)])
  last, total = last_epoch_count(results, mags, methods, seeds)
  if not rows:
    return ''
  rows = [r[:3] + r[3:-1] + [''] * (width + 4 - len(r)) + r[-1:] for r in rows]
  header = ['method', 'magnification', 'seed'] + [f'e{k}' for k in range(1, width + 1)] + [
      'selected']
  return (f'\nValidation kappa after every epoch (selected epoch in bold; the rule: the first '
          f'epoch sets the best, a later one must beat it by more than min_delta). The selected '
          f'epoch is the last one for {last} of {total} students.\n\n'
          + reporting.markdown_table(rows, header))


def plot_differences(stats, path):
  """Per-seed differences method - CE (dots), their mean and paired-t 95 % CI (bar)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = list(stats)
  fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(keys) + 2), 4.0))
  rng = np.random.default_rng(0)  # horizontal jitter of the dots only
  for x, key in enumerate(keys):
    st = stats[key]
    d = np.asarray(st['diffs'])
    ax.scatter(x + rng.uniform(-0.12, 0.12, d.size), d, s=18, alpha=0.7, color='C0')
    t = st['t']
    if np.isfinite(t['lo']):
      ax.errorbar(x + 0.25, t['mean'], yerr=[[t['mean'] - t['lo']], [t['hi'] - t['mean']]],
                  fmt='s', color='C3', capsize=4)
    else:
      ax.plot(x + 0.25, t['mean'], 's', color='C3')
  ax.axhline(0.0, color='k', lw=0.8)
  ax.set_xlim(-0.6, len(keys) - 0.4)
  ax.set_xticks(range(len(keys)))
  ax.set_xticklabels([f'{METHOD_LABELS[m]}\n{g:g}x, n={len(stats[(m, g)]["diffs"])}'
                      for m, g in keys], fontsize=8)
  split, metric = PAIRED_METRIC
  ax.set_ylabel(f'{split} {metric}: method - CE (same seed)')
  ax.set_title('method - CE per seed (dots);\nmean and its 95 % CI, paired t (squares)',
               fontsize=9)
  ax.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(results, mags, methods, seeds, path):
  """Validation kappa after every epoch of every student, one panel per magnification: a line
  per (method, seed) in the method's colour, a dot at the selected epoch, the seeds' teachers as
  dashed lines. Returns the number of student curves drawn; writes `path` only if any."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(mags), figsize=(5.2 * len(mags), 3.8), squeeze=False)
  drawn = 0
  for ax, mag in zip(axes[0], mags):
    teachers = {results[('teacher', None, s)]['teacher']['val']['kappa'] for s in seeds
                if ('teacher', None, s) in results and any((m, mag, s) in results
                                                           for m in methods)}
    for k, v in enumerate(sorted(teachers)):
      ax.axhline(v, color='0.5', lw=0.8, ls='--', label='teacher (per seed)' if k == 0 else None)
    for i, m in enumerate(methods):
      first = True
      for s in seeds:
        r = results.get((m, mag, s))
        h = (r or {}).get('student', {}).get('history') or []
        if not h:
          continue
        x = [e['epoch'] for e in h]
        y = [e['val']['kappa'] for e in h]
        ax.plot(x, y, color=f'C{i}', lw=1.2, alpha=0.8, label=METHOD_LABELS[m] if first else None)
        sel = r['student']['epoch']
        ax.plot([sel], [y[x.index(sel)]], 'o', color=f'C{i}', ms=5)
        first, drawn = False, drawn + 1
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation kappa')
    ax.set_title(f'{mag:g}x: one line per seed, dot = selected epoch', fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a panel without students has nothing to name
      ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  if drawn:  # no student yet: no file (the report links the plot only when there is one)
    fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


# ------------------------------------------------------- the numbers quoted in the intro and notes
PLACEHOLDER = re.compile(r'\{\{([^{}]*)\}\}')
# what is inside: [PAGE.md#]METHOD[:MAG][@N].FIELD
KEY = re.compile(r'(?:(?P<page>[^#]+)#)?(?P<method>[a-z_]+)(?::(?P<mag>[0-9.]+))?'
                 r'(?:@(?P<epochs>[0-9]+))?\.(?P<field>[a-z_]+)')
PLACEHOLDER_FORM = ('{{METHOD.FIELD}}, {{METHOD@N.FIELD}} (the run as if stopped after N epochs), '
                    'METHOD:MAG when the page has several magnifications, PAGE.md#... for '
                    "another page's paired numbers, or {{last_epoch}}")


def paired_numbers(stats, view=''):
  """{'METHOD|MAG' + view: the raw numbers of METHOD - CE, JSON-ready} from paired_stats' stats
  (`view`: '@N' for the runs seen as stopped after N epochs)."""
  return {f'{method}|{mag:g}{view}': {
      'seeds': st['seeds'], 'diffs': st['diffs'], 'mean': st['t']['mean'], 'lo': st['t']['lo'],
      'hi': st['t']['hi'], 'p': st['t']['p'], 'sd': st['t']['std'],
      'boot_lo': st['bootstrap']['lo'], 'boot_hi': st['bootstrap']['hi'],
      'wins': st['wins']['wins'], 'gap': st['gap'], 'gap_closed': st['gap_closed'],
      'ce': st['baseline_mean'], 'teacher': st['teacher_mean'], 'ce_sd': st['baseline_sd'],
      'teacher_sd': st['teacher_sd'], 'seeds_for_target': st['seeds_for_target']}
          for (method, mag), st in stats.items()}


def _words(items):
  items = [str(i) for i in items]
  return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]


def standing(x, target=TARGET_HALF_WIDTH):
  """What the paired t interval of one difference says: 'gain' (above zero), 'loss' (below),
  'none' (it holds zero and is no wider than +-target) or 'open' (too wide to say)."""
  if x['lo'] > 0:
    return 'gain'
  if x['hi'] < 0:
    return 'loss'
  return 'none' if (x['hi'] - x['lo']) / 2 <= target else 'open'


def verdict(x, target=TARGET_HALF_WIDTH):
  """`standing` in words (the method is the subject)."""
  return {'gain': 'beats CE', 'loss': 'does worse than CE', 'none': 'does not beat CE',
          'open': 'is not answered yet'}[standing(x, target)]


def reading(x, target=TARGET_HALF_WIDTH):
  """`standing` as the clause that says why, from the same interval."""
  share = f' ({100 * x["hi"] / x["gap"]:.0f} % of the gap)' if x['gap'] > 0 else ''
  return {'gain': 'the interval excludes zero: a gain',
          'loss': 'the interval lies below zero: a loss',
          'none': f'the interval includes zero and rules out a gain above {x["hi"]:+.3f}{share}',
          'open': 'the interval includes zero, so no gain is shown yet'}[standing(x, target)]


def format_field(x, field):
  """One field of paired_numbers' entry `x` as the page writes it; None if there is no such."""
  x = {k: float('nan') if v is None else v for k, v in x.items()}  # None: JSON's non-finite
  pct = lambda v: _fmt(100 * v, '.0f', ' %')
  fields = {
      'n': lambda: str(len(x['diffs'])), 'mean': lambda: _fmt(x['mean']),
      'ci': lambda: _interval(x['lo'], x['hi']),
      'boot': lambda: _interval(x['boot_lo'], x['boot_hi']),
      'lo': lambda: _fmt(x['lo']), 'hi': lambda: _fmt(x['hi']), 'p': lambda: _fmt(x['p'], '.3f'),
      'sd': lambda: _fmt(x['sd'], '.3f'), 'half': lambda: _fmt((x['hi'] - x['lo']) / 2, '.3f'),
      'wins': lambda: str(x['wins']), 'gap': lambda: f'{x["gap"]:.3f}',
      'share': lambda: pct(x['gap_closed']),
      'hi_share': lambda: pct(x['hi'] / x['gap'] if x['gap'] > 0 else float('nan')),
      'ce': lambda: f'{x["ce"]:.3f}', 'ce_sd': lambda: _fmt(x['ce_sd'], '.3f'),
      'teacher': lambda: f'{x["teacher"]:.3f}',
      'teacher_sd': lambda: _fmt(x['teacher_sd'], '.3f'),
      'need': lambda: _fmt(x['seeds_for_target'], '.0f'),
      'seeds': lambda: _words(x['seeds']), 'diffs': lambda: _words(_fmt(d) for d in x['diffs']),
      'verdict': lambda: verdict(x), 'reading': lambda: reading(x)}
  return fields[field]() if field in fields else None


def fill_placeholders(text, numbers, source, page_dir='.', page=None):
  """`text` (an intro or notes file, named `source` in errors) with every `{{...}}` replaced:
  {{at.mean}} is AT+ - CE's mean difference in `numbers` (paired_numbers of the page, views after
  N epochs under 'at|2.5@N'), {{at@8.ci}} its paired-t CI when every run is seen as stopped after 8
  epochs, {{at:2.5.n}} names the magnification, {{RESULTS_x.md#at.mean}} reads another page's
  `_paired.json` beside this one, {{last_epoch}} is `page['last_epoch']`. An unknown or
  unavailable placeholder is a UserError naming it and `source`."""
  def value(match):
    key = match.group(1).strip()
    def bad(why):
      return errors.UserError(f'{source}: {{{{{key}}}}}: {why}; placeholders are '
                              f'{PLACEHOLDER_FORM}')
    if key in (page or {}):
      return str(page[key])
    m = KEY.fullmatch(key)
    if not m:
      raise bad('not a placeholder')
    other, method, mag, epochs, field = m.groups()
    table = numbers
    if other:
      path = os.path.join(page_dir, os.path.splitext(other)[0] + '_paired.json')
      if not os.path.exists(path):
        raise bad(f'{path} does not exist (build that page first)')
      with open(path) as f:
        table = json.load(f)
    def wanted(k):  # 'at|2.5@8': AT+ at 2.5x, seen after 8 epochs
      k_method, rest = k.split('|')
      k_mag, _, k_epochs = rest.partition('@')
      return (k_method == method and k_epochs == (epochs or '')
              and (mag is None or float(k_mag) == float(mag)))
    keys = [k for k in table if wanted(k)]
    if not keys:
      raise bad(f'no paired numbers for {method}' + (f' at {mag}x' if mag else '')
                + (f' after {epochs} epochs' if epochs else ''))
    if len(keys) > 1:
      raise bad(f'{method} is paired at several magnifications ({", ".join(keys)}); name one as '
                f'{method}:MAG')
    text_value = format_field(table[keys[0]], field)
    if text_value is None:
      raise bad(f'no field {field!r}')
    return text_value
  return '\n\n'.join(_reflow(PLACEHOLDER.sub(value, p)) if PLACEHOLDER.search(p) else p
                     for p in text.split('\n\n'))


def _reflow(paragraph, width=100):
  """A filled prose paragraph wrapped again to `width`; one that is a list, table, heading or
  code is left as it is. No line may start with '- ' or '+ ' (it would become a list item)."""
  if re.match(r'\s*([-*+] |[|#>]|```|[0-9]+\. )', paragraph):
    return paragraph
  glued = ' '.join(paragraph.split()).replace(' - ', '\x01-\x01').replace(' + ', '\x01+\x01')
  tail = paragraph[len(paragraph.rstrip()):]
  return textwrap.fill(glued, width, break_on_hyphens=False,
                       break_long_words=False).replace('\x01', ' ') + tail


def placeholder_epochs(*paths):
  """The N of every {{METHOD@N.FIELD}} in the files (the views write_report must be given)."""
  found = set()
  for path in paths:
    if path and os.path.exists(path):
      with open(path) as f:
        for key in PLACEHOLDER.findall(f.read()):
          m = KEY.fullmatch(key.strip())
          if m and m['epochs'] and not m['page']:
            found.add(int(m['epochs']))
  return sorted(found)


# ----------------------------------------------------------------------------- the page
def write_report(results, out, mags, methods, seeds, *, title, command, seeds_text, labels, wall,
                 plot_path='', intro='', notes='', fingerprints=None, views=None):
  """Writes the page `out` (markdown), its table as `out`'s .json and its figures beside it;
  prints the page and returns the table (`aggregate`). `fingerprints` ({cell: teacher
  fingerprint}, see `paired_table`) adds the paired sections and `out`'s _paired.json (the paired
  numbers of `results` and of every {N: results as if stopped after N epochs} in `views`);
  `intro` and `notes` are markdown files put after the page's first paragraph and at its end,
  their placeholders filled (`fill_placeholders`)."""
  table = aggregate(results)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  numbers = {}
  if fingerprints is not None:
    paired, stats = paired_markdown(results, fingerprints, mags, methods, seeds)
    numbers = paired_numbers(stats)
    for epochs, seen in sorted((views or {}).items()):
      numbers.update(paired_numbers(paired_stats(seen, fingerprints, mags, methods, seeds)[0],
                                    f'@{epochs}'))
  last, total = last_epoch_count(results, mags, methods, seeds)
  page = {'last_epoch': f'{last} of {total}'}
  def read(path):
    with open(path) as f:
      return fill_placeholders(f.read(), numbers, path, os.path.dirname(os.path.abspath(out)), page)
  plot_path = plot_path or os.path.splitext(out)[0] + '_kappa.png'
  teacher_label = labels[0]
  plot(table, mags, methods, plot_path, teacher_label)
  text = markdown(table, wall, mags, methods, results, title=title, command=command,
                  seeds=seeds_text, labels=labels)
  if intro and os.path.exists(intro):
    text = text.replace('\n\n', '\n\n' + read(intro).strip() + '\n\n', 1)
  text = text.replace('\n\n', '\n\n' + completeness(results, mags, methods, seeds), 1)
  text += per_seed_markdown(results, mags, methods, seeds, teacher_label)
  text += f'\n![test kappa vs magnification]({os.path.basename(plot_path)})\n'
  if fingerprints is not None:
    text += paired
    if stats:
      diff_path = os.path.splitext(out)[0] + '_differences.png'
      plot_differences(stats, diff_path)
      text += f'\n![per-seed differences to CE]({os.path.basename(diff_path)})\n'
    curves_path = os.path.splitext(out)[0] + '_curves.png'
    if plot_curves(results, mags, methods, seeds, curves_path):
      text += f'\n![validation kappa after every epoch]({os.path.basename(curves_path)})\n'
  if notes and os.path.exists(notes):
    text += '\n' + read(notes)
  runs.atomic_write(out, lambda f: f.write(text))
  runs.write_json(os.path.splitext(out)[0] + '.json',
                  {f'{k[0]}|{k[1]}': v for k, v in table.items()}, indent=1)
  if fingerprints is not None:
    runs.write_json(os.path.splitext(out)[0] + '_paired.json', numbers, indent=1)
  print(text)
  return table
