"""camkd_jax.datasets.folder: folder and table (CSV / XLSX) datasets, seeded splits, errors."""
import os

import numpy as np
from PIL import Image
import pytest

from camkd_jax import datasets
from camkd_jax.datasets import folder
from helpers import data_config
from helpers import random_image
from helpers import write_xlsx


def write_image(path, arr, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, fmt)


def test_folder_split_layout(tmp_path):
  layout = {'train': {'b': 3, 'a': 2}, 'val': {'a': 1, 'b': 1}, 'test': {'a': 1, 'b': 2}}
  for split, classes in layout.items():
    for c, n in classes.items():
      for i in range(n):
        write_image(tmp_path / split / c / f'{i}.png', random_image(i))
  (tmp_path / 'train' / 'a' / 'notes.txt').write_text('not an image')
  src = datasets.get_source(data_config(name='folder', root=str(tmp_path)))
  assert src.class_names == ['a', 'b']
  assert [src.num_examples(s) for s in ('train', 'validation', 'test')] == [5, 2, 3]
  ex = src.read('train')
  assert list(ex.labels) == [0, 0, 1, 1, 1]
  assert all(n.endswith('.png') for n in ex.names)


def test_folder_class_layout_seeded_split(tmp_path):
  for c, n in (('x', 20), ('y', 10)):
    for i in range(n):
      write_image(tmp_path / c / f'{i}.jpg', random_image(i))
  cfg = data_config(name='folder', root=str(tmp_path), split_ratio=(0.6, 0.2, 0.2))
  src = datasets.get_source(cfg)
  parts = {s: src.read(s) for s in ('train', 'validation', 'test')}
  # Stratified: 12/4/4 of class x and 6/2/2 of class y.
  assert [np.bincount(parts[s].labels, minlength=2).tolist() for s in parts] == [
      [12, 6], [4, 2], [4, 2]]
  names = [set(p.names) for p in parts.values()]
  assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
  again = datasets.get_source(cfg)
  assert again.read('test').names == parts['test'].names  # deterministic


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    datasets.get_source(data_config(name='folder', root=str(tmp_path / 'none')))
  write_image(tmp_path / 'train' / 'a' / '0.png', random_image(0))
  write_image(tmp_path / 'validation' / 'a' / '0.png', random_image(0))
  with pytest.raises(FileNotFoundError, match=r"split\(s\) \['test'\]"):
    datasets.get_source(data_config(name='folder', root=str(tmp_path)))


def test_table_csv_label_column_and_split_column(tmp_path):
  rows = ['path,grade,split']
  for i in range(9):
    write_image(tmp_path / 'img' / f'{i}.png', random_image(i))
    rows.append(f'img/{i}.png,{[2, 10, 2][i % 3]},{["train", "val", "test"][i // 3]}')
  (tmp_path / 't.csv').write_text('\n'.join(rows) + '\n')
  cfg = data_config(name='table', table=str(tmp_path / 't.csv'), image_column='path',
                label_column='grade')
  src = datasets.get_source(cfg)
  assert src.class_names == ['2', '10']  # numeric labels sort as numbers
  assert [src.num_examples(s) for s in ('train', 'validation', 'test')] == [3, 3, 3]
  assert list(src.read('train').labels) == [0, 1, 0]


def test_table_xlsx_one_hot_and_bad_row(tmp_path):
  rows = []
  for i in range(8):
    write_image(tmp_path / f'{i}.png', random_image(i))
    rows.append([f'{i}.png'] + [int(i % 2 == 0), int(i % 2 == 1), int(i == 4)])
  write_xlsx(str(tmp_path / 't.xlsx'), rows, header=('image', 'benign', 'tumour', 'flag'))
  cfg = data_config(name='table', table=str(tmp_path / 't.xlsx'), class_columns='benign,tumour')
  src = datasets.get_source(cfg)
  assert src.class_names == ['benign', 'tumour']
  assert sum(src.num_examples(s) for s in ('train', 'validation', 'test')) == 8
  # Inferring the one-hot columns takes every 0/1 column: the flag makes row 6 (i=4) two classes.
  cfg.data.class_columns = ''
  with pytest.raises(ValueError, match=r't.xlsx, row 6: marks several classes'):
    datasets.get_source(cfg)
  rows[2] = ['2.png', 0, 0, 0]
  write_xlsx(str(tmp_path / 't.xlsx'), rows, header=('image', 'benign', 'tumour', 'flag'))
  cfg.data.class_columns = 'benign,tumour'
  with pytest.raises(ValueError, match=r't.xlsx, row 4: marks no class'):
    datasets.get_source(cfg)


def test_table_missing_image_and_column(tmp_path):
  (tmp_path / 't.csv').write_text('image,label\nmissing.png,a\n')
  with pytest.raises(FileNotFoundError, match=r"1 image\(s\) not found, in row\(s\) 2 "
                     r"\('missing.png'\)"):
    datasets.get_source(data_config(name='table', table=str(tmp_path / 't.csv'),
                                    label_column='label'))
  with pytest.raises(ValueError, match="no column 'grade' \\(config.data.label_column\\); "
                     "columns: \\['image', 'label'\\]"):
    datasets.get_source(data_config(name='table', table=str(tmp_path / 't.csv'),
                                    label_column='grade'))


def test_skip_corrupt_in_folder(tmp_path):
  for c in ('a', 'b'):
    for i in range(5):
      write_image(tmp_path / c / f'{i}.png', random_image(i))
  data = (tmp_path / 'a' / '3.png').read_bytes()
  (tmp_path / 'a' / '3.png').write_bytes(data[:len(data) // 2])
  src = datasets.get_source(data_config(name='folder', root=str(tmp_path), skip_corrupt=True))
  assert src.skipped == 1 and src.skipped_names[0].endswith(os.path.join('a', '3.png'))
  assert sum(src.num_examples(s) for s in ('train', 'validation', 'test')) == 9


def test_seeded_split_covers_everything_once():
  labels = np.repeat([0, 1, 2], [7, 5, 1])
  parts = folder.seeded_split(labels, 3, (0.7, 0.15, 0.15), 0)
  allidx = np.concatenate(list(parts.values()))
  np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))
  # The single example of class 2 goes to train (round(0.7 * 1) = 1).
  assert 12 in parts['train']
