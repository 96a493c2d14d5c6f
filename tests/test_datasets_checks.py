"""Own data (folders and tables): the bad-input matrix, the carved validation split, class order,
the up-front image check and its cache, 'auto' input statistics and the resize warning.

Every case writes its own tiny fixture (8x8 PNGs, a CSV) into tmp_path and asserts the fragments
of the one message a user sees (the file, row, class or key at fault, and what to do).
"""
import csv
import logging
import os

import numpy as np
from PIL import Image
import pytest

from camkd_jax import datasets
from camkd_jax import input_pipeline as ip
from camkd_jax.datasets import base
from camkd_jax.datasets import folder
from configs import base as base_config
from helpers import set_fields


def _config(**over):
  c = base_config.base_config('smoke=1')
  c.image_size, c.magnification, c.batch_size, c.eval_batch_size = 8, 5.0, 2, 4
  return set_fields(c, **over)


def _img(seed, h=8, w=8):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _write(path, arr):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path)


def make_folder(root, layout, size=(8, 8)):
  """layout: {split: {class: count}}; image i of class k of split s has its own seed."""
  for s, classes in layout.items():
    for k, (c, n) in enumerate(classes.items()):
      for i in range(n):
        seed = sum(map(ord, s)) * 1000 + 100 * k + i
        _write(os.path.join(root, s, c, f'{i:02d}.png'), _img(seed, *size))
  return str(root)


def make_table(root, rows, header=('image', 'label', 'split')):
  """rows: (image name, label, split); writes every image once, the table as t.csv."""
  for r in rows:
    p = os.path.join(root, r[0])
    if not os.path.exists(p):
      _write(p, _img(len(r[0]) + sum(map(ord, r[0]))))
  path = os.path.join(root, 't.csv')
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


def _table_rows(n_per=3, classes=('a', 'b')):
  """Valid rows: n_per images per class in each of train/val/test (rows 2 .. in that order)."""
  return [(f'img/{s}_{c}_{i}.png', c, s) for s in ('train', 'val', 'test') for c in classes
          for i in range(n_per)]


TRAIN_TEST = {'train': {'a': 4, 'b': 4}, 'test': {'a': 2, 'b': 2}}


def _source(**over):
  return datasets.get_source(_config(**over))


def _data(**over):
  return ip.get_data(_config(**over), process_index=0, process_count=1)


# ----------------------------------------------------------------------------- the matrix
def case_no_test_folder(tmp):
  make_folder(tmp, {'train': {'a': 2, 'b': 2}})
  return dict(**{'data.name': 'folder', 'data.root': str(tmp)})


def case_class_names_mismatch(tmp):
  make_folder(tmp, {'train': {'a': 2, 'b': 2, 'd': 2}, 'test': {'a': 1, 'b': 1, 'd': 1}})
  return {'data.name': 'folder', 'data.root': str(tmp), 'data.class_names': 'a,b,c'}


def case_class_names_twice(tmp):
  make_folder(tmp, TRAIN_TEST)
  return {'data.name': 'folder', 'data.root': str(tmp), 'data.class_names': 'a,b,a'}


def case_class_missing_from_test(tmp):
  make_folder(tmp, {'train': {'a': 4, 'b': 4}, 'test': {'a': 2}})
  return {'data.name': 'folder', 'data.root': str(tmp)}


def case_class_too_small_for_validation(tmp):
  make_folder(tmp, {'train': {'a': 4, 'b': 1}, 'test': {'a': 1, 'b': 1}})
  return {'data.name': 'folder', 'data.root': str(tmp)}


def case_corrupt_images(tmp):
  make_folder(tmp, {'train': {'a': 8, 'b': 8}, 'test': {'a': 2, 'b': 2}})
  for i in range(6):  # 12 bad files: truncated PNGs and text named .png
    p = tmp / 'train' / 'a' / f'{i:02d}.png'
    p.write_bytes(p.read_bytes()[:60])
    (tmp / 'train' / 'b' / f'{i:02d}.png').write_text('not an image')
  return {'data.name': 'folder', 'data.root': str(tmp)}


def case_bad_val_fraction(tmp):
  make_folder(tmp, TRAIN_TEST)
  return {'data.name': 'folder', 'data.root': str(tmp), 'data.val_fraction': 1.0}


