"""Bring-your-own patches: a folder per class, or a table (CSV/XLSX) of image paths and labels.

These are plain file lists (no TFDS build step): the pipeline reads and decodes the files itself,
so a new folder of patches is usable at once.

Folder layouts (config.data.root):
  root/<split>/<class>/*.png|jpg|jpeg|tif|tiff   split = train, validation (or val), test; without
                                                 a validation folder, config.data.val_fraction of
                                                 each class of train is held out (seeded)
  root/<class>/*                                 split drawn per class by config.data.split_ratio

Table (config.data.table, .csv or .xlsx): one row per image, the image path in
config.data.image_column (relative to the table's folder, or absolute), the class either in
config.data.label_column or as one-hot columns (config.data.class_columns, default: the columns
named by config.data.class_names, else every column holding only 0/1), and an optional split
column (config.data.split_column; '' uses a column named 'split' when there is one). Without
validation rows, validation is carved out of train as for folders.

Class order: config.data.class_names ('NC,G3,G4,G5') fixes it and must match the data's classes
exactly; otherwise folder names and label values are sorted (numbers as numbers) and one-hot
columns keep the table's order. Every image is decoded once up front (in parallel, cached on
path, size and mtime): all unreadable files are reported in one error, or skipped with
config.data.skip_corrupt=True. Errors are `base.DataError`s naming the folder, file or row.
"""
import os

from absl import logging
import numpy as np

from camkd_jax import parsing
from camkd_jax.datasets import base

DataError = base.DataError
SPLIT_ALIASES = {'train': 'train', 'training': 'train', 'validation': 'validation',
                 'val': 'validation', 'valid': 'validation', 'test': 'test'}


def _opt(config, key, default):
  """config.data.<key> if the config has it (older configs may not)."""
  return config.data.get(key, default) if hasattr(config.data, 'get') else default


def _is_image_name(name):
  return not name.startswith('.') and name.lower().endswith(base.IMAGE_EXTENSIONS)


def list_images(directory, recursive=True):
  """Image files in `directory` (and its sub-folders when `recursive`), sorted, hidden files
  ignored."""
  if not recursive:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if _is_image_name(f) and os.path.isfile(os.path.join(directory, f)))
  out = []
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    out += [os.path.join(dirpath, f) for f in filenames if _is_image_name(f)]
  return sorted(out)


def list_folders(path):
  """The sub-folders of `path`, sorted, hidden ones ignored."""
  return sorted(d for d in os.listdir(path)
                if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))


# ---------------------------------------------------------------- classes and splits


def wanted_classes(config):
  """config.data.class_names as a list ([] when not set)."""
  text = str(_opt(config, 'class_names', '') or '')
  names = parsing.split_list(text)
  twice = sorted({c for c in names if names.count(c) > 1})
  if twice:
    raise DataError(f'config.data.class_names={text!r} lists {twice} more than once')
  return names


def order_classes(found, config, where, sort_key=None):
  """(class names in order, whether the order was given) for the classes `found` in the data.

  With config.data.class_names the data's classes must be exactly those; else they are sorted.
  """
  wanted = wanted_classes(config)
  if not wanted:
    return sorted(found, key=sort_key), False
  missing = [c for c in wanted if c not in found]
  extra = sorted(set(found) - set(wanted), key=sort_key)
  if missing or extra:
    parts = ([f'listed but not in the data: {missing}'] if missing else []) + (
        [f'in the data but not listed: {extra}'] if extra else [])
    raise DataError(f'{where}: the classes do not match config.data.class_names='
                    f'{",".join(wanted)!r}; {"; ".join(parts)}. Fix the data or '
                    'config.data.class_names (every class exactly once, in order).')
  return wanted, True


def carve_validation(labels, train_idx, num_classes, fraction, seed):
  """(train, validation) indices: `fraction` of each class of `train_idx` goes to validation.

  Stratified and seeded; a class with two or more train examples keeps at least one in each.
  """
  if not 0 < fraction < 1:
    raise DataError(f'config.data.val_fraction={fraction} must lie strictly between 0 and 1 '
                    '(the share of each class of train held out for validation)')
  labels, train_idx = np.asarray(labels), np.asarray(train_idx, np.int64)
  rng = np.random.default_rng(seed)
  train, val = [], []
  for k in range(num_classes):
    idx = rng.permutation(train_idx[labels[train_idx] == k])
    n_val = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1) if len(idx) > 1 else 0
    val += list(idx[:n_val])
    train += list(idx[n_val:])
  return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


