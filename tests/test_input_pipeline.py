"""Tests of camkd_jax.input_pipeline: orders, balancing, sharding, resume, decoding, errors."""
import collections
import os

import numpy as np
from PIL import Image
import pytest

from camkd_jax import input_pipeline as ip
from configs import base as base_config


def _config(arg='smoke=1', **over):
  c = base_config.base_config(arg)
  for k, v in over.items():
    obj = c
    *path, last = k.split('.')
    for p in path:
      obj = getattr(obj, p)
    setattr(obj, last, v)
  return c


def _write(path, arr, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, fmt)


def _solid(value, size=16):
  """An image whose every pixel is `value` (so any resize keeps it: identifies the example)."""
  return np.full((size, size, 3), value, np.uint8)


@pytest.fixture
def folder_data(tmp_path):
  """Class layout with 3 imbalanced classes; image i of class k has pixel value 20*k + i."""
  counts = {'a': 12, 'b': 6, 'c': 3}
  for k, (c, n) in enumerate(counts.items()):
    for i in range(n):
      _write(str(tmp_path / 'train' / c / f'{i:02d}.png'), _solid(20 * k + i, 16 + i))
  for split in ('val', 'test'):
    for k, c in enumerate(counts):
      for i in range(3):
        _write(str(tmp_path / split / c / f'{i}.png'), _solid(100 + 10 * k + i))
  return tmp_path


def _data(root, **over):
  over.setdefault('image_size', 8)
  over.setdefault('magnification', 5.0)  # f = 2 divides 8
  over.setdefault('batch_size', 4)
  over.setdefault('eval_batch_size', 4)
  cfg = _config(**{'data.name': 'folder', 'data.root': str(root), **over})
  return cfg


# ---------------------------------------------------------------- orders


def test_balanced_indices_match_reference_rule():
  labels = np.array([0] * 5 + [1] * 2 + [2] * 1 + [3] * 3)
  idx = ip.balanced_indices(labels, 4)
  counts = np.bincount(labels[idx], minlength=4)
  # round(5/5)=1, round(5/2)=round(2.5)=2 (half to even, as Python), round(5/1)=5, round(5/3)=2.
  np.testing.assert_array_equal(counts, [5 * 1, 2 * 2, 1 * 5, 3 * 2])
  for k in range(4):  # every example of class k repeated the same number of times
    reps = collections.Counter(idx[labels[idx] == k].tolist())
    assert len(set(reps.values())) == 1 and set(reps) == set(np.flatnonzero(labels == k))


def test_epoch_order_deterministic_and_reshuffled():
  labels = np.repeat([0, 1], [30, 10])
  a = ip.epoch_order(labels, 2, seed=1, epoch=0, balance=True, length=32)
  np.testing.assert_array_equal(a, ip.epoch_order(labels, 2, 1, 0, True, 32))
  assert not np.array_equal(a, ip.epoch_order(labels, 2, 1, 1, True, 32))
  assert not np.array_equal(a, ip.epoch_order(labels, 2, 2, 0, True, 32))
  plain = ip.epoch_order(labels, 2, 1, 0, False, 40)
  np.testing.assert_array_equal(np.sort(plain), np.arange(40))


# ---------------------------------------------------------------- training batches


