"""Slide-level labels and metrics: a slide's primary + secondary Gleason pattern against ours.

Labels file (CSV or XLSX), the layout of SICAPv2's wsi_labels.xlsx as published:

  slide_id, patient_id, Gleason_primary, Gleason_secondary
  16B0001851, ..., 3, 4

patient_id is optional; grades are 3, 4, 5, and 0 + 0 for a benign slide. A SICAPv2 patch's
slide id is its file name before '_Block_Region_' (16B0001851 in
16B0001851_Block_Region_1_0_0_xini_6803_yini_59786.jpg).

Metrics over the slides that are both labelled and graded: quadratic kappa on the ISUP grade
group (benign = 0, 1..5; scikit-learn, as the patch-level kappa), accuracy on the grade group,
on the Gleason score (the sum: 3+4 and 4+3 are both 7) and on the exact primary + secondary, and
the grade-group confusion matrix (rows: label, columns: ours).

Used by the slide command (--labels) and by training (camkd_jax.slide_level). No JAX, no TF.
"""
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from camkd_jax import errors
from camkd_jax import gleason

COLUMNS = ('slide_id', 'patient_id', 'Gleason_primary', 'Gleason_secondary')
REQUIRED = ('slide_id', 'Gleason_primary', 'Gleason_secondary')
SICAPV2_SEPARATOR = '_Block_Region_'


class LabelError(errors.UserError, ValueError):
  """A slide-labels file that cannot be used; the message names the file, row and fix."""


def sicapv2_slide_id(name: str) -> str:
  """The slide id of a SICAPv2 patch name or path (its file name before '_Block_Region_', else
  before the first '_')."""
  base = os.path.basename(str(name))
  if SICAPV2_SEPARATOR in base:
    return base.split(SICAPV2_SEPARATOR)[0]
  return os.path.splitext(base)[0].split('_')[0]


def _grade(text: str, where: str, column: str) -> int:
  try:
    v = float(text)
  except ValueError:
    v = None
  if v is None or not v.is_integer() or int(v) not in (0, 3, 4, 5):
    raise LabelError(f'{where}: {column} is {text!r}; a Gleason pattern is 3, 4 or 5 (0 with 0 '
                     'for a benign slide). Fix the row or drop it')
  return int(v)


def read_labels(path: str) -> Dict[str, Tuple[int, int]]:
  """{slide_id: (primary, secondary)} of a CSV / XLSX labels file; LabelError on any problem."""
  from camkd_jax.datasets import base  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise LabelError(f'--labels {path}: no such file')
  try:
    header, rows = base.read_table(path)
  except base.DataError as e:
    raise LabelError(f'--labels {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise LabelError(f'--labels {path}: cannot read it as a table ({type(e).__name__}: {e})') \
        from None
  col = {h: j for j, h in enumerate(header)}
  missing = [c for c in REQUIRED if c not in col]
  if missing:
    raise LabelError(f'{path}: missing column(s) {missing}; expected the header '
                     f'{", ".join(COLUMNS)} (SICAPv2\'s wsi_labels.xlsx; patient_id optional), '
                     f'found {header}')
  out, first = {}, {}
  for n, r in rows:
    sid = r[col['slide_id']]
    where = f'{path}, row {n} (slide_id {sid!r})'
    if not sid:
      raise LabelError(f'{path}, row {n}: empty slide_id')
    p = _grade(r[col['Gleason_primary']], where, 'Gleason_primary')
    s = _grade(r[col['Gleason_secondary']], where, 'Gleason_secondary')
    if (p == 0) != (s == 0):
      raise LabelError(f'{where}: {p}+{s} mixes benign (0) with a pattern; a benign slide is '
                       '0 + 0, a tumour 3-5 + 3-5')
    if sid in out and out[sid] != (p, s):
      raise LabelError(f'{where}: {p}+{s}, but row {first[sid]} gives {out[sid][0]}+'
                       f'{out[sid][1]} for the same slide; keep one label per slide')
    out[sid] = (p, s)
    first.setdefault(sid, n)
  if not out:
    raise LabelError(f'{path}: no label rows under the header')
  return out


def mismatch_lines(labels: Iterable[str], graded: Iterable[str], source: str) -> List[str]:
  """One line for the labelled slides that were not graded and one for the reverse (if any)."""
  labels, graded = set(labels), set(graded)
  lines = []
  only_labels = sorted(labels - graded)
  only_run = sorted(graded - labels)
  if only_labels:
    lines.append(f'{len(only_labels)} slide(s) of {source} are not in this run: '
                 + ', '.join(only_labels))
  if only_run:
    lines.append(f'{len(only_run)} slide(s) of this run have no label in {source}: '
                 + ', '.join(only_run))
  return lines


def slide_metrics(truth: Mapping[str, Tuple[int, int]],
                  predicted: Mapping[str, Tuple[int, int]]) -> Optional[Dict]:
  """Metrics over the slides in both (None when there are none); see the module docstring."""
  from camkd_jax import metrics  # pylint: disable=g-import-not-at-top
  ids = sorted(set(truth) & set(predicted))
  if not ids:
    return None
  t = np.array([gleason.grade_group(*truth[i]) for i in ids])
  p = np.array([gleason.grade_group(*predicted[i]) for i in ids])
  n = len(gleason.GRADE_GROUP_NAMES)
  return {
      'kappa': metrics.quadratic_kappa(t, p, n),
      'accuracy': float(np.mean(t == p)),
      'score_accuracy': float(np.mean([sum(truth[i]) == sum(predicted[i]) for i in ids])),
      'pattern_accuracy': float(np.mean([tuple(truth[i]) == tuple(predicted[i]) for i in ids])),
      'num_slides': len(ids),
      'grade_groups': list(gleason.GRADE_GROUP_NAMES),
      'confusion_matrix': metrics.confusion_matrix(t, p, n).tolist(),
  }


def format_metrics(m: Mapping) -> str:
  """One line: 'slide level (N slides): grade-group kappa K, accuracy A, score accuracy S'."""
  return (f"slide level ({m['num_slides']} slides): grade-group quadratic kappa {m['kappa']:.4f}, "
          f"grade-group accuracy {m['accuracy']:.4f}, Gleason score accuracy "
          f"{m['score_accuracy']:.4f}, primary+secondary accuracy {m['pattern_accuracy']:.4f}")