def seeded_split(labels, num_classes, ratio, seed):
  """Per-class (stratified) split of indices by `ratio` = (train, val, test) fractions."""
  ratio = np.asarray(ratio, np.float64)
  if ratio.shape != (3,) or (ratio < 0).any() or ratio.sum() <= 0:
    raise DataError(f'config.data.split_ratio must be three non-negative fractions '
                     f'(train, validation, test), got {tuple(ratio)}')
  ratio = ratio / ratio.sum()
  rng = np.random.default_rng(seed)
  parts = {s: [] for s in base.SPLITS}
  for k in range(num_classes):
    idx = rng.permutation(np.flatnonzero(labels == k))
    n_train = int(round(ratio[0] * len(idx)))
    n_val = int(round(ratio[1] * len(idx)))
    n_val = min(n_val, len(idx) - n_train)
    parts['train'] += list(idx[:n_train])
    parts['validation'] += list(idx[n_train:n_train + n_val])
    parts['test'] += list(idx[n_train + n_val:])
  return {s: np.sort(np.asarray(v, np.int64)) for s, v in parts.items()}


def _split_indices(labels, splits, origin, class_names, config):
  """{split: indices} from each file's split ('' everywhere: config.data.split_ratio); carves
  validation out of train when there is none (updates `origin`)."""
  labels = np.asarray(labels)
  if not any(splits):
    origin[:] = ['seeded split (config.data.split_ratio)'] * len(labels)
    return seeded_split(labels, len(class_names), config.data.split_ratio,
                        _opt(config, 'split_seed', 0))
  split_of = {s: np.asarray([i for i, x in enumerate(splits) if x == s], np.int64)
              for s in base.SPLITS}
  if not len(split_of['validation']):
    _carve(labels, split_of, origin, class_names, config)
  return split_of


def _carve(labels, split_of, origin, class_names, config):
  """Moves config.data.val_fraction of every train class to validation (in place)."""
  fraction = float(_opt(config, 'val_fraction', 0.15))
  seed = _opt(config, 'split_seed', 0)
  counts = np.bincount(labels[split_of['train']], minlength=len(class_names))
  few = {class_names[k]: int(n) for k, n in enumerate(counts) if n == 1}
  if few:
    raise DataError(f'class(es) {list(few)} have a single train image ({few}): too few to hold '
                    'one out for validation (there is no validation split); add images, or '
                    'give a validation folder / validation rows')
  train, val = carve_validation(labels, split_of['train'], len(class_names), fraction, seed)
  split_of['train'], split_of['validation'] = train, val
  for i in val:
    origin[int(i)] = f'carved from train (config.data.val_fraction={fraction:g})'
  logging.info('no validation split given: held out %d of %d train images for validation, '
               'the same share of every class (config.data.val_fraction=%g, '
               'config.data.split_seed=%s)', len(val), len(val) + len(train), fraction, seed)


def _finish(name, where, class_names, paths, labels, splits, origin, config, slides=None,
            **extra):
  """Checks every image, splits the readable ones and builds the ListSource (with the record
  of which file went where). `slides`: the slide of each image (a table's slide column)."""
  keep, bad, sizes = base.readable_files(list(paths), f'{name} dataset {where}',
                                         config.data.skip_corrupt, cache_key=where)
  skipped = [(paths[i], class_names[labels[i]], 'skipped', f'{splits[i] or "any"}: {r}')
             for i, r in bad]
  paths, splits, origin = ([x[i] for i in keep] for x in (paths, splits, origin))
  slides = None if slides is None else [slides[i] for i in keep]
  labels = np.asarray(labels, np.int32)[keep]
  split_of = _split_indices(labels, splits, origin, class_names, config)
  parts, records = {}, []
  for s in base.SPLITS:
    idx = [int(i) for i in split_of[s]]
    parts[s] = base.Examples([paths[i] for i in idx], labels[idx], [paths[i] for i in idx],
                             from_files=True,
                             slides=None if slides is None else [slides[i] for i in idx])
    records += [(paths[i], class_names[labels[i]], s, origin[i]) for i in idx]
  return base.ListSource(name, class_names, parts, [r[0] for r in skipped],
                         records=records + skipped, image_sizes=sizes, **extra)


LAYOUT = ('root/<split>/<class>/*.png|jpg|jpeg|tif|tiff (split = train, test and optionally '
          'validation or val) or root/<class>/*')


def _split_folders(root, subdirs, split_dirs):
  """{split: folder name}; train and test are required, validation is optional."""
  others = [d for d in subdirs if d not in split_dirs]
  if others:
    raise DataError(f'folder dataset {root}: mixes split folders {sorted(split_dirs)} with '
                    f'other folders {others}; expected {LAYOUT}')
  found = {}
  for d, split in split_dirs.items():
    if split in found:
      raise DataError(f'folder dataset {root}: both {found[split]!r} and {d!r} name the '
                      f'{split} split; keep one')
    found[split] = d
  missing = [s for s in ('train', 'test') if s not in found]
  if missing:
    raise base.DataNotFoundError(f'folder dataset {root}: no folder for split(s) {missing} '
                                 f'(found {sorted(split_dirs)}); expected {LAYOUT}')
  return found


