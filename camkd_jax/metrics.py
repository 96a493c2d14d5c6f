"""Evaluation metrics and running loss means: pure NumPy / scikit-learn, no JAX, no TensorFlow.

The reference selects and reports with scikit-learn's balanced accuracy and quadratic-weighted
Cohen's kappa; the confusion matrix is reported beside them (rows: true class, columns: predicted).
"""
import math
import warnings
from typing import Dict, Iterable, Mapping, Sequence

import numpy as np


def _skm():
  """sklearn.metrics, imported on first use: it costs about 1 s of every command's start-up
  (the CLI's one-line errors and --help included) and only evaluation needs it."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  return metrics


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """(C, C) int64 counts; row = true class, column = predicted class."""
  labels, preds = _check_pair(labels, preds, num_classes)
  return _skm().confusion_matrix(labels, preds, labels=np.arange(num_classes)).astype(np.int64)


def balanced_accuracy(labels, preds, num_classes: int) -> float:
  """Mean over the classes present in `labels` of the per-class recall (scikit-learn)."""
  labels, preds = _check_pair(labels, preds, num_classes)
  with warnings.catch_warnings():
    # Predicting a class absent from the labels is legitimate here (small eval sets).
    warnings.simplefilter('ignore')
    return float(_skm().balanced_accuracy_score(labels, preds))


def quadratic_kappa(labels, preds, num_classes: int) -> float:
  """Cohen's kappa with quadratic weights over the ordinal classes 0..C-1 (scikit-learn).

  NaN when it is undefined (labels and predictions both constant and equal).
  """
  labels, preds = _check_pair(labels, preds, num_classes)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return float(_skm().cohen_kappa_score(labels, preds, weights='quadratic',
                                          labels=np.arange(num_classes)))


def classification_metrics(labels, preds, num_classes: int) -> Dict[str, object]:
  """All reported metrics of one split: balanced accuracy, kappa, accuracy, confusion matrix."""
  labels, preds = _check_pair(labels, preds, num_classes)
  return {
      'balanced_accuracy': balanced_accuracy(labels, preds, num_classes),
      'kappa': quadratic_kappa(labels, preds, num_classes),
      'accuracy': float(np.mean(labels == preds)),
      'num_examples': int(labels.size),
      'confusion_matrix': confusion_matrix(labels, preds, num_classes).tolist(),
  }


def _check_pair(labels, preds, num_classes):
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  preds = np.asarray(preds).reshape(-1).astype(np.int64)
  if labels.shape != preds.shape:
    raise ValueError(f'labels {labels.shape} and predictions {preds.shape} differ in length')
  if labels.size == 0:
    raise ValueError('no examples to evaluate (empty split?)')
  for name, v in (('labels', labels), ('predictions', preds)):
    if v.min() < 0 or v.max() >= num_classes:
      raise ValueError(f'{name} must lie in [0, {num_classes}); got range '
                       f'[{v.min()}, {v.max()}]')
  return labels, preds


def improved(value: float, best, min_delta: float) -> bool:
  """The reference's selection rule: the first value always wins, later ones must beat the best
  by more than `min_delta`. A non-finite value never wins over a finite best."""
  if best is None:
    return True
  if not math.isfinite(value):
    return False
  if not math.isfinite(best):
    return True
  return value > best + min_delta


def mean_std(values: Sequence[float]) -> Dict[str, float]:
  """Mean and sample standard deviation (ddof=1) of per-seed values; std 0.0 for one value."""
  v = np.asarray(values, np.float64)
  std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
  return {'mean': float(np.mean(v)), 'std': std}


# ----------------------------------------------------------------------------- paired seeds
# A paired comparison: for every seed, method and baseline share the teacher, the data order and
# the augmentation stream, so their difference within a seed is the effect plus the noise that
# does not cancel. These functions summarise the per-seed differences d_1..d_n.


def paired_t(diffs: Sequence[float], level: float = 0.95) -> Dict[str, float]:
  """Paired t on per-seed differences: mean, sample std, the `level` confidence interval
  mean +/- t_{n-1} * std / sqrt(n) and the two-sided p-value of 'mean = 0' (scipy.stats.t).
  Fewer than two differences: no interval (nan), as scipy gives."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = np.asarray(diffs, np.float64)
  n = d.size
  if n == 0:
    raise ValueError('paired_t needs at least one difference')
  mean = float(d.mean())
  if n < 2:
    return {'n': 1, 'mean': mean, 'std': float('nan'), 'lo': float('nan'), 'hi': float('nan'),
            't': float('nan'), 'p': float('nan')}
  std = float(d.std(ddof=1)) if np.ptp(d) > 0 else 0.0  # equal values: exactly 0, no round-off
  se = std / math.sqrt(n)
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
  if se > 0:
    t = mean / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
  else:  # every seed the same difference: a point interval; t infinite unless it is 0
    t = math.copysign(math.inf, mean) if mean else float('nan')
    p = 0.0 if mean else float('nan')
  return {'n': n, 'mean': mean, 'std': std, 'lo': mean - half, 'hi': mean + half, 't': t, 'p': p}