def case_label_outside_class_names(tmp):
  rows = _table_rows()
  rows[4] = (rows[4][0], 'bb', 'train')  # row 6 of the file (header = row 1)
  rows[10] = (rows[10][0], 'c', 'test')  # row 12
  return {'data.name': 'table', 'data.table': make_table(tmp, rows),
          'data.label_column': 'label', 'data.class_names': 'a,b'}


def case_typo_without_class_names(tmp):
  rows = _table_rows()
  rows[1] = (rows[1][0], 'A', 'train')  # row 3: a new class only in train
  return {'data.name': 'table', 'data.table': make_table(tmp, rows),
          'data.label_column': 'label'}


def case_split_column_missing(tmp):
  return {'data.name': 'table', 'data.table': make_table(tmp, _table_rows()),
          'data.label_column': 'label', 'data.split_column': 'fold'}


def case_leakage(tmp):
  rows = _table_rows()
  rows.append((rows[0][0], 'a', 'test'))   # row 20: train image 1 again, in test
  rows.append((rows[7][0], 'a', 'train'))  # row 21: val image again, in train
  return {'data.name': 'table', 'data.table': make_table(tmp, rows),
          'data.label_column': 'label'}


def case_two_labels(tmp):
  rows = _table_rows()
  rows.append((rows[0][0], 'b', 'train'))  # row 20
  return {'data.name': 'table', 'data.table': make_table(tmp, rows),
          'data.label_column': 'label'}


def case_missing_images(tmp):
  path = make_table(tmp, _table_rows())
  os.remove(tmp / 'img' / 'train_a_1.png')
  os.remove(tmp / 'img' / 'test_b_2.png')
  return {'data.name': 'table', 'data.table': path, 'data.label_column': 'label'}


def case_no_test_rows(tmp):
  rows = [r for r in _table_rows() if r[2] != 'test']
  return {'data.name': 'table', 'data.table': make_table(tmp, rows),
          'data.label_column': 'label'}


def case_bad_split_value(tmp):
  rows = _table_rows()
  rows[2] = (rows[2][0], 'a', 'tset')  # row 4
  return {'data.name': 'table', 'data.table': make_table(tmp, rows),
          'data.label_column': 'label'}


def case_half_auto_inputs(tmp):
  make_folder(tmp, TRAIN_TEST)
  return {'data.name': 'folder', 'data.root': str(tmp), 'model.input_mean': 'auto',
          'model.input_std': (0.2, 0.2, 0.2)}


# (case, exception type, message fragments)
MATRIX = [
    (case_no_test_folder, base.DataNotFoundError,
     ["no folder for split(s) ['test']", 'expected root/<split>/<class>']),
    (case_class_names_mismatch, base.DataError,
     ["do not match config.data.class_names='a,b,c'", "listed but not in the data: ['c']",
      "in the data but not listed: ['d']"]),
    (case_class_names_twice, base.DataError, ["class_names='a,b,a' lists ['a'] more than once"]),
    (case_class_missing_from_test, base.DataError,
     ["class(es) ['b'] have no test examples", "test counts {'a': 2, 'b': 0}"]),
    (case_class_too_small_for_validation, base.DataError,
     ["class(es) ['b'] have a single train image ({'b': 1}): too few to hold one out for "
      'validation']),
    (case_corrupt_images, base.DataError,
     ['12 of 20 image(s) cannot be read or decoded', 'train/a/00.png (OSError: image file is '
      'truncated', 'train/b/00.png (UnidentifiedImageError: not an image format PIL can read)',
      '... and 2 more', 'config.data.skip_corrupt=True']),
    (case_bad_val_fraction, base.DataError,
     ['config.data.val_fraction=1.0 must lie strictly between 0 and 1']),
    (case_label_outside_class_names, base.DataError,
     ["label(s) outside config.data.class_names=['a', 'b'] in row(s) 6 ('bb'), 12 ('c')",
      'a typo?']),
    (case_typo_without_class_names, base.DataError,
     ["class(es) ['A'] have no validation examples", 't.csv, row(s) 3', 'a typo?']),
    (case_split_column_missing, base.DataError,
     ["no split column 'fold' (config.data.split_column)", "columns: ['image', 'label', 'split']"]),
    (case_leakage, base.DataError,
     ['2 image(s) appear in more than one split', "'img/train_a_0.png' (row 2 train, row 20 "
      "test)", "'img/val_a_1.png' (row 9 validation, row 21 train)", 'Keep each image in one']),
    (case_two_labels, base.DataError,
     ["1 image(s) have different labels", "'img/train_a_0.png' (rows 2 a, 20 b)"]),
    (case_missing_images, base.DataNotFoundError,
     ["2 image(s) not found, in row(s) 3 ('img/train_a_1.png'), 19 ('img/test_b_2.png')"]),
    (case_no_test_rows, base.DataError, ["no test rows in split column 'split'"]),
    (case_bad_split_value, base.DataError,
     ["split values in column 'split' that are not one of train, validation (val), test: "
      "row(s) 4 ('tset')"]),
    (case_half_auto_inputs, base.DataError,
     ["input_mean='auto' and input_std=(0.2, 0.2, 0.2): set both to 'auto'"]),
]