def _from_split_folders(root, found, config):
  classes = {c for d in found.values() for c in list_folders(os.path.join(root, d))}
  if not classes:
    raise base.DataNotFoundError(f'folder dataset {root}: no class folders inside the split '
                                 'folders')
  class_names, given = order_classes(classes, config, f'folder dataset {root}')
  paths, labels, splits = [], [], []
  for split in [s for s in base.SPLITS if s in found]:
    for k, c in enumerate(class_names):
      files = list_images(os.path.join(root, found[split], c))
      paths += files
      labels += [k] * len(files)
      splits += [split] * len(files)
  if not paths:
    raise base.DataNotFoundError(f'folder dataset {root}: no image files '
                                 f'({", ".join(base.IMAGE_EXTENSIONS)})')
  origin = [f'folder {found[s]}/' for s in splits]
  return class_names, given, paths, labels, splits, origin


def _from_class_folders(root, subdirs, config):
  class_names, given = order_classes(set(subdirs), config, f'folder dataset {root}')
  if not class_names:
    raise base.DataNotFoundError(f'folder dataset {root}: no class folders; expected {LAYOUT}')
  paths, labels = [], []
  for k, c in enumerate(class_names):
    files = list_images(os.path.join(root, c))
    if not files:
      raise base.DataNotFoundError(f'folder dataset {root}: class folder {c!r} holds no image '
                                   f'files ({", ".join(base.IMAGE_EXTENSIONS)})')
    paths += files
    labels += [k] * len(files)
  return class_names, given, paths, labels, [''] * len(paths), [''] * len(paths)


def folder_source(config):
  """Source over root/<split>/<class>/* or root/<class>/* (see module docstring)."""
  root = config.data.root
  if not root or not os.path.isdir(root):
    raise base.DataNotFoundError(
        f'folder dataset: config.data.root={root!r} is not a directory. Expected {LAYOUT}; '
        'pass it as --config ...:dataset=folder,root=DIR')
  subdirs = list_folders(root)
  split_dirs = {d: SPLIT_ALIASES[d.lower()] for d in subdirs if d.lower() in SPLIT_ALIASES}
  if split_dirs:
    found = _split_folders(root, subdirs, split_dirs)
    parts = _from_split_folders(root, found, config)
  else:
    parts = _from_class_folders(root, subdirs, config)
  class_names, given, paths, labels, splits, origin = parts
  return _finish('folder', root, class_names, paths, labels, splits, origin, config,
                 order_given=given)


# ---------------------------------------------------------------- tables


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
  asked = str(_opt(config, 'split_column', '') or '')
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
  wanted = wanted_classes(config)
  outside = [f'{t.numbers[i]} ({v!r})' for i, v in enumerate(values) if wanted and v not in wanted]
  if outside:
    raise DataError(f'table {t.path}: label(s) outside config.data.class_names={wanted} in '
                    f'{_rows_text(outside)}; fix those labels (a typo?) or list the class in '
                    'config.data.class_names')
  class_names, given = order_classes(set(values), config, f'table {t.path}', _sort_key)
  labels = [class_names.index(v) for v in values]
  hints = {c: f'table {t.path}, ' + _rows_text([n for n, v in zip(t.numbers, values) if v == c])
           for c in class_names}
  return class_names, given, labels, hints


def _labels_from_one_hot(t, config, split_col, image_col):
  """(class names, True, labels, None) from one-hot 0/1 columns (their order is the order)."""
  wanted = _opt(config, 'class_columns', '')
  columns = (parsing.split_list(wanted) if wanted
             else wanted_classes(config))
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
  class_names, _ = order_classes(set(columns), config, f'table {t.path}')
  if not wanted_classes(config):
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
    out.append(SPLIT_ALIASES.get(v.lower(), ''))
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
  slide_col = str(_opt(config, 'slide_column', '') or '')
  if slide_col:
    t.require(slide_col, 'slide_column')
  slide_col = slide_col or ('slide' if 'slide' in t.col else '')
  slides = t.values(slide_col) if slide_col else None
  if slides is not None and '' in slides:
    raise DataError(f'table {t.path}: empty slide in column {slide_col!r} in '
                    f'{_rows_text([n for n, v in zip(t.numbers, slides) if not v])}; fill them '
                    'or drop the column')
  return _finish('table', path, class_names, paths, labels, splits, origin, config,
                 slides=slides, order_given=given, hints=hints)
