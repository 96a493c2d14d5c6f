"""What every dataset hands to the input pipeline: labelled examples of one split.

A `Source` answers two questions: how many examples a split has, and "give me examples
[start, stop) of split s" as encoded image bytes (TFDS datasets) or file paths (bring-your-own
folders and tables). The pipeline only ever sees `Examples`, so all datasets are treated alike.
"""
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
from typing import Optional, Sequence

from absl import logging
import numpy as np

from camkd_jax import errors
from camkd_jax import runs

SPLITS = ('train', 'validation', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
SHOW_FIRST = 10  # how many bad files / rows an error lists before "and N more"


class DataError(errors.UserError, ValueError):
  """Bad input data or data config. The message names the file/row/key and what to do; the
  command line prints it as is, with no traceback."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A file or folder that the data config names does not exist."""


def first_of(items, total=None, show=SHOW_FIRST):
  """'a, b, c' or 'a, b, c and 12 more' (the first `show` of `items`)."""
  items = list(items)
  total = len(items) if total is None else total
  text = ', '.join(str(x) for x in items[:show])
  return text + (f' and {total - show} more' if total > show else '')


@dataclasses.dataclass
class Examples:
  """A run of examples of one split.

  items: encoded images (bytes) or, when `from_files`, file paths (str).
  labels: int32 class indices.
  names: how to call each example in an error message (a path or an image name).
  slides: the slide of each example, when the dataset says (a table's slide column), else None.
  """
  items: list
  labels: np.ndarray
  names: list
  from_files: bool
  slides: Optional[list] = None

  def __len__(self):
    return len(self.labels)

  def slice(self, start, stop):
    return Examples(self.items[start:stop], self.labels[start:stop], self.names[start:stop],
                    self.from_files,
                    None if self.slides is None else self.slides[start:stop])

  def as_tensor(self):
    """The encoded images as one tf.string tensor (cached; in-memory examples only)."""
    if getattr(self, '_tensor', None) is None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tensor = tf.constant(self.items, tf.string)
    return self._tensor

  def read(self, i):
    """Encoded bytes of example i (reads the file for path-backed examples)."""
    if not self.from_files:
      return self.items[i]
    with open(self.items[i], 'rb') as f:
      return f.read()


class Source:
  """Base class: `class_names`, `num_examples(split)`, `read(split, start, stop)`."""
  name = ''
  class_names: Sequence[str] = ()
  skipped = 0          # images dropped as unreadable (config.data.skip_corrupt)
  skipped_names = ()   # their names, for the log
  # Whether the class order was given (config.data.class_names, the dataset's definition, a
  # table's one-hot column order) rather than sorted: quadratic kappa depends on it.
  order_given = True
  records = ()         # [(path, class name, split, assigned_by)]: which file went where
  image_sizes = None   # {path: (height, width)} of the file-backed images, when checked
  hints = None         # {class name: where its examples are (e.g. table rows)} for errors

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  def read(self, split: str, start: int = 0, stop: Optional[int] = None) -> Examples:
    raise NotImplementedError


class ListSource(Source):
  """A source whose splits are already listed in memory (folder and table datasets)."""

  def __init__(self, name, class_names, splits, skipped_names=(), **extra):
    self.name = name
    self.class_names = list(class_names)
    self._splits = splits
    self.skipped_names = list(skipped_names)
    self.skipped = len(self.skipped_names)
    for key, value in extra.items():  # order_given, records, image_sizes, hints
      if not hasattr(Source, key):
        raise TypeError(f'unknown Source attribute {key!r}')
      setattr(self, key, value)

  def num_examples(self, split):
    return len(self._splits[split])

  def read(self, split, start=0, stop=None):
    return self._splits[split].slice(start, stop)


# ---------------------------------------------------------------- image checks


def decode_with_pil(data: bytes) -> np.ndarray:
  """Fully decodes `data` to uint8 RGB with PIL; raises on corrupt or truncated data."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as im:
    im.load()  # decodes every byte: a truncated file raises here, not at open()
    return np.asarray(im.convert('RGB'))


def _reason(e: Exception) -> str:
  if type(e).__name__ == 'UnidentifiedImageError':  # its text names a BytesIO object
    return 'UnidentifiedImageError: not an image format PIL can read'
  return f'{type(e).__name__}: {e}'


def check_image(data: bytes) -> Optional[str]:
  """None if `data` decodes to an image, else the reason it does not."""
  try:
    decode_with_pil(data)
    return None
  except Exception as e:  # pylint: disable=broad-except
    return _reason(e)


def _check_file(path):
  """(reason or None, height, width) of the image file at `path`."""
  try:
    with open(path, 'rb') as f:
      img = decode_with_pil(f.read())
    return None, int(img.shape[0]), int(img.shape[1])
  except Exception as e:  # pylint: disable=broad-except
    return _reason(e), 0, 0


def cache_dir():
  """Where checks are cached: $CAMKD_CACHE_DIR, else ~/.cache/camkd_jax."""
  return (os.environ.get('CAMKD_CACHE_DIR')
          or os.path.join(os.path.expanduser('~'), '.cache', 'camkd_jax'))


def _cache_file(key):
  digest = hashlib.sha1(os.path.abspath(key).encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), 'image_checks', f'{digest}.json')


def _load_cache(key):
  try:
    with open(_cache_file(key)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _save_cache(key, cache):
  """Best effort (a read-only home only costs a re-check next time)."""
  path = _cache_file(key)
  try:
    runs.atomic_write(path, lambda f: json.dump(cache, f))
  except OSError:
    pass


def check_files(paths: Sequence[str], cache_key: str = '', workers: int = 0) -> list:
  """[(reason or None, height, width)] of every file: decoded in full by PIL in a thread pool.

  With `cache_key` (e.g. the dataset root), files that decoded before are not decoded again
  while their (path, size, mtime) is unchanged; the cache lives in cache_dir(). Bad files are
  never cached, so a fixed file is checked again.
  """
  cache = _load_cache(cache_key) if cache_key else {}
  out, todo, stamps = [None] * len(paths), [], {}
  for i, p in enumerate(paths):
    try:
      st = os.stat(p)
      stamps[i] = [st.st_size, st.st_mtime_ns]
    except OSError as e:
      out[i] = (f'{type(e).__name__}: {e}', 0, 0)
      continue
    hit = cache.get(os.path.abspath(p))
    if hit and hit[:2] == stamps[i]:
      out[i] = (None, hit[2], hit[3])
    else:
      todo.append(i)
  if todo:
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for i, result in zip(todo, pool.map(_check_file, [paths[i] for i in todo])):
        out[i] = result
        if result[0] is None:
          cache[os.path.abspath(paths[i])] = stamps[i] + [result[1], result[2]]
    if cache_key:
      _save_cache(cache_key, cache)
  return out


def find_unreadable(paths: Sequence[str], workers: int = 0, cache_key: str = '') -> list:
  """[(index, reason)] for the files that are missing or do not decode (see check_files)."""
  return [(i, r) for i, (r, _, _) in enumerate(check_files(paths, cache_key, workers))
          if r is not None]


def corrupt_message(name, reason):
  return (f'cannot decode image {name} ({reason}). Replace or remove the file, or set '
          'config.data.skip_corrupt=True to skip unreadable images.')


SKIP_CORRUPT = 'config.data.skip_corrupt=True'  # what skips unreadable images (in training)


def corrupt_files_message(bad, total, skip_with=SKIP_CORRUPT):
  """One message for every unreadable file: bad = [(name, reason)] of `total` files checked;
  `skip_with`: what skips them (the training config's key, or a command's flag)."""
  shown = '\n  '.join(f'{n} ({r})' for n, r in bad[:SHOW_FIRST])
  more = f'\n  ... and {len(bad) - SHOW_FIRST} more' if len(bad) > SHOW_FIRST else ''
  return (f'{len(bad)} of {total} image(s) cannot be read or decoded:\n  {shown}{more}\n'
          f'Replace or remove them, or set {skip_with} to skip unreadable '
          'images (they are then listed in the log).')


def readable_files(paths: Sequence[str], where: str, skip_corrupt: bool,
                   skip_with: str = SKIP_CORRUPT, cache_key: str = ''):
  """(indices of the readable files, [(index, reason)] of the others, {path: (h, w)}).

  Every file is decoded once (check_files: threaded, cached under `cache_key`); unreadable ones
  are one DataError starting with `where` and listing them all, or, with `skip_corrupt`, dropped
  and logged by name.
  """
  checks = check_files(paths, cache_key=cache_key)
  bad = [(i, r) for i, (r, _, _) in enumerate(checks) if r is not None]
  if bad and not skip_corrupt:
    raise DataError(f'{where}: ' + corrupt_files_message([(paths[i], r) for i, r in bad],
                                                         len(paths), skip_with))
  if bad:
    logging.warning('%s: skipped %d unreadable image(s) (%s): %s', where, len(bad),
                    skip_with, '; '.join(f'{paths[i]} ({r})' for i, r in bad))
  drop = {i for i, _ in bad}
  sizes = {paths[i]: (h, w) for i, (r, h, w) in enumerate(checks) if r is None}
  return [i for i in range(len(paths)) if i not in drop], bad, sizes


# ---------------------------------------------------------------- tables (CSV / XLSX)


def read_table(path):
  """(header, [(row_number, cells)]) of a CSV or XLSX file; cells as stripped strings.

  row_number is the 1-based line / spreadsheet row (the header is row 1), so messages can point
  at the row in a spreadsheet program. Entirely empty rows are dropped.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext == '.csv':
    with open(path, newline='', encoding='utf-8-sig') as f:
      rows = [[c.strip() for c in r] for r in csv.reader(f)]
  elif ext in ('.xlsx', '.xlsm'):
    import openpyxl  # pylint: disable=g-import-not-at-top
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
      rows = [[_cell(c) for c in r] for r in wb.worksheets[0].iter_rows(values_only=True)]
    finally:
      wb.close()
  else:
    raise DataError(f'table {path}: unsupported extension {ext!r}; use .csv or .xlsx')
  if not rows:
    raise DataError(f'table {path} is empty (expected a header row)')
  header = rows[0]
  body = [(n + 2, r + [''] * (len(header) - len(r))) for n, r in enumerate(rows[1:])]
  return header, [(n, r) for n, r in body if any(r)]


def _cell(v):
  if v is None:
    return ''
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  return str(v).strip()


def one_hot_label(values, class_names, where):
  """Index of the single class marked 1 in `values` (strings); errors name `where`."""
  try:
    marks = [float(v) if v != '' else 0.0 for v in values]
  except ValueError:
    raise DataError(f'{where}: class columns {list(class_names)} must hold 0/1, got '
                     f'{list(values)}') from None
  on = [c for c, m in zip(class_names, marks) if m > 0.5]
  if len(on) != 1:
    what = 'no class' if not on else f'several classes {on}'
    raise DataError(f'{where}: marks {what} among {list(class_names)} (exactly one of the '
                     'one-hot columns must be 1); fix or drop the row')
  return list(class_names).index(on[0])
