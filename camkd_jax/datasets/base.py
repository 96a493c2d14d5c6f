"""What every dataset hands to the input pipeline: labelled examples of one split.

A `Source` answers two questions: how many examples a split has, and "give me examples
[start, stop) of split s" as encoded image bytes (TFDS datasets) or file paths (bring-your-own
folders and tables). The pipeline only ever sees `Examples`, so all datasets are treated alike.
"""
import concurrent.futures
import csv
import dataclasses
import io
import os
from typing import Optional, Sequence

import numpy as np

SPLITS = ('train', 'validation', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')


@dataclasses.dataclass
class Examples:
  """A run of examples of one split.

  items: encoded images (bytes) or, when `from_files`, file paths (str).
  labels: int32 class indices.
  names: how to call each example in an error message (a path or an image name).
  """
  items: list
  labels: np.ndarray
  names: list
  from_files: bool

  def __len__(self):
    return len(self.labels)

  def slice(self, start, stop):
    return Examples(self.items[start:stop], self.labels[start:stop], self.names[start:stop],
                    self.from_files)

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

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  def read(self, split: str, start: int = 0, stop: Optional[int] = None) -> Examples:
    raise NotImplementedError


class ListSource(Source):
  """A source whose splits are already listed in memory (folder and table datasets)."""

  def __init__(self, name, class_names, splits, skipped_names=()):
    self.name = name
    self.class_names = list(class_names)
    self._splits = splits
    self.skipped_names = list(skipped_names)
    self.skipped = len(self.skipped_names)

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


def check_image(data: bytes) -> Optional[str]:
  """None if `data` decodes to an image, else the reason it does not."""
  try:
    decode_with_pil(data)
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'


def find_unreadable(paths: Sequence[str], workers: int = 0) -> list:
  """[(index, reason)] for the files that are missing or do not decode (PIL, threaded)."""
  def one(path):
    try:
      with open(path, 'rb') as f:
        return check_image(f.read())
    except OSError as e:
      return f'{type(e).__name__}: {e}'
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(one, paths))
  return [(i, r) for i, r in enumerate(reasons) if r is not None]


def corrupt_message(name, reason):
  return (f'cannot decode image {name} ({reason}). Replace or remove the file, or set '
          'config.data.skip_corrupt=True to skip unreadable images.')


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
    raise ValueError(f'table {path}: unsupported extension {ext!r}; use .csv or .xlsx')
  if not rows:
    raise ValueError(f'table {path} is empty (expected a header row)')
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
    raise ValueError(f'{where}: class columns {list(class_names)} must hold 0/1, got '
                     f'{list(values)}') from None
  on = [c for c, m in zip(class_names, marks) if m > 0.5]
  if len(on) != 1:
    what = 'no class' if not on else f'several classes {on}'
    raise ValueError(f'{where}: marks {what} among {list(class_names)} (exactly one of the '
                     'one-hot columns must be 1); fix or drop the row')
  return list(class_names).index(on[0])