@pytest.mark.parametrize('case, error, fragments', MATRIX, ids=[m[0].__name__[5:] for m in MATRIX])
def test_bad_input_matrix(tmp_path, case, error, fragments):
  over = case(tmp_path)
  with pytest.raises(error) as info:
    _data(**over)
  msg = str(info.value)
  for fragment in fragments:
    assert fragment in msg, (fragment, msg)
  assert 'Traceback' not in msg


def test_duplicate_rows_warn_with_count_and_are_dropped(tmp_path, caplog):
  rows = _table_rows()
  rows += [rows[0], rows[0], rows[9]]  # rows 20, 21 (train) and 22 (test) repeat earlier rows
  cfg = {'data.name': 'table', 'data.table': make_table(tmp_path, rows),
         'data.label_column': 'label'}
  with caplog.at_level(logging.WARNING):
    src = _source(**cfg)
  assert 'dropped 3 duplicate row(s) (same image, label and split as an earlier row): row(s) '\
         '20, 21, 22' in caplog.text
  assert [src.num_examples(s) for s in base.SPLITS] == [6, 6, 6]


def test_skip_corrupt_logs_every_file_and_records_them(tmp_path, caplog):
  over = case_corrupt_images(tmp_path)
  with caplog.at_level(logging.WARNING):
    data = _data(**over, **{'data.skip_corrupt': True})
  assert data.skipped == 12 and sum(data.num_examples.values()) == 8
  assert 'skipped 12 unreadable image(s)' in caplog.text
  assert all(f'train/a/{i:02d}.png' in caplog.text for i in range(6))
  skipped = [r for r in data.source.records if r[2] == 'skipped']
  assert len(skipped) == 12 and skipped[0][3].startswith('train: ')


