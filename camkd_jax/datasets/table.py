"""A table (CSV/XLSX) of image paths and labels as a dataset (config.data.name = 'table').

config.data.table, .csv or .xlsx: one row per image, the image path in config.data.image_column
(relative to the table's folder, or absolute), the class either in config.data.label_column or
as one-hot columns (config.data.class_columns, default: the columns named by
config.data.class_names, else every column holding only 0/1), and an optional split column
(config.data.split_column; '' uses a column named 'split' when there is one). Without validation
rows, validation is carved out of train as for folders (camkd_jax.datasets.folder, which also
holds the class order and the checks both share). Errors are `base.DataError`s naming the row.
"""
import os

from absl import logging

from camkd_jax import parsing
from camkd_jax.datasets import base
from camkd_jax.datasets import folder

DataError = base.DataError

def _is_binary_column(rows, j):
  vals = {r[j] for r in rows}
  return bool(vals) and vals <= {'0', '1', '0.0', '1.0', ''} and vals & {'1', '1.0'}


def _sort_key(value):
  """Numeric labels sort as numbers (2 < 10), others as text."""
  try:
    return (0, float(value), value)
  except ValueError:
    return (1, 0.0, value)


def _rows_text(numbers):
  return 'row(s) ' + base.first_of(numbers)


class Table:
  """A read table: header, rows, 1-based row numbers and the column index."""

  def __init__(self, path):
    self.path = path
    self.header, numbered = base.read_table(path)
    self.rows = [r for _, r in numbered]
    self.numbers = [n for n, _ in numbered]
    self.col = {h: j for j, h in enumerate(self.header)}

  def where(self, i):
    return f'table {self.path}, row {self.numbers[i]}'

  def values(self, column):
    return [r[self.col[column]] for r in self.rows]

  def require(self, column, key):
    if column not in self.col:
      raise DataError(f'table {self.path}: no column {column!r} (config.data.{key}); columns: '
                      f'{self.header}')


def _split_column(t, config):
  """The split column's name, or '' when the table has none (then config.data.split_ratio)."""
  asked = str(folder.data_option(config, 'split_column', '') or '')
  if asked and asked not in t.col:
    raise DataError(f'table {t.path}: no split column {asked!r} (config.data.split_column); '
                    f'columns: {t.header}. Fix the name, or set config.data.split_column=\'\' '
                    'to split by config.data.split_ratio')
  return asked or ('split' if 'split' in t.col else '')


def _labels_from_column(t, column, config):
  """(class names, order given, labels, hints) from a label column."""
  t.require(column, 'label_column')
  values = t.values(column)
  empty = [t.numbers[i] for i, v in enumerate(values) if v == '']
  if empty:
    raise DataError(f'table {t.path}: empty label in column {column!r} in {_rows_text(empty)}; '
                    'fill or drop those rows')
  wanted = folder.wanted_classes(config)
  outside = [f'{t.numbers[i]} ({v!r})' for i, v in enumerate(values) if wanted and v not in wanted]
  if outside:
    raise DataError(f'table {t.path}: label(s) outside config.data.class_names={wanted} in '
                    f'{_rows_text(outside)}; fix those labels (a typo?) or list the class in '
                    'config.data.class_names')
  class_names, given = folder.order_classes(set(values), config, f'table {t.path}', _sort_key)
  labels = [class_names.index(v) for v in values]
  hints = {c: f'table {t.path}, ' + _rows_text([n for n, v in zip(t.numbers, values) if v == c])
           for c in class_names}
  return class_names, given, labels, hints


def _labels_from_one_hot(t, config, split_col, image_col):
  """(class names, True, labels, None) from one-hot 0/1 columns (their order is the order)."""
  wanted = folder.data_option(config, 'class_columns', '')
  columns = (parsing.split_list(wanted) if wanted
             else folder.wanted_classes(config))
  if columns:
    missing = [c for c in columns if c not in t.col]
    if missing:
      raise DataError(f'table {t.path}: class column(s) {missing} (config.data.class_columns or '
                      f'class_names) not in the header {t.header}')
  else:
    skip = {image_col, split_col}
    columns = [h for j, h in enumerate(t.header) if h not in skip and h
               and _is_binary_column(t.rows, j)]
    if len(columns) < 2:
      raise DataError(f'table {t.path}: set config.data.label_column, or give one-hot 0/1 '
                      f'class columns (found {columns}); columns: {t.header}')
  class_names, _ = folder.order_classes(set(columns), config, f'table {t.path}')
  if not folder.wanted_classes(config):
    class_names = columns  # the table's column order
  labels = [base.one_hot_label([r[t.col[c]] for c in class_names], class_names, t.where(i))
            for i, r in enumerate(t.rows)]
  return class_names, True, labels, None


