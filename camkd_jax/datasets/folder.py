"""Bring-your-own patches: a folder per class (and what the table dataset shares with it).

These are plain file lists (no TFDS build step): the pipeline reads and decodes the files itself,
so a new folder of patches is usable at once.

Folder layouts (config.data.root):
  root/<split>/<class>/*.png|jpg|jpeg|tif|tiff   split = train, validation (or val), test; without
                                                 a validation folder, config.data.val_fraction of
                                                 each class of train is held out (seeded)
  root/<class>/*                                 split drawn per class by config.data.split_ratio

A table (CSV/XLSX) of image paths and labels: camkd_jax.datasets.table, built on the class order,
splits and checks of this module.

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


def data_option(config, key, default):
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
  text = str(data_option(config, 'class_names', '') or '')
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
                        data_option(config, 'split_seed', 0))
  split_of = {s: np.asarray([i for i, x in enumerate(splits) if x == s], np.int64)
              for s in base.SPLITS}
  if not len(split_of['validation']):
    _carve(labels, split_of, origin, class_names, config)
  return split_of


def _carve(labels, split_of, origin, class_names, config):
  """Moves config.data.val_fraction of every train class to validation (in place)."""
  fraction = float(data_option(config, 'val_fraction', 0.15))
  seed = data_option(config, 'split_seed', 0)
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


def make_source(name, where, class_names, paths, labels, splits, origin, config, slides=None,
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
  return make_source('folder', root, class_names, paths, labels, splits, origin, config,
                     order_given=given)