def bootstrap_ci(diffs: Sequence[float], level: float = 0.95, resamples: int = 10000,
                 seed: int = 0) -> Dict[str, float]:
  """Percentile bootstrap interval of the mean difference over seeds: `resamples` draws of n
  seeds with replacement from np.random.default_rng(seed) (one (resamples, n) integer array),
  the mean of each, and their (1 - level) / 2 and (1 + level) / 2 quantiles (NumPy's default
  linear interpolation). A fixed seed makes the interval reproducible."""
  d = np.asarray(diffs, np.float64)
  if d.size == 0:
    raise ValueError('bootstrap_ci needs at least one difference')
  idx = np.random.default_rng(seed).integers(0, d.size, (int(resamples), d.size))
  means = d[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return {'n': int(d.size), 'mean': float(d.mean()), 'lo': float(lo), 'hi': float(hi)}


def wins(diffs: Sequence[float]) -> Dict[str, int]:
  """How many seeds the method wins (d > 0), ties (d == 0) and loses (d < 0)."""
  d = np.asarray(diffs, np.float64)
  return {'wins': int((d > 0).sum()), 'ties': int((d == 0).sum()), 'losses': int((d < 0).sum())}


def gap_closed(method: Sequence[float], baseline: Sequence[float],
               teacher: Sequence[float]) -> float:
  """Share of the teacher - baseline gap that the method closes, from paired per-seed values:
  mean(method - baseline) / mean(teacher - baseline). nan when the mean gap is not positive."""
  m, b, t = (np.asarray(v, np.float64) for v in (method, baseline, teacher))
  gap = float((t - b).mean())
  return float((m - b).mean()) / gap if gap > 0 else float('nan')


def seeds_for_half_width(std: float, half_width: float, level: float = 0.95,
                         max_seeds: int = 1000) -> float:
  """The fewest seeds n (>= 2) whose paired-t interval, t_{n-1} * std / sqrt(n), is at most
  `half_width` for a per-seed spread `std` (the planning rule for the seed count). nan when std
  is unknown (nan: fewer than two seeds) or when even `max_seeds` is not enough."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if not np.isfinite(std):
    return float('nan')
  for n in range(2, int(max_seeds) + 1):
    if float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) <= half_width:
      return n
  return float('nan')


def summarize(runs: Sequence[Mapping], keys=('balanced_accuracy', 'kappa', 'accuracy')):
  """Per split: {key_mean, key_std} (sample std) over runs, each {'val': {...}, 'test': {...}}."""
  out = {}
  for split in ('val', 'test'):
    out[split] = {}
    for key in keys:
      values = [r[split][key] for r in runs if split in r and key in r[split]]
      if values:
        ms = mean_std(values)
        out[split][f'{key}_mean'], out[split][f'{key}_std'] = ms['mean'], ms['std']
  return out


class LossMeans:
  """Running per-term means of the train losses, in float64, added one step at a time.

  Adding step by step in a fixed order makes the result independent of when the host fetched
  the values, so a resumed run reports exactly the means of an uninterrupted one. The state is
  JSON-serialisable so a mid-epoch checkpoint can carry it.
  """

  def __init__(self, sums: Mapping[str, float] = None, count: int = 0):
    self.sums = {k: float(v) for k, v in (sums or {}).items()}
    self.count = int(count)

  def add(self, steps: Iterable[Mapping[str, float]]):
    for values in steps:
      for k, v in values.items():
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
      self.count += 1

  def means(self) -> Dict[str, float]:
    if not self.count:
      return {}
    return {k: s / self.count for k, s in self.sums.items()}

  def state(self):
    return {'sums': dict(self.sums), 'count': self.count}

  @classmethod
  def from_state(cls, state):
    state = state or {}
    return cls(state.get('sums'), state.get('count', 0))
