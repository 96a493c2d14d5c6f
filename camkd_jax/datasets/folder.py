"""Bring-your-own patches: a folder per class, or a table (CSV/XLSX) of image paths and labels.

These are plain file lists (no TFDS build step): the pipeline reads and decodes the files itself,
so a new folder of patches is usable at once.

Folder layouts (config.data.root):
  root/<split>/<class>/*.png|jpg|jpeg|tif|tiff   split = train, validation (or val), test
  root/<class>/*                                 split drawn per class by config.data.split_ratio

Table (config.data.table, .csv or .xlsx): one row per image, the image path in
config.data.image_column (relative to the table's folder, or absolute), the class either in
config.data.label_column or as one-hot columns (config.data.class_columns, default: every column
holding only 0/1), and an optional split column (config.data.split_column, default 'split').
Class names come from the data: sorted folder names, sorted label values, or the one-hot columns.
"""
import os

from absl import logging
import numpy as np

from camkd_jax.datasets import base

SPLIT_ALIASES = {'train': 'train', 'training': 'train', 'validation': 'validation',
                 'val': 'validation', 'valid': 'validation', 'test': 'test'}


def _opt(config, key, default):
  """config.data.<key> if the config has it (older configs may not)."""
  return config.data.get(key, default) if hasattr(config.data, 'get') else default


def _list_images(directory):
  """Image files under `directory` (recursively), sorted, hidden files ignored."""
  out = []
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    out += [os.path.join(dirpath, f) for f in filenames
            if not f.startswith('.') and f.lower().endswith(base.IMAGE_EXTENSIONS)]
  return sorted(out)


def _subdirs(path):
  return sorted(d for d in os.listdir(path)
                if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))


def seeded_split(labels, num_classes, ratio, seed):
  """Per-class (stratified) split of indices by `ratio` = (train, val, test) fractions."""
  ratio = np.asarray(ratio, np.float64)
  if ratio.shape != (3,) or (ratio < 0).any() or ratio.sum() <= 0:
    raise ValueError(f'config.data.split_ratio must be three non-negative fractions '
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


def _finish(name, class_names, paths, labels, split_of, config):
  """Builds the ListSource; with skip_corrupt, drops the files that do not decode first."""
  paths, labels = list(paths), np.asarray(labels, np.int32)
  skipped = []
  if config.data.skip_corrupt:
    bad = base.find_unreadable(paths)
    skipped = [paths[i] for i, _ in bad]
    if bad:
      logging.warning('skipped %d unreadable image(s) (config.data.skip_corrupt=True), e.g. '
                      '%s: %s', len(bad), paths[bad[0][0]], bad[0][1])
    drop = {i for i, _ in bad}
  else:
    drop = set()
  splits = {}
  for split in base.SPLITS:
    keep = [int(i) for i in split_of[split] if int(i) not in drop]
    splits[split] = base.Examples([paths[i] for i in keep], labels[keep],
                                  [paths[i] for i in keep], from_files=True)
  return base.ListSource(name, class_names, splits, skipped)


def folder_source(config):
  """Source over root/<split>/<class>/* or root/<class>/* (see module docstring)."""
  root = config.data.root
  layout = ('root/<split>/<class>/*.png|jpg|jpeg|tif|tiff (split = train, validation or val, '
            'test) or root/<class>/*')
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f'folder dataset: config.data.root={root!r} is not a directory. '
                            f'Expected {layout}; pass it as --config ...:dataset=folder,root=DIR')
  subdirs = _subdirs(root)
  split_dirs = {d: SPLIT_ALIASES[d.lower()] for d in subdirs if d.lower() in SPLIT_ALIASES}
  if split_dirs:
    others = [d for d in subdirs if d not in split_dirs]
    if others:
      raise ValueError(f'folder dataset {root}: mixes split folders {sorted(split_dirs)} with '
                       f'other folders {others}; expected {layout}')
    found = {}
    for d, split in split_dirs.items():
      if split in found:
        raise ValueError(f'folder dataset {root}: both {found[split]!r} and {d!r} name the '
                         f'{split} split; keep one')
      found[split] = d
    missing = [s for s in base.SPLITS if s not in found]
    if missing:
      raise FileNotFoundError(f'folder dataset {root}: no folder for split(s) {missing} '
                              f'(found {sorted(split_dirs)}); expected {layout}')
    class_names = sorted({c for d in found.values() for c in _subdirs(os.path.join(root, d))})
    if not class_names:
      raise FileNotFoundError(f'folder dataset {root}: no class folders inside the split folders')
    paths, labels, split_of = [], [], {}
    for split in base.SPLITS:
      start = len(paths)
      for k, c in enumerate(class_names):
        files = _list_images(os.path.join(root, found[split], c))
        paths += files
        labels += [k] * len(files)
      split_of[split] = np.arange(start, len(paths))
    if not paths:
      raise FileNotFoundError(f'folder dataset {root}: no image files ({base.IMAGE_EXTENSIONS})')
  else:
    class_names = subdirs
    if not class_names:
      raise FileNotFoundError(f'folder dataset {root}: no class folders; expected {layout}')
    paths, labels = [], []
    for k, c in enumerate(class_names):
      files = _list_images(os.path.join(root, c))
      if not files:
        raise FileNotFoundError(f'folder dataset {root}: class folder {c!r} holds no image '
                                f'files ({", ".join(base.IMAGE_EXTENSIONS)})')
      paths += files
      labels += [k] * len(files)
    split_of = seeded_split(np.asarray(labels), len(class_names), config.data.split_ratio,
                            _opt(config, 'split_seed', 0))
  return _finish('folder', class_names, paths, labels, split_of, config)


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


