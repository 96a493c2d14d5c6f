"""Tests of the datasets: synthetic_histology, sicapv2 (on a fake archive), folder and table."""
import io
import os

import numpy as np
from PIL import Image
import pytest

pytest.importorskip('tensorflow_datasets', reason='the data modules need TensorFlow Datasets')

from camkd_jax import datasets  # pylint: disable=g-import-not-at-top
from camkd_jax.datasets import base
from camkd_jax.datasets import folder
from camkd_jax.datasets import sicapv2
from camkd_jax.datasets import synthetic_histology as sh
from configs import base as base_config


def _config(**data):
  c = base_config.base_config('smoke=1')
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _png(arr):
  b = io.BytesIO()
  Image.fromarray(arr).save(b, 'PNG')
  return b.getvalue()


def _decode(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


# ---------------------------------------------------------------- synthetic_histology


def test_split_labels_counts_follow_shares():
  n = 2000
  labels = sh.split_labels(n, 0, 0)
  counts = np.bincount(labels, minlength=4)
  assert counts.sum() == n
  # Largest-remainder rounding: every count within 1 of n * share.
  np.testing.assert_array_less(np.abs(counts - n * sh.CLASS_SHARES), 1.0 + 1e-9)
  np.testing.assert_array_equal(labels, sh.split_labels(n, 0, 0))
  assert not np.array_equal(labels, sh.split_labels(n, 0, 1))


def test_render_patch_deterministic_and_uint8():
  a = sh.render_patch(np.random.default_rng([0, 0, 5]), 2, 64)
  b = sh.render_patch(np.random.default_rng([0, 0, 5]), 2, 64)
  c = sh.render_patch(np.random.default_rng([0, 0, 6]), 2, 64)
  assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 5


def test_mean_colour_does_not_depend_on_class():
  """Per-class mean colour agrees within sampling error (4 standard errors)."""
  n = 60
  means = np.array([[sh.render_patch(np.random.default_rng([9, k, i]), k, 64).reshape(-1, 3)
                     .mean(0) for i in range(n)] for k in range(4)])  # [class, n, 3]
  spread = means.std(axis=1).mean(0)  # per-image std of the mean colour, per channel
  grand = means.mean(axis=(0, 1))
  se = spread / np.sqrt(n)
  assert np.all(np.abs(means.mean(axis=1) - grand) < 4 * se), (means.mean(axis=1), grand, se)
  # The region's mean colour is pinned exactly: classes differ far less than images do.
  assert spread.min() > 5


def test_classes_differ_in_fine_structure():
  """High-frequency energy (what x8 pooling removes) separates the classes; x8 means do not."""
  def hf(img, f):
    x = img.astype(np.float64).mean(-1)
    low = x.reshape(64 // f, f, 64 // f, f).mean((1, 3))
    return np.abs(x - np.kron(low, np.ones((f, f)))).mean()
  energy = np.array([[hf(sh.render_patch(np.random.default_rng([3, k, i]), k, 64), 2)
                      for i in range(20)] for k in range(4)])
  # G4's dense sieve has more 2-px detail than NC's sparse glands, with no overlap of the means'
  # 3-standard-error intervals.
  m, s = energy.mean(1), energy.std(1) / np.sqrt(20)
  assert m[2] - 3 * s[2] > m[0] + 3 * s[0], (m, s)


@pytest.fixture(scope='module')
def smoke_builder(tmp_path_factory):
  builder = sh.SyntheticHistology(config='smoke', data_dir=str(tmp_path_factory.mktemp('tfds')))
  builder.download_and_prepare()
  return builder


def test_synthetic_builder_sizes_and_content(smoke_builder):
  info = smoke_builder.info
  assert info.features['label'].names == ['NC', 'G3', 'G4', 'G5']
  cfg = smoke_builder.builder_config
  assert {s: info.splits[s].num_examples for s in ('train', 'validation', 'test')} == {
      'train': cfg.num_train, 'validation': cfg.num_validation, 'test': cfg.num_test}
  src = datasets.tfds_source.TfdsSource('synthetic_histology', smoke_builder)
  ex = src.read('validation')
  # Every stored image is exactly one regenerated from its per-example seed (PNG is lossless).
  want = {}
  for i, label in enumerate(sh.split_labels(cfg.num_validation, cfg.seed, 1)):
    img = sh.render_patch(np.random.default_rng([cfg.seed, 1, i]), int(label), cfg.image_size)
    want[img.tobytes()] = int(label)
  got = {_decode(b).tobytes(): int(y) for b, y in zip(ex.items, ex.labels)}
  assert got == want


def test_synthetic_second_prepare_reuses_cache(smoke_builder):
  again = sh.SyntheticHistology(config='smoke', data_dir=os.fspath(smoke_builder.data_dir_root))
  assert again.is_prepared()


def test_unknown_dataset_and_size_are_named():
  with pytest.raises(ValueError, match='known:.*synthetic_histology.*sicapv2.*folder.*table'):
    datasets.get_source(_config(name='imagenet'))
  with pytest.raises(ValueError, match="'huge'.*known: \\['default', 'smoke'\\]"):
    datasets.get_source(_config(synthetic_size='huge'))


# ---------------------------------------------------------------- sicapv2 (fake archive)


def _write_xlsx(path, rows, header=('image_name', 'NC', 'G3', 'G4', 'G5', 'G4C')):
  import openpyxl  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  wb = openpyxl.Workbook()
  ws = wb.active
  ws.append(list(header))
  for r in rows:
    ws.append(list(r))
  wb.save(path)


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
    _write_xlsx(os.path.join(top, 'partition', 'Validation', fold, 'Train.xlsx'), splits['train'])
    _write_xlsx(os.path.join(top, 'partition', 'Validation', fold, 'Test.xlsx'), splits['val'])
  _write_xlsx(os.path.join(top, 'partition', 'Test', 'Train.xlsx'), splits['train'])
  _write_xlsx(os.path.join(top, 'partition', 'Test', 'Test.xlsx'), splits['test'])
  return top, truth


def _sicap_config(tmp_path, manual, **kw):
  return _config(name='sicapv2', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual), **kw)


def test_sicapv2_builds_fold_from_fake_archive(tmp_path):
  _, truth = fake_sicapv2(tmp_path / 'manual', nest=True)  # the zip's SICAPv2/ folder is found
  src = datasets.get_source(_sicap_config(tmp_path, tmp_path / 'manual'))
  assert src.class_names == ['NC', 'G3', 'G4', 'G5']
  assert [src.num_examples(s) for s in ('train', 'validation', 'test')] == [8, 4, 4]
  ex = src.read('train')
  assert sorted(ex.names) == sorted(n for n in truth if n.startswith('train'))
  for name, data, label in zip(ex.names, ex.items, ex.labels):
    assert label == truth[name][0]
    assert _decode(data).shape == (24, 32, 3)  # original size kept
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
  _write_xlsx(path, rows)
  with pytest.raises(ValueError, match=f"Train.xlsx, row 5 .*train_03.jpg.*{what}"):
    datasets.get_source(_sicap_config(tmp_path, top))


def test_sicapv2_corrupt_jpeg_named_or_skipped(tmp_path):
  top, _ = fake_sicapv2(tmp_path / 'manual')
  bad = os.path.join(top, 'images', 'val_01.jpg')
  data = open(bad, 'rb').read()
  open(bad, 'wb').write(data[:len(data) // 2])  # truncated
  with pytest.raises(ValueError, match='val_01.jpg.*skip_corrupt'):
    datasets.get_source(_sicap_config(tmp_path, top))
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


# ---------------------------------------------------------------- folder and table


def write_image(path, arr, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, fmt)


def _img(seed, size=12):
  return np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype(np.uint8)


def test_folder_split_layout(tmp_path):
  layout = {'train': {'b': 3, 'a': 2}, 'val': {'a': 1, 'b': 1}, 'test': {'a': 1, 'b': 2}}
  for split, classes in layout.items():
    for c, n in classes.items():
      for i in range(n):
        write_image(tmp_path / split / c / f'{i}.png', _img(i))
  (tmp_path / 'train' / 'a' / 'notes.txt').write_text('not an image')
  src = datasets.get_source(_config(name='folder', root=str(tmp_path)))
  assert src.class_names == ['a', 'b']
  assert [src.num_examples(s) for s in ('train', 'validation', 'test')] == [5, 2, 3]
  ex = src.read('train')
  assert list(ex.labels) == [0, 0, 1, 1, 1]
  assert all(n.endswith('.png') for n in ex.names)


def test_folder_class_layout_seeded_split(tmp_path):
  for c, n in (('x', 20), ('y', 10)):
    for i in range(n):
      write_image(tmp_path / c / f'{i}.jpg', _img(i))
  cfg = _config(name='folder', root=str(tmp_path), split_ratio=(0.6, 0.2, 0.2))
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
    datasets.get_source(_config(name='folder', root=str(tmp_path / 'none')))
  write_image(tmp_path / 'train' / 'a' / '0.png', _img(0))
  write_image(tmp_path / 'validation' / 'a' / '0.png', _img(0))
  with pytest.raises(FileNotFoundError, match=r"split\(s\) \['test'\]"):
    datasets.get_source(_config(name='folder', root=str(tmp_path)))


def test_table_csv_label_column_and_split_column(tmp_path):
  rows = ['path,grade,split']
  for i in range(9):
    write_image(tmp_path / 'img' / f'{i}.png', _img(i))
    rows.append(f'img/{i}.png,{[2, 10, 2][i % 3]},{["train", "val", "test"][i // 3]}')
  (tmp_path / 't.csv').write_text('\n'.join(rows) + '\n')
  cfg = _config(name='table', table=str(tmp_path / 't.csv'), image_column='path',
                label_column='grade')
  src = datasets.get_source(cfg)
  assert src.class_names == ['2', '10']  # numeric labels sort as numbers
  assert [src.num_examples(s) for s in ('train', 'validation', 'test')] == [3, 3, 3]
  assert list(src.read('train').labels) == [0, 1, 0]


def test_table_xlsx_one_hot_and_bad_row(tmp_path):
  rows = []
  for i in range(8):
    write_image(tmp_path / f'{i}.png', _img(i))
    rows.append([f'{i}.png'] + [int(i % 2 == 0), int(i % 2 == 1), int(i == 4)])
  _write_xlsx(str(tmp_path / 't.xlsx'), rows, header=('image', 'benign', 'tumour', 'flag'))
  cfg = _config(name='table', table=str(tmp_path / 't.xlsx'), class_columns='benign,tumour')
  src = datasets.get_source(cfg)
  assert src.class_names == ['benign', 'tumour']
  assert sum(src.num_examples(s) for s in ('train', 'validation', 'test')) == 8
  # Inferring the one-hot columns takes every 0/1 column: the flag makes row 6 (i=4) two classes.
  cfg.data.class_columns = ''
  with pytest.raises(ValueError, match=r't.xlsx, row 6: marks several classes'):
    datasets.get_source(cfg)
  rows[2] = ['2.png', 0, 0, 0]
  _write_xlsx(str(tmp_path / 't.xlsx'), rows, header=('image', 'benign', 'tumour', 'flag'))
  cfg.data.class_columns = 'benign,tumour'
  with pytest.raises(ValueError, match=r't.xlsx, row 4: marks no class'):
    datasets.get_source(cfg)


def test_table_missing_image_and_column(tmp_path):
  (tmp_path / 't.csv').write_text('image,label\nmissing.png,a\n')
  with pytest.raises(FileNotFoundError, match="row 2: image 'missing.png' not found"):
    datasets.get_source(_config(name='table', table=str(tmp_path / 't.csv'), label_column='label'))
  with pytest.raises(ValueError, match="no label column 'grade'.*columns: \\['image', 'label'\\]"):
    datasets.get_source(_config(name='table', table=str(tmp_path / 't.csv'), label_column='grade'))


def test_skip_corrupt_in_folder(tmp_path):
  for c in ('a', 'b'):
    for i in range(5):
      write_image(tmp_path / c / f'{i}.png', _img(i))
  data = (tmp_path / 'a' / '3.png').read_bytes()
  (tmp_path / 'a' / '3.png').write_bytes(data[:len(data) // 2])
  src = datasets.get_source(_config(name='folder', root=str(tmp_path), skip_corrupt=True))
  assert src.skipped == 1 and src.skipped_names[0].endswith(os.path.join('a', '3.png'))
  assert sum(src.num_examples(s) for s in ('train', 'validation', 'test')) == 9


def test_pil_check_flags_truncation():
  arr = _img(1, 32)
  good = _png(arr)
  assert base.check_image(good) is None
  assert 'truncated' in base.check_image(good[:len(good) // 2]).lower()
  np.testing.assert_array_equal(base.decode_with_pil(good), arr)


def test_seeded_split_covers_everything_once():
  labels = np.repeat([0, 1, 2], [7, 5, 1])
  parts = folder.seeded_split(labels, 3, (0.7, 0.15, 0.15), 0)
  allidx = np.concatenate(list(parts.values()))
  np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))
  # The single example of class 2 goes to train (round(0.7 * 1) = 1).
  assert 12 in parts['train']