def test_cli_prints_one_line_without_traceback(tmp_path):
  """`python -m camkd_jax.main` on bad data: 'error: <message>' and exit code 2."""
  import subprocess
  import sys
  make_folder(tmp_path / 'd', {'train': {'a': 4, 'b': 4}, 'test': {'a': 2}})
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  proc = subprocess.run(
      [sys.executable, '-m', 'camkd_jax.main', '--config',
       f'configs/ce_student.py:dataset=folder,root={tmp_path / "d"},smoke=1',
       '--workdir', str(tmp_path / 'run')], capture_output=True, text=True, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error: folder: class(es) ['b'] have no test examples" in proc.stderr
  assert 'Traceback' not in proc.stderr


# ----------------------------------------------------------------------------- validation split
def test_validation_carved_stratified_seeded_and_recorded(tmp_path):
  root = make_folder(tmp_path / 'd', {'train': {'x': 20, 'y': 10}, 'test': {'x': 2, 'y': 2}})
  over = {'data.name': 'folder', 'data.root': root}
  data = _data(**over)
  counts = {s: np.bincount(data.source.read(s).labels, minlength=2).tolist() for s in base.SPLITS}
  # round(0.15 * 20) = 3 and round(0.15 * 10) = 2 (half to even) held out per class.
  assert counts == {'train': [17, 8], 'validation': [3, 2], 'test': [2, 2]}
  val = data.source.read('validation').names
  assert not set(val) & set(data.source.read('train').names)
  assert _data(**over).source.read('validation').names == val  # same seed, same split
  other = _data(**over, **{'data.split_seed': 1}).source.read('validation').names
  assert other != val and len(other) == len(val)
  # The record: every file once, with its split and why it went there.
  ip.prepare_run(_config(**over), data, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'data_split.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 34 and len({r['path'] for r in rows}) == 34
  carved = [r for r in rows if r['split'] == 'validation']
  assert sorted(r['path'] for r in carved) == sorted(val)
  assert all(r['assigned_by'] == 'carved from train (config.data.val_fraction=0.15)'
             for r in carved)
  assert {r['assigned_by'] for r in rows if r['split'] == 'test'} == {'folder test/'}


def test_table_without_validation_rows_is_carved(tmp_path):
  rows = [r for r in _table_rows(n_per=4) if r[2] != 'val']
  data = _data(**{'data.name': 'table', 'data.table': make_table(tmp_path, rows),
                  'data.label_column': 'label', 'data.val_fraction': 0.25})
  assert data.num_examples == {'train': 6, 'validation': 2, 'test': 8}


def test_carve_validation_against_closed_form():
  labels = np.repeat([0, 1, 2, 3], [40, 7, 2, 1])
  train, val = folder.carve_validation(labels, np.arange(50), 4, 0.2, seed=3)
  # round(0.2 n), at least one when n >= 2, never all of a class; a single example stays in train.
  assert np.bincount(labels[val], minlength=4).tolist() == [8, 1, 1, 0]
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50))


# ----------------------------------------------------------------------------- class order
def test_class_names_fix_the_order_and_labels(tmp_path):
  root = make_folder(tmp_path, {'train': {'NC': 2, 'G3': 2, 'G4': 2}, 'test': {'NC': 1, 'G3': 1,
                                                                             'G4': 1}})
  src = _source(**{'data.name': 'folder', 'data.root': root, 'data.class_names': 'NC,G3,G4'})
  assert src.class_names == ['NC', 'G3', 'G4'] and src.order_given
  ex = src.read('test')
  assert [src.class_names[y] for y in ex.labels] == [n.split(os.sep)[-2] for n in ex.names]


def test_table_class_names_order_label_and_one_hot(tmp_path):
  rows = _table_rows(classes=('lo', 'mid', 'hi'))
  path = make_table(tmp_path, rows)
  src = _source(**{'data.name': 'table', 'data.table': path, 'data.label_column': 'label',
                   'data.class_names': 'lo,mid,hi'})
  assert src.class_names == ['lo', 'mid', 'hi']
  ex = src.read('train')
  assert [src.class_names[y] for y in ex.labels] == [r[1] for r in rows if r[2] == 'train']
  onehot = [(p, int(c == 'hi'), int(c == 'lo'), int(c == 'mid'), s) for p, c, s in rows]
  path = make_table(tmp_path / 'oh', onehot, header=('image', 'hi', 'lo', 'mid', 'split'))
  src = _source(**{'data.name': 'table', 'data.table': path, 'data.class_names': 'lo,mid,hi'})
  assert src.class_names == ['lo', 'mid', 'hi']
  assert [src.class_names[y] for y in src.read('train').labels] == [
      r[1] for r in rows if r[2] == 'train']


@pytest.mark.parametrize('classes, class_names, metric, warned', [
    (('G3', 'G4', 'NC'), '', 'kappa', True),
    (('G3', 'G4', 'NC'), 'NC,G3,G4', 'kappa', False),
    (('G3', 'NC'), '', 'kappa', False),
    (('G3', 'G4', 'NC'), '', 'balanced_accuracy', False),
])
def test_alphabetical_order_warning(tmp_path, classes, class_names, metric, warned):
  root = make_folder(tmp_path, {'train': {c: 2 for c in classes}, 'test': {c: 1 for c in classes}})
  data = _data(**{'data.name': 'folder', 'data.root': root, 'data.class_names': class_names,
                  'selection.metric': metric})
  notes = [n for n in data.notes if 'sorted (alphabetical)' in n]
  assert bool(notes) == warned
  if warned:
    assert "class order ['G3', 'G4', 'NC']" in notes[0] and 'config.data.class_names' in notes[0]