def table_source(config):
  """Source over a CSV/XLSX table of image paths and labels (see module docstring)."""
  path = config.data.table
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'table dataset: config.data.table={path!r} is not a file; pass a '
                            '.csv or .xlsx as --config ...:dataset=table,table=FILE')
  header, numbered = base.read_table(path)
  rows = [r for _, r in numbered]
  row_number = [n for n, _ in numbered]
  folder = os.path.dirname(os.path.abspath(path))
  col = {h: j for j, h in enumerate(header)}
  image_col = config.data.image_column
  if image_col not in col:
    raise ValueError(f'table {path}: no image column {image_col!r} (config.data.image_column); '
                     f'columns: {header}')
  split_col = _opt(config, 'split_column', 'split')
  label_col = config.data.label_column
  where = lambda i: f'table {path}, row {row_number[i]}'
  if label_col:
    if label_col not in col:
      raise ValueError(f'table {path}: no label column {label_col!r} (config.data.label_column);'
                       f' columns: {header}')
    values = [r[col[label_col]] for r in rows]
    for i, v in enumerate(values):
      if v == '':
        raise ValueError(f'{where(i)}: empty label in column {label_col!r}; fill or drop the row')
    class_names = sorted(set(values), key=_sort_key)
    labels = [class_names.index(v) for v in values]
  else:
    wanted = _opt(config, 'class_columns', '')
    if wanted:
      class_names = [c.strip() for c in wanted.split(',') if c.strip()]
      missing = [c for c in class_names if c not in col]
      if missing:
        raise ValueError(f'table {path}: class column(s) {missing} (config.data.class_columns) '
                         f'not in the header {header}')
    else:
      skip = {image_col, split_col}
      class_names = [h for j, h in enumerate(header) if h not in skip and h
                     and _is_binary_column(rows, j)]
      if len(class_names) < 2:
        raise ValueError(f'table {path}: set config.data.label_column, or give one-hot 0/1 '
                         f'class columns (found {class_names}); columns: {header}')
    labels = [base.one_hot_label([r[col[c]] for c in class_names], class_names, where(i))
              for i, r in enumerate(rows)]
  paths = []
  for i, r in enumerate(rows):
    rel = r[col[image_col]]
    if not rel:
      raise ValueError(f'{where(i)}: empty image path in column {image_col!r}')
    p = rel if os.path.isabs(rel) else os.path.join(folder, rel)
    if not os.path.isfile(p):
      raise FileNotFoundError(f'{where(i)}: image {rel!r} not found (looked for {p}; paths are '
                              'relative to the table\'s folder)')
    paths.append(p)
  if split_col in col:
    split_of = {s: [] for s in base.SPLITS}
    for i, r in enumerate(rows):
      s = SPLIT_ALIASES.get(r[col[split_col]].lower())
      if s is None:
        raise ValueError(f'{where(i)}: split {r[col[split_col]]!r} in column {split_col!r} is '
                         'not one of train, validation (val), test')
      split_of[s].append(i)
    split_of = {s: np.asarray(v, np.int64) for s, v in split_of.items()}
  else:
    split_of = seeded_split(np.asarray(labels), len(class_names), config.data.split_ratio,
                            _opt(config, 'split_seed', 0))
  return _finish('table', class_names, paths, labels, split_of, config)