def test_train_batches_shapes_and_labels(folder_data):
  data = ip.get_data(_data(folder_data), process_index=0, process_count=1)
  assert data.class_names == ['a', 'b', 'c'] and data.num_classes == 3
  assert data.num_examples == {'train': 21, 'validation': 9, 'test': 9}
  assert data.steps_per_epoch == 21 // 4
  batches = list(data.train_batches(0))
  assert len(batches) == data.steps_per_epoch
  order = data.train_order(0)
  for k, b in enumerate(batches):
    assert b['image'].dtype == np.uint8 and b['image'].shape == (4, 8, 8, 3)
    assert b['label'].dtype == np.int32
    # Solid images: the pixel value says which example it is (20 * class + index).
    value = b['image'][:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(b["label"], value // 20)
    np.testing.assert_array_equal(np.ptp(b['image'].reshape(4, -1), axis=1), 0)
    train = data._train  # pylint: disable=protected-access
    np.testing.assert_array_equal(b['label'], train.labels[order[k * 4:(k + 1) * 4]])


def test_balancing_evens_out_classes(folder_data):
  """Over many epochs the balanced order draws the classes ~equally (counts 12, 6*2, 3*4)."""
  data = ip.get_data(_data(folder_data), process_index=0, process_count=1)
  labels = data._train.labels  # pylint: disable=protected-access
  drawn = np.concatenate([labels[data.train_order(e)] for e in range(200)])
  freq = np.bincount(drawn, minlength=3) / len(drawn)
  np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.02)
  unbalanced = ip.get_data(_data(folder_data, balance=False), process_index=0, process_count=1)
  drawn = np.concatenate([labels[unbalanced.train_order(e)] for e in range(200)])
  np.testing.assert_allclose(np.bincount(drawn) / len(drawn), [12 / 21, 6 / 21, 3 / 21],
                             atol=0.02)


def test_resume_sees_the_same_batches(folder_data):
  data = ip.get_data(_data(folder_data), process_index=0, process_count=1)
  full = list(data.train_batches(3))
  tail = list(data.train_batches(3, start_step=2))
  assert len(tail) == data.steps_per_epoch - 2
  for a, b in zip(full[2:], tail):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert list(data.train_batches(3, start_step=data.steps_per_epoch)) == []


def test_processes_split_each_global_batch(folder_data):
  """Two processes' local batches, side by side, are the single-process global batch."""
  one = list(ip.get_data(_data(folder_data), process_index=0, process_count=1).train_batches(1))
  parts = [list(ip.get_data(_data(folder_data), process_index=p, process_count=2)
                .train_batches(1)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(one)
  for g, p0, p1 in zip(one, *parts):
    assert p0['image'].shape[0] == 2
    np.testing.assert_array_equal(g['image'], np.concatenate([p0['image'], p1['image']]))
    np.testing.assert_array_equal(g['label'], np.concatenate([p0['label'], p1['label']]))


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_counts_every_example_once(folder_data, process_count):
  cfg = _data(folder_data, batch_size=6, eval_batch_size=6)
  seen, nbatches = [], set()
  for p in range(process_count):
    data = ip.get_data(cfg, process_index=p, process_count=process_count)
    batches = list(data.eval_batches('validation'))
    nbatches.add(len(batches))
    for b in batches:
      assert b['image'].shape == (6 // process_count, 8, 8, 3) and b['mask'].dtype == bool
      assert not b['image'][~b['mask']].any()  # padding is zeros
      seen += b['image'][b['mask']][:, 0, 0, 0].tolist()
  assert len(nbatches) == 1  # every process runs the same number of eval steps
  assert sorted(seen) == sorted(100 + 10 * k + i for k in range(3) for i in range(3))


def test_bad_process_split_is_a_config_error(folder_data):
  with pytest.raises(ValueError, match='batch_size=4 is not divisible by the number of processes'):
    ip.get_data(_data(folder_data), process_index=0, process_count=3)


# ---------------------------------------------------------------- decoding


def test_resize_is_antialiased_bilinear(tmp_path):
  """A 2-px checkerboard shrunk 4x averages to grey (antialiasing), a gradient stays monotone."""
  board = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
  board = np.repeat(board[..., None], 3, -1)
  data = open_png(board)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = ip.decode_and_resize(tf.constant(data), 8).numpy()
  assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
  np.testing.assert_allclose(out.astype(float), 127.5, atol=1.0)
  ramp = np.repeat(np.linspace(0, 255, 64)[None, :, None], 3, -1).repeat(64, 0).astype(np.uint8)
  out = ip.decode_and_resize(tf.constant(open_png(ramp)), 16).numpy()[0, :, 0].astype(float)
  # Box-average of the ramp over each 4-px cell: the closed form for a linear ramp.
  want = ramp[0, :, 0].astype(float).reshape(16, 4).mean(1)
  np.testing.assert_allclose(out[1:-1], want[1:-1], atol=1.5)
  same = ip.decode_and_resize(tf.constant(open_png(ramp)), 64).numpy()
  np.testing.assert_array_equal(same, ramp)  # already the right size: untouched


def open_png(arr):
  import io  # pylint: disable=g-import-not-at-top
  b = io.BytesIO()
  Image.fromarray(arr).save(b, 'PNG')
  return b.getvalue()


def test_tiff_grey_and_rgba_decode(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3)).astype(np.uint8)
  b = io.BytesIO()
  Image.fromarray(rgb).save(b, 'TIFF')
  np.testing.assert_array_equal(ip.decode_and_resize(tf.constant(b.getvalue()), 8).numpy(), rgb)
  grey = rgb[..., 0]
  out = ip.decode_and_resize(tf.constant(open_png(grey)), 8).numpy()
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
  rgba = np.concatenate([rgb, np.full((8, 8, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(ip.decode_and_resize(tf.constant(open_png(rgba)), 8).numpy(), rgb)


def test_corrupt_file_is_named(folder_data):
  bad = folder_data / 'train' / 'b' / '04.png'
  good = bad.read_bytes()
  bad.write_bytes(good[:40])
  with pytest.raises(ValueError, match=r'1 of 39 image\(s\) cannot be read') as e:
    ip.get_data(_data(folder_data), process_index=0, process_count=1)  # found up front
  assert 'train/b/04.png (UnidentifiedImageError' in str(e.value) and 'skip_corrupt=True' in str(e.value)
  # A file that breaks after the check is still named when the pipeline meets it.
  bad.write_bytes(good)
  data = ip.get_data(_data(folder_data), process_index=0, process_count=1)
  bad.write_bytes(good[:40])
  with pytest.raises(ValueError, match=r'train/b/04.png.*skip_corrupt'):
    for epoch in range(5):  # the oversampled class b shows up in every epoch
      list(data.train_batches(epoch))
  skipping = ip.get_data(_data(folder_data, **{'data.skip_corrupt': True}), process_index=0,
                         process_count=1)
  assert skipping.skipped == 1 and skipping.num_examples['train'] == 20
  for epoch in range(3):
    assert len(list(skipping.train_batches(epoch))) == skipping.steps_per_epoch


# ---------------------------------------------------------------- config errors


def test_class_without_training_examples_is_named(tmp_path):
  for split, classes in (('train', 'ab'), ('validation', 'abz'), ('test', 'ab')):
    for c in classes:
      for i in range(4):
        _write(str(tmp_path / split / c / f'{i}.png'), _solid(i))
  with pytest.raises(ValueError, match=r"\['z'\] have no training examples"):
    ip.get_data(_data(tmp_path), process_index=0, process_count=1)


def test_unknown_dataset_lists_known(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'cifar'.*synthetic_histology"):
    ip.get_data(_config(**{'data.name': 'cifar'}), process_index=0, process_count=1)


# ---------------------------------------------------------------- the embedded default


def test_synthetic_smoke_end_to_end(tmp_path):
  cfg = _config(**{'data.data_dir': str(tmp_path)})
  data = ip.get_data(cfg, process_index=0, process_count=1)
  assert data.class_names == ['NC', 'G3', 'G4', 'G5'] and data.image_size == 32
  assert data.num_examples == {'train': 64, 'validation': 32, 'test': 32}
  assert data.steps_per_epoch == 64 // cfg.batch_size
  b = next(data.train_batches(0))
  assert b['image'].shape == (cfg.batch_size, 32, 32, 3) and b['image'].dtype == np.uint8
  # In-memory (TFDS) path: the batch is the PIL decoding of the stored PNGs, in train order.
  import io  # pylint: disable=g-import-not-at-top
  train = data._train  # pylint: disable=protected-access
  order = data.train_order(0)[:cfg.batch_size]
  want = np.stack([np.asarray(Image.open(io.BytesIO(train.items[i]))) for i in order])
  np.testing.assert_array_equal(b['image'], want)
  np.testing.assert_array_equal(b['label'], train.labels[order])
  total = sum(int(b['mask'].sum()) for b in data.eval_batches('test'))
  assert total == 32