# ----------------------------------------------------------------------------- image checks
def test_check_is_cached_on_path_size_and_mtime(tmp_path, monkeypatch):
  paths = [str(tmp_path / f'{i}.png') for i in range(4)]
  for i, p in enumerate(paths):
    _write(p, _img(i, 6, 10))
  with open(tmp_path / 'bad.png', 'wb') as f:
    f.write(b'xx')
  paths.append(str(tmp_path / 'bad.png'))
  calls = []
  real = base._check_file  # pylint: disable=protected-access
  monkeypatch.setattr(base, '_check_file', lambda p: calls.append(p) or real(p))
  first = base.check_files(paths, cache_key=str(tmp_path))
  assert len(calls) == 5 and first[0] == (None, 6, 10) and first[4][0].startswith('Unidentified')
  calls.clear()
  assert base.check_files(paths, cache_key=str(tmp_path)) == first
  assert calls == [paths[4]]  # only the bad file (never cached) is decoded again
  calls.clear()
  _write(paths[1], _img(9, 8, 8))  # changed: size and mtime
  os.utime(paths[2], ns=(1, 1))    # touched: mtime only
  again = base.check_files(paths, cache_key=str(tmp_path))
  assert sorted(calls) == sorted([paths[1], paths[2], paths[4]]) and again[1] == (None, 8, 8)


def test_resize_warning_counts(tmp_path, caplog):
  for i, (h, w) in enumerate([(8, 8), (8, 8), (4, 4), (16, 16), (8, 12)]):
    for s in ('train', 'test'):
      for c in ('a', 'b'):
        _write(str(tmp_path / s / c / f'{i}.png'), _img(i, h, w))
  with caplog.at_level(logging.WARNING):
    data = _data(**{'data.name': 'folder', 'data.root': str(tmp_path)})
  note = [n for n in data.notes if 'resized' in n][0]
  assert note.startswith('12 of 20 images are resized to config.image_size=8: 4 up-sampled, '
                         '8 down-sampled, 4 with their aspect ratio changed')
  assert '4x4' in note and '8x12' in note and note in caplog.text


# ----------------------------------------------------------------------------- auto statistics
def test_auto_input_statistics_match_numpy(tmp_path):
  rng = np.random.default_rng(0)
  for s, n in (('train', 5), ('test', 2)):
    for c in ('a', 'b'):
      for i in range(n):
        arr = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        arr[..., 1] //= 3  # channels with different statistics
        _write(str(tmp_path / s / c / f'{i}.png'), arr)
  over = {'data.name': 'folder', 'data.root': str(tmp_path), 'model.input_mean': 'auto',
          'model.input_std': 'auto', 'data.val_fraction': 0.2}
  data = _data(**over)
  names = data.source.read('train').names
  x = np.stack([np.asarray(Image.open(p), np.float64) / 255.0 for p in names]).reshape(-1, 3)
  mean, std = data.train_statistics()
  np.testing.assert_allclose(mean, x.mean(0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(std, x.std(0), rtol=0, atol=1e-12)
  resolved = ip.resolve_input_stats(_config(**over), data)
  np.testing.assert_allclose(resolved.model.input_mean, x.mean(0), atol=1e-6)
  np.testing.assert_allclose(resolved.model.input_std, x.std(0), atol=1e-6)
  assert all(isinstance(v, float) for v in resolved.model.input_mean)
  from camkd_jax import models
  models.from_config(resolved.model, 2)  # numbers a model can be built from


def test_cpu_preset_and_unknown_preset():
  c = base_config.base_config('dataset=folder,root=/data,preset=cpu')
  assert (c.image_size, c.model.width, c.batch_size, c.teacher.num_epochs, c.num_epochs) == (
      128, 0.25, 32, 10, 30)
  assert c.model.input_mean == 'auto' and c.model.input_std == 'auto'
  c.model.input_mean = (0.5, 0.5, 0.5)  # numbers may replace 'auto' (a field of type object)
  with pytest.raises(ValueError, match=r"unknown preset='gpu'; known: \['cpu'\]"):
    base_config.base_config('preset=gpu')

