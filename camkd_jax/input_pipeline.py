"""Input pipeline: labelled patches -> uint8 NHWC numpy batches for the training driver (CPU).

  decode -> resize (bilinear, antialias) -> uint8 -> (balance, shuffle: a numpy index order)
  -> batch -> this process's slice -> prefetch

The training order is a numpy permutation drawn from (config.seed, epoch), built identically on
every process; each process decodes only its slice of every global batch. So the order does not
depend on process_count, and a run resumed at (epoch, step) sees exactly the batches it would have
seen. Images stay encoded in memory (TFDS datasets) or on disk (folders, tables) and are decoded by
a parallel tf.data map. Scaling to [0, 1], augmentation and the student's view happen on device.

Only this module and camkd_jax/datasets import TensorFlow.
"""
import csv
import dataclasses
import math
import os
from typing import Iterator, Optional

from absl import logging
from camkd_jax import quiet_tf  # noqa: F401  (before TensorFlow)
import numpy as np
import tensorflow as tf

from camkd_jax import datasets
from camkd_jax import runs
from camkd_jax.datasets import base

try:  # TF must not take the accelerator (or its memory) away from JAX.
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # already initialised, or no such device type
  pass

SPLITS = base.SPLITS
_ORDER_STREAM = 1  # changing it changes every training order: don't


# ---------------------------------------------------------------- orders


def balanced_indices(labels, num_classes):
  """The reference's oversampling: indices of class k repeated round(max_count / count_k) times.

  Python's round (half to even) as in the reference; classes in index order, then the examples of
  each class in split order (the caller shuffles).
  """
  counts = np.bincount(labels, minlength=num_classes)
  top = counts.max()
  return np.concatenate([np.repeat(np.flatnonzero(labels == k), int(round(top / counts[k])))
                         for k in range(num_classes)])


def epoch_order(labels, num_classes, seed, epoch, balance, length):
  """The first `length` train indices of epoch `epoch` (same on every process)."""
  pool = balanced_indices(labels, num_classes) if balance else np.arange(len(labels))
  # The trailing constant keeps this stream apart from other draws seeded with config.seed.
  rng = np.random.default_rng([seed, epoch, _ORDER_STREAM])
  return rng.permutation(pool)[:length]


def shard_bounds(n, index, count):
  """[start, stop) of process `index` when n items are split in `count` near-equal blocks."""
  return n * index // count, n * (index + 1) // count


# ---------------------------------------------------------------- decoding


def _decode_pil(data):
  # tf.numpy_function hands a scalar string over as a 0-d object array.
  return base.decode_with_pil(data.item() if isinstance(data, np.ndarray) else data)


