"""camkd_jax.datasets.sicapv2 on a fake archive: folds, labels, and every bad-input path."""
import os

import numpy as np
from PIL import Image
import pytest

from camkd_jax import datasets
from camkd_jax.datasets import base
from camkd_jax.datasets import sicapv2
from helpers import data_config
from helpers import decode_image
from helpers import write_xlsx


def _onehot(name, k, g4c=0):
  row = [0, 0, 0, 0]
  row[k] = 1
  return [name] + row + [g4c]


def fake_sicapv2(root, n_train=8, n_val=4, n_test=4, size=24, nest=False):
  """A tiny SICAPv2-shaped archive: JPEGs + partition spreadsheets. Returns {name: (label, arr)}."""
  top = os.path.join(root, 'SICAPv2') if nest else root
  os.makedirs(os.path.join(top, 'images'))
  rng = np.random.default_rng(0)
  truth, splits = {}, {}
  for split, n in (('train', n_train), ('val', n_val), ('test', n_test)):
    rows = []
    for i in range(n):
      name = f'{split}_{i:02d}.jpg'
      k = i % 4
      arr = rng.integers(0, 255, (size, size + 8, 3)).astype(np.uint8)
      Image.fromarray(arr).save(os.path.join(top, 'images', name), quality=95)
      truth[name] = (k, int(k == 2 and i % 3 == 0))
      rows.append(_onehot(name, k, truth[name][1]))
    splits[split] = rows
  for fold in ('Val1', 'Val2', 'Val3', 'Val4'):
    write_xlsx(os.path.join(top, 'partition', 'Validation', fold, 'Train.xlsx'), splits['train'])
    write_xlsx(os.path.join(top, 'partition', 'Validation', fold, 'Test.xlsx'), splits['val'])
  write_xlsx(os.path.join(top, 'partition', 'Test', 'Train.xlsx'), splits['train'])
  write_xlsx(os.path.join(top, 'partition', 'Test', 'Test.xlsx'), splits['test'])
  return top, truth


def _sicap_config(tmp_path, manual, **kw):
  return data_config(name='sicapv2', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual), **kw)


def test_sicapv2_builds_fold_from_fake_archive(tmp_path):
  _, truth = fake_sicapv2(tmp_path / 'manual', nest=True)  # the zip's SICAPv2/ folder is found
  src = datasets.get_source(_sicap_config(tmp_path, tmp_path / 'manual'))
  assert src.class_names == ['NC', 'G3', 'G4', 'G5']
  assert [src.num_examples(s) for s in ('train', 'validation', 'test')] == [8, 4, 4]
  ex = src.read('train')
  assert sorted(ex.names) == sorted(n for n in truth if n.startswith('train'))
  for name, data, label in zip(ex.names, ex.items, ex.labels):
    assert label == truth[name][0]
    assert decode_image(data).shape == (24, 32, 3)  # original size kept
  # Stored bytes are the original file's bytes (no re-encoding).
  path = os.path.join(tmp_path, 'manual', 'SICAPv2', 'images', ex.names[0])
  assert ex.items[0] == open(path, 'rb').read()
  g4c = {e['image_name'].decode(): int(e['g4c'])
         for e in src.builder.as_dataset(split='train').as_numpy_iterator()}
  assert g4c == {n: truth[n][1] for n in g4c}


def test_sicapv2_missing_archive_says_what_and_where(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_source(_sicap_config(tmp_path, tmp_path / 'nowhere'))
  msg = str(e.value)
  assert 'nowhere' in msg and '9xxm58dvs3' in msg and sicapv2.URL in msg
  assert sicapv2.URL == 'https://data.mendeley.com/datasets/9xxm58dvs3/2'
  top, _ = fake_sicapv2(tmp_path / 'm2')
  os.remove(os.path.join(top, 'partition', 'Validation', 'Val1', 'Test.xlsx'))
  with pytest.raises(FileNotFoundError, match='Val1/Test.xlsx'):
    datasets.get_source(_sicap_config(tmp_path, top))


def test_sicapv2_unknown_fold(tmp_path):
  with pytest.raises(ValueError, match="'Val9'.*Val1"):
    datasets.get_source(_sicap_config(tmp_path, tmp_path, fold='Val9'))


@pytest.mark.parametrize('marks,what', [([0, 0, 0, 0], 'no class'),
                                        ([0, 1, 1, 0], 'several classes')])
def test_sicapv2_bad_label_row_is_named(tmp_path, marks, what):
  top, _ = fake_sicapv2(tmp_path / 'manual')
  path = os.path.join(top, 'partition', 'Validation', 'Val1', 'Train.xlsx')
  rows = [_onehot(f'train_{i:02d}.jpg', i % 4) for i in range(8)]
  rows[3] = ['train_03.jpg'] + marks + [0]
  write_xlsx(path, rows)
  with pytest.raises(ValueError, match=f"Train.xlsx, row 5 .*train_03.jpg.*{what}"):
    datasets.get_source(_sicap_config(tmp_path, top))


def test_sicapv2_corrupt_jpeg_named_or_skipped(tmp_path):
  top, _ = fake_sicapv2(tmp_path / 'manual')
  bad = os.path.join(top, 'images', 'val_01.jpg')
  data = open(bad, 'rb').read()
  open(bad, 'wb').write(data[:len(data) // 2])  # truncated
  with pytest.raises(base.DataError, match=r'1 of 16 image\(s\) cannot be read') as e:
    datasets.get_source(_sicap_config(tmp_path, top))
  assert 'val_01.jpg (OSError' in str(e.value) and 'skip_corrupt=True' in str(e.value)
  src = datasets.get_source(_sicap_config(tmp_path, top, skip_corrupt=True))
  assert src.skipped == 1 and src.skipped_names == ['val_01.jpg']
  assert src.num_examples('validation') == 3
  # The count survives a reload from the TFDS cache (kept in the dataset's metadata).
  again = datasets.get_source(_sicap_config(tmp_path, top, skip_corrupt=True))
  assert again.skipped == 1


def test_sicapv2_missing_image_named(tmp_path):
  top, _ = fake_sicapv2(tmp_path / 'manual')
  os.remove(os.path.join(top, 'images', 'test_02.jpg'))
  with pytest.raises(FileNotFoundError, match='test_02.jpg'):
    datasets.get_source(_sicap_config(tmp_path, top))