def image_paths(t, image_col):
  """Absolute image paths of every row; one error lists every empty or missing path."""
  folder = os.path.dirname(os.path.abspath(t.path))
  paths, empty, missing = [], [], []
  for i, rel in enumerate(t.values(image_col)):
    p = rel if os.path.isabs(rel) else os.path.join(folder, rel)
    paths.append(os.path.normpath(p))
    if not rel:
      empty.append(t.numbers[i])
    elif not os.path.isfile(p):
      missing.append(f'{t.numbers[i]} ({rel!r})')
  if empty:
    raise DataError(f'table {t.path}: empty image path in column {image_col!r} in '
                    f'{_rows_text(empty)}')
  if missing:
    raise base.DataNotFoundError(
        f'table {t.path}: {len(missing)} image(s) not found, in {_rows_text(missing)} (paths '
        f'are relative to the table\'s folder {folder}); fix the paths or drop those rows')
  return paths


def _row_splits(t, split_col):
  """Split of every row ('' for all when the table has no split column)."""
  if not split_col:
    return [''] * len(t.rows)
  out, bad = [], []
  for i, v in enumerate(t.values(split_col)):
    out.append(folder.SPLIT_ALIASES.get(v.lower(), ''))
    if not out[-1]:
      bad.append(f'{t.numbers[i]} ({v!r})')
  if bad:
    raise DataError(f'table {t.path}: split values in column {split_col!r} that are not one of '
                    f'train, validation (val), test: {_rows_text(bad)}')
  return out


def _unique_rows(t, paths, labels, splits, class_names):
  """Indices of the rows to keep: exact duplicates dropped (warning); an image with two labels
  in one split, or in two splits (leakage), is an error naming it."""
  first, keep, dups, conflicts, leaks = {}, [], [], [], {}
  for i, p in enumerate(paths):
    key = os.path.realpath(p)
    j = first.setdefault(key, i)
    if j == i:
      keep.append(i)
    elif splits[i] != splits[j]:
      leaks.setdefault(key, {j: splits[j]})[i] = splits[i]
    elif labels[i] != labels[j]:
      conflicts.append(f'{t.values(t.image_col)[i]!r} (rows {t.numbers[j]} '
                       f'{class_names[labels[j]]}, {t.numbers[i]} {class_names[labels[i]]})')
    else:
      dups.append(t.numbers[i])
  if leaks:
    shown = [f'{t.values(t.image_col)[min(rows)]!r} (' + ', '.join(
        f'row {t.numbers[r]} {s}' for r, s in sorted(rows.items())) + ')'
             for rows in leaks.values()]
    raise DataError(f'table {t.path}: {len(leaks)} image(s) appear in more than one split '
                    f'(leakage: the metrics would be too good): {base.first_of(shown)}. Keep '
                    'each image in one split.')
  if conflicts:
    raise DataError(f'table {t.path}: {len(conflicts)} image(s) have different labels in '
                    f'different rows: {base.first_of(conflicts)}; keep one row per image')
  if dups:
    logging.warning('table %s: dropped %d duplicate row(s) (same image, label and split as an '
                    'earlier row): %s', t.path, len(dups), _rows_text(dups))
  return keep


def _check_table_splits(t, splits, split_col):
  """A table with a split column needs train and test rows (validation may be carved)."""
  missing = [s for s in ('train', 'test') if split_col and s not in splits]
  if missing:
    raise DataError(f'table {t.path}: no {" or ".join(missing)} rows in split column '
                    f'{split_col!r}; a table with a split column needs train and test rows '
                    '(validation is carved out of train when absent)')


def table_source(config):
  """Source over a CSV/XLSX table of image paths and labels (see module docstring)."""
  path = config.data.table
  if not path or not os.path.isfile(path):
    raise base.DataNotFoundError(
        f'table dataset: config.data.table={path!r} is not a file; pass a .csv or .xlsx as '
        '--config ...:dataset=table,table=FILE')
  t = Table(path)
  t.image_col = config.data.image_column
  t.require(t.image_col, 'image_column')
  split_col = _split_column(t, config)
  if config.data.label_column:
    class_names, given, labels, hints = _labels_from_column(t, config.data.label_column, config)
  else:
    class_names, given, labels, hints = _labels_from_one_hot(t, config, split_col, t.image_col)
  paths = image_paths(t, t.image_col)
  splits = _row_splits(t, split_col)
  keep = _unique_rows(t, paths, labels, splits, class_names)
  t.rows, t.numbers = [t.rows[i] for i in keep], [t.numbers[i] for i in keep]
  paths, labels, splits = ([x[i] for i in keep] for x in (paths, labels, splits))
  _check_table_splits(t, splits, split_col)
  origin = [f'table column {split_col}'] * len(paths)
  slide_col = str(folder.data_option(config, 'slide_column', '') or '')
  if slide_col:
    t.require(slide_col, 'slide_column')
  slide_col = slide_col or ('slide' if 'slide' in t.col else '')
  slides = t.values(slide_col) if slide_col else None
  if slides is not None and '' in slides:
    raise DataError(f'table {t.path}: empty slide in column {slide_col!r} in '
                    f'{_rows_text([n for n, v in zip(t.numbers, slides) if not v])}; fill them '
                    'or drop the column')
  return folder.make_source('table', path, class_names, paths, labels, splits, origin, config,
                            slides=slides, order_given=given, hints=hints)
