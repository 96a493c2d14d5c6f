"""The slide-level metric of a training run's evaluation: patches grouped by their slide.

When the patches know their slide (SICAPv2: the name before '_Block_Region_'; a `table` dataset:
its slide column, config.data.slide_column) and slide-level labels exist (config.slide_level.labels,
or SICAPv2's wsi_labels.xlsx found next to images/ in the data directory), every evaluation adds
`slide_level` to the validation and test metrics: the patch predictions of each slide are turned
into a Gleason score and ISUP grade group by the rules of camkd_jax/gleason.py (area = predicted
patches, the config's noise thresholds), and compared with the labels (camkd_jax/slide_labels.py:
quadratic kappa on the grade group, accuracies, confusion matrix). It is reported only, unless
config.selection.metric = 'slide_kappa' asks to select the checkpoint on the validation slides'
grade-group kappa.
"""
import os
from typing import Dict, Optional

from absl import logging
import numpy as np

from camkd_jax import errors
from camkd_jax import gleason
from camkd_jax import slide_labels

SPLITS = (('val', 'validation'), ('test', 'test'))
SELECTION_METRIC = 'slide_kappa'


def selection_value(val_metrics: Dict, metric: str) -> float:
  """The validation value that model selection compares (NaN when a slide kappa is undefined)."""
  if metric != SELECTION_METRIC:
    return val_metrics[metric]
  m = val_metrics.get('slide_level')
  return float('nan') if m is None else float(m['kappa'])


def check_selection(config, level: Optional['SlideLevel']):
  """config.selection.metric='slide_kappa' needs slide-level labels for the run's patches."""
  if config.selection.metric == SELECTION_METRIC and level is None:
    raise errors.ConfigError(
        f"config.selection.metric='{SELECTION_METRIC}' selects on the validation slides' "
        'grade-group kappa, but this run has no slide-level labels: set '
        'config.slide_level.labels (or use SICAPv2 with its wsi_labels.xlsx), or select on kappa')


def labels_path(config) -> str:
  """config.slide_level.labels, else SICAPv2's own wsi_labels.xlsx when it is there, else ''."""
  path = str(config.slide_level.labels or '')
  if path or config.data.name != 'sicapv2':
    return path
  root = config.data.manual_dir or config.data.data_dir
  for folder in ([root, os.path.join(root, 'SICAPv2')] if root else []):
    candidate = os.path.join(folder, 'wsi_labels.xlsx')
    if os.path.isfile(candidate):
      return candidate
  return ''


def split_slide_ids(examples, dataset: str) -> Optional[np.ndarray]:
  """The slide id of every example (None when the dataset does not know them)."""
  slides = getattr(examples, 'slides', None)
  if slides is not None:
    return np.asarray(slides, object)
  if dataset == 'sicapv2':
    return np.asarray([slide_labels.sicapv2_slide_id(n) for n in examples.names], object)
  return None


def gathered_order(n: int, process_count: int, local_batch: int, num_batches: int) -> np.ndarray:
  """Split indices in the order evaluation.predict returns them: batch by batch, in each batch every
  process's slice of its own contiguous shard (input_pipeline.shard_bounds), padding dropped."""
  order = []
  bounds = [(n * p // process_count, n * (p + 1) // process_count) for p in range(process_count)]
  for k in range(num_batches):
    for start, stop in bounds:
      order.extend(range(min(start + k * local_batch, stop), min(start + (k + 1) * local_batch,
                                                                 stop)))
  return np.asarray(order, np.int64)


class SlideLevel:
  """Slide ids of the eval splits (in predict's order), the labels and the scoring rules."""

  def __init__(self, labels, patterns, rules, ids: Dict[str, np.ndarray], source: str,
               patch_labels: Optional[Dict[str, np.ndarray]] = None):
    self.labels, self.patterns, self.rules, self.ids = labels, patterns, rules, ids
    self.source = source
    self.patch_labels = patch_labels or {}  # the split's class labels, in the same order

  def grades(self, split: str, preds: np.ndarray) -> Dict[str, tuple]:
    """{slide: (primary, secondary)} from the predicted classes of `split` (predict's order)."""
    ids = self.ids[split]
    if len(ids) != len(preds):
      raise ValueError(f'{len(preds)} predictions for the {len(ids)} patches of {split}')
    names, inverse = np.unique(ids.astype(str), return_inverse=True)
    counts = np.zeros((len(names), len(self.patterns)))
    np.add.at(counts, (inverse, np.asarray(preds, np.int64)), 1.0)
    out = {}
    for name, row in zip(names, counts):
      areas = {p: 0.0 for p in (gleason.BENIGN,) + gleason.PATTERNS}
      for c, p in zip(row, self.patterns):
        if p is not None:
          areas[p] += c
      r = gleason.score(areas, self.rules)
      out[str(name)] = (r['primary'], r['secondary'])
    return out

  def evaluate(self, split: str, preds: np.ndarray, labels=None) -> Optional[Dict]:
    """Slide-level metrics of `split`; `labels`, the patch labels predict gathered with `preds`,
    check that the patches are in the order of the slide ids (else a warning and None)."""
    want = self.patch_labels.get(split)
    if labels is not None and want is not None and not np.array_equal(labels, want):
      logging.warning('slide level (%s): the gathered patch labels are not in the order of the '
                      'slide ids; no slide-level metric', split)
      return None
    ours = self.grades(split, preds)
    m = slide_labels.slide_metrics(self.labels, ours)
    if m is not None:
      m['unlabelled_slides'] = len(set(ours) - set(self.labels))
    return m


def setup(config, data) -> Optional[SlideLevel]:
  """The run's SlideLevel, or None (no labels, or patches without slides: logged)."""
  path = labels_path(config)
  if not path:
    return None
  sl = config.slide_level
  try:
    patterns = gleason.class_patterns(data.class_names, sl.patterns)
    rules = gleason.Rules(float(sl.min_share), float(sl.min_tumour), 'count')
  except ValueError as e:
    raise errors.ConfigError(f'config.slide_level: {e}') from None
  if patterns is None:
    raise errors.ConfigError(
        f'config.slide_level.labels={path!r} needs Gleason classes, but the classes are '
        f'{list(data.class_names)}; map them with config.slide_level.patterns, e.g. '
        '"benign=benign,low=3,high=4"')
  labels = slide_labels.read_labels(path)
  ids, patch_labels = {}, {}
  for _, split in SPLITS:
    # one process holds the whole split already; several read it (names and labels) once here
    whole = data._local_eval_examples  # pylint: disable=protected-access
    examples = whole(split) if data.process_count == 1 else data.source.read(split)
    split_ids = split_slide_ids(examples, data.name)
    if split_ids is None:
      raise errors.ConfigError(
          f'config.slide_level.labels={path!r}, but the {data.name} patches do not name their '
          'slide: give a table dataset a slide column (config.data.slide_column), or leave '
          'config.slide_level.labels empty')
    order = gathered_order(len(split_ids), data.process_count, data.local_eval_batch_size,
                           data.num_eval_batches(split))
    ids[split] = split_ids[order]
    patch_labels[split] = np.asarray(examples.labels)[order]
  for key, split in SPLITS:
    found = set(ids[split].astype(str))
    for line in slide_labels.mismatch_lines(set(labels) & found, found, path):
      logging.info('slide level (%s): %s', key, line)
    logging.info('slide level (%s): %d slides, %d of them labelled in %s', key, len(found),
                 len(found & set(labels)), path)
  return SlideLevel(labels, patterns, rules, ids, path, patch_labels)