def decode_and_resize(data, image_size):
  """Encoded image (JPEG/PNG/BMP/GIF via TF, TIFF via PIL) -> uint8 [S, S, 3]."""
  tiff = tf.strings.substr(data, 0, 4)
  is_tiff = tf.logical_or(tf.equal(tiff, b'II*\x00'), tf.equal(tiff, b'MM\x00*'))
  img = tf.cond(
      is_tiff,
      lambda: tf.numpy_function(_decode_pil, [data], tf.uint8, stateful=False),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  img = tf.ensure_shape(img, [None, None, 3])
  shape = tf.shape(img)

  def resize():
    out = tf.image.resize(img, [image_size, image_size], method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

  same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
  return tf.cond(same, lambda: img, resize)


def _find_bad(examples, positions):
  """(name, reason) of the first example at `positions` that does not read or decode."""
  for i in positions:
    try:
      reason = base.check_image(examples.read(int(i)))
    except OSError as e:
      reason = f'{type(e).__name__}: {e}'
    if reason is not None:
      return examples.names[int(i)], reason
  return None


def read_batches(examples, positions, batch_size, image_size):
  """Yields (images uint8 [b,S,S,3], labels int32 [b]) for examples[positions], in order.

  Batches have batch_size elements except possibly the last. A file that does not decode stops
  the run with its name (tf.data's own error does not say which file it was).
  """
  positions = np.asarray(positions, np.int64)
  if len(positions) == 0:
    return

  labels = examples.labels[positions]
  if examples.from_files:  # files are read inside the parallel map (no Python in the loop)
    paths = [examples.items[int(i)] for i in positions]
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    load = tf.io.read_file
  else:  # encoded bytes held in memory (one string tensor per split, built once)
    table = examples.as_tensor()
    ds = tf.data.Dataset.from_tensor_slices((positions, labels))
    load = lambda i: tf.gather(table, i)
  ds = ds.map(lambda data, y: (decode_and_resize(load(data), image_size), y),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).prefetch(2)
  it = ds.as_numpy_iterator()
  for k in range(math.ceil(len(positions) / batch_size)):
    try:
      images, labels = next(it)
    except tf.errors.OpError as e:
      # The error belongs to batch k (deterministic order); look there first, then further on.
      bad = (_find_bad(examples, positions[k * batch_size:(k + 1) * batch_size])
             or _find_bad(examples, positions[(k + 1) * batch_size:]))
      if bad is None:
        raise
      raise base.DataError(base.corrupt_message(*bad)) from e
    yield images, labels


# ---------------------------------------------------------------- the Data object


@dataclasses.dataclass
class Data:
  """Batches for one process. See the module docstring for the ordering guarantees."""
  class_names: list
  num_classes: int
  image_size: int
  num_examples: dict            # 'train', 'validation', 'test' -> global counts
  global_batch_size: int
  steps_per_epoch: int          # num_examples['train'] // global_batch_size (reference)
  eval_batch_size: int = 0      # global
  process_index: int = 0
  process_count: int = 1
  seed: int = 0
  balance: bool = True
  name: str = ''
  skipped: int = 0              # unreadable images dropped (config.data.skip_corrupt)
  notes: list = dataclasses.field(default_factory=list)  # warnings for results.md
  source: Optional[base.Source] = dataclasses.field(default=None, repr=False)
  _train: Optional[base.Examples] = dataclasses.field(default=None, repr=False)
  _eval_cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def local_batch_size(self):
    return self.global_batch_size // self.process_count

  @property
  def local_eval_batch_size(self):
    return self.eval_batch_size // self.process_count

  def train_order(self, epoch: int) -> np.ndarray:
    """Global example order of `epoch` (steps_per_epoch * global_batch_size train indices)."""
    return epoch_order(self._train.labels, self.num_classes, self.seed, epoch, self.balance,
                       self.steps_per_epoch * self.global_batch_size)

  def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """This process's slice of global batches start_step .. steps_per_epoch - 1 of `epoch`."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f'start_step {start_step} outside [0, {self.steps_per_epoch}]')
    b, bl = self.global_batch_size, self.local_batch_size
    order = self.train_order(epoch).reshape(self.steps_per_epoch, b)[start_step:]
    mine = order[:, self.process_index * bl:(self.process_index + 1) * bl].reshape(-1)
    for images, labels in read_batches(self._train, mine, bl, self.image_size):
      yield {'image': images, 'label': labels.astype(np.int32)}

  def num_eval_batches(self, split: str) -> int:
    """Batches every process yields for `split` (the same on all processes)."""
    n = self.num_examples[split]
    per_process = math.ceil(n / self.process_count)
    return math.ceil(per_process / self.local_eval_batch_size)

  def eval_batches(self, split: str) -> Iterator[dict]:
    """All of `split`, this process's shard, padded (mask=False) to num_eval_batches batches."""
    if split not in self.num_examples:
      raise ValueError(f'unknown split {split!r}; known: {list(self.num_examples)}')
    examples = self._local_eval_examples(split)
    bl, s = self.local_eval_batch_size, self.image_size
    count = 0
    for images, labels in read_batches(examples, np.arange(len(examples)), bl, s):
      count += 1
      yield _pad(images, labels, bl)
    empty = (np.zeros([0, s, s, 3], np.uint8), np.zeros([0], np.int32))
    for _ in range(self.num_eval_batches(split) - count):
      yield _pad(*empty, bl)

  def train_statistics(self):
    """(mean, std) per RGB channel of the train split as the model sees it ([0, 1], after the
    resize to image_size), streamed batch by batch in float64: every example once, no
    balancing, no augmentation."""
    n = len(self._train)
    total, squares, pixels = np.zeros(3), np.zeros(3), 0
    for images, _ in read_batches(self._train, np.arange(n), max(self.eval_batch_size, 1),
                              self.image_size):
      x = images.reshape(-1, 3).astype(np.float64) / 255.0
      total += x.sum(0)
      squares += np.square(x).sum(0)
      pixels += len(x)
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    return mean, std

  def _local_eval_examples(self, split):
    if split not in self._eval_cache:
      start, stop = shard_bounds(self.num_examples[split], self.process_index, self.process_count)
      if split == 'train' and self._train is not None:
        self._eval_cache[split] = self._train.slice(start, stop)
      else:
        self._eval_cache[split] = self.source.read(split, start, stop)
    return self._eval_cache[split]


def _pad(images, labels, size):
  n = len(labels)
  mask = np.arange(size) < n
  if n < size:
    images = np.concatenate([images, np.zeros((size - n,) + images.shape[1:], np.uint8)])
    labels = np.concatenate([labels, np.zeros([size - n], labels.dtype)])
  return {'image': images, 'label': labels.astype(np.int32), 'mask': mask}


# ---------------------------------------------------------------- construction


def _check_divisible(what, value, process_count):
  if value % process_count:
    raise ValueError(f'config.{what}={value} is not divisible by the number of processes '
                     f'({process_count}); every process takes an equal slice of each batch')


def input_stats_mode(config):
  """'auto' when config.model.input_mean/std ask for train-split statistics, else 'fixed'."""
  mean, std = config.model.get('input_mean', ()), config.model.get('input_std', ())
  strings = [v for v in (mean, std) if isinstance(v, str)]
  if not strings:
    return 'fixed'
  if mean != 'auto' or std != 'auto':
    raise base.DataError(f'config.model.input_mean={mean!r} and input_std={std!r}: set both to '
                         "'auto' (statistics of the train split), or both to 3 numbers, or both "
                         'to () for none')
  return 'auto'


def _split_labels(source, split, data_cache):
  """Labels of a whole split (kept in `data_cache` for reuse when one process reads it all)."""
  examples = source.read(split)
  data_cache[split] = examples
  return examples.labels


def check_classes_present(source, labels_of):
  """Every class must have examples in every split: the error names the missing ones."""
  names = list(source.class_names)
  for split in SPLITS:
    counts = np.bincount(labels_of[split], minlength=len(names))
    empty = [c for c, n in zip(names, counts) if n == 0]
    if not empty:
      continue
    hints = source.hints or {}
    where = ''.join(f'; {c!r} is in {hints[c]}' for c in empty if c in hints)
    what = 'training' if split == 'train' else split
    raise base.DataError(
        f'{source.name}: class(es) {empty} have no {what} examples ({split} counts '
        f'{dict(zip(names, counts.tolist()))}){where}. Add {what} examples of the class, drop '
        'it, or fix its label (a typo?).')


def _log_split_counts(source, labels_of):
  names = list(source.class_names)
  for split in SPLITS:
    counts = np.bincount(labels_of[split], minlength=len(names))
    logging.info('%s %s: %d images (%s)', source.name, split, counts.sum(),
                 ', '.join(f'{c} {n}' for c, n in zip(names, counts)))


def order_note(config, source):
  """The warning when kappa ranks models by a class order that nobody gave, else ''."""
  if (config.selection.metric != 'kappa' or len(source.class_names) <= 2
      or source.order_given):
    return ''
  return (f'class order {list(source.class_names)} is sorted (alphabetical) because '
          'config.data.class_names is not set, and quadratic kappa (the selection metric) '
          'treats the classes as ordered; set config.data.class_names to the classes in their '
          'real order, comma-separated')


def resize_note(image_sizes, image_size):
  """The warning when images are resized to image_size (counts per kind), else ''."""
  if not image_sizes:
    return ''
  hw = np.asarray(list(image_sizes.values()), np.int64).reshape(-1, 2)
  up = int(((hw[:, 0] < image_size) | (hw[:, 1] < image_size)).sum())
  down = int(((hw[:, 0] > image_size) | (hw[:, 1] > image_size)).sum())
  aspect = int((hw[:, 0] != hw[:, 1]).sum())
  if not (up or down or aspect):
    return ''
  sizes = sorted({f'{h}x{w}' for h, w in hw.tolist()})
  return (f'{up + down} of {len(hw)} images are resized to config.image_size={image_size}: '
          f'{up} up-sampled, {down} down-sampled, {aspect} with their aspect ratio changed '
          f'(sizes found: {base.first_of(sizes, show=5)})')


def get_data(config, *, process_index=None, process_count=None) -> Data:
  """Prepares (generating / building once) the dataset of `config` and returns its `Data`."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_divisible('batch_size', config.batch_size, process_count)
  _check_divisible('eval_batch_size', config.eval_batch_size, process_count)
  input_stats_mode(config)
  source = datasets.get_source(config)
  class_names = list(source.class_names)
  counts = {s: source.num_examples(s) for s in SPLITS}
  read = {}
  labels_of = {s: _split_labels(source, s, read) for s in SPLITS}
  check_classes_present(source, labels_of)
  _log_split_counts(source, labels_of)
  steps = counts['train'] // config.batch_size
  if steps == 0:
    raise base.DataError(f'{source.name}: the train split has {counts["train"]} examples, fewer '
                         f'than one batch (config.batch_size={config.batch_size})')
  if source.skipped:
    logging.warning('%s: %d unreadable image(s) were skipped (config.data.skip_corrupt)',
                    source.name, source.skipped)
  notes = [n for n in (order_note(config, source),
                       resize_note(source.image_sizes, int(config.image_size))) if n]
  for note in notes:
    logging.warning('%s: %s', source.name, note)
  # One process reads each split whole: keep it for evaluation instead of reading it again.
  cache = {s: read[s] for s in ('validation', 'test')} if process_count == 1 else {}
  return Data(class_names=class_names, num_classes=len(class_names),
              image_size=int(config.image_size), num_examples=counts,
              global_batch_size=int(config.batch_size), steps_per_epoch=steps,
              eval_batch_size=int(config.eval_batch_size), process_index=int(process_index),
              process_count=int(process_count), seed=int(config.seed),
              balance=bool(config.balance), name=source.name, skipped=source.skipped,
              notes=notes, source=source, _train=read['train'], _eval_cache=cache)


# ---------------------------------------------------------------- the run's start (driver hook)


def write_split_record(source, path):
  """CSV of which file went to which split (folder and table datasets), or nothing."""
  if not source.records:
    return None
  def write(f):
    w = csv.writer(f)
    w.writerow(['path', 'class', 'split', 'assigned_by'])
    w.writerows(source.records)
  runs.atomic_write(path, write, newline='')
  return path


def resolve_input_stats(config, data):
  """`config` with model.input_mean/std = 'auto' replaced by the train split's statistics."""
  if input_stats_mode(config) != 'auto':
    return config
  mean, std = data.train_statistics()
  if (std <= 1e-6).any():
    raise base.DataError(f'{data.name}: a colour channel of the train images is constant (std '
                         f'{std.tolist()}), so model.input_std=auto would divide by zero; set '
                         'config.model.input_mean/std by hand')
  mean, std = tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
  logging.info('model.input_mean/std = auto: mean %s, std %s (train split, %d images at %d px)',
               mean, std, data.num_examples['train'], data.image_size)
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for key, value in (('input_mean', mean), ('input_std', std)):
      del out.model[key]
      out.model[key] = value
  return out


def prepare_run(config, data, workdir):
  """At the start of a run, once the data is listed and checked: records the split in
  workdir/data_split.csv (process 0) and returns the config the models are built from ('auto'
  input statistics resolved to numbers)."""
  if data.process_index == 0 and data.source is not None:
    path = write_split_record(data.source, os.path.join(workdir, 'data_split.csv'))
    if path:
      logging.info('%s: the split (which file went where) is in %s', data.name, path)
  return resolve_input_stats(config, data)
