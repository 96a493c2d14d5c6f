"""camkd_jax.datasets.tfds_source: slices of a prepared builder, encoded images, example names."""
import threading

import numpy as np

from camkd_jax.datasets import synthetic_histology as sh
from camkd_jax.datasets import tfds_source
from helpers import decode_image


def test_slices_names_and_empty_ranges(smoke_builder):
  src = tfds_source.TfdsSource('synthetic_histology', smoke_builder, skipped_names=['a.png'])
  assert src.class_names == list(sh.CLASS_NAMES) and src.skipped == 1
  assert src.num_examples('test') == smoke_builder.builder_config.num_test == 32
  whole = src.read('test')
  assert len(whole.items) == 32 and whole.labels.dtype == np.int32 and not whole.from_files
  assert all(isinstance(b, bytes) for b in whole.items)  # still encoded (SkipDecoding)
  assert decode_image(whole.items[0]).shape == (32, 32, 3)
  assert whole.names[:2] == ['synthetic_histology/test[0]', 'synthetic_histology/test[1]']
  # A slice is the same examples, in the same order, named by their index in the split.
  part = src.read('test', 5, 9)
  assert part.items == whole.items[5:9] and list(part.labels) == list(whole.labels[5:9])
  assert part.names == [f'synthetic_histology/test[{i}]' for i in range(5, 9)]
  # A stop past the end is clipped; an empty range reads nothing.
  tail = src.read('test', 30, 1000)
  assert tail.items == whole.items[30:] and tail.names[-1] == 'synthetic_histology/test[31]'
  empty = src.read('test', 9, 9)
  assert empty.items == [] and empty.labels.shape == (0,) and empty.labels.dtype == np.int32
  # The labels are the generator's (TFDS shuffles the stored order, so compared as counts).
  np.testing.assert_array_equal(
      np.bincount(whole.labels, minlength=4),
      np.bincount(sh.split_labels(32, smoke_builder.builder_config.seed, 2), minlength=4))


def test_code_path_is_the_builders_file():
  assert str(tfds_source._code_path(sh.SyntheticHistology)) == sh.__file__


def test_a_builder_is_prepared_by_one_process_at_a_time(tmp_path):
  """While another process holds the lock and generates, `prepared` waits and then reads what it
  wrote instead of generating the same folder again (two workers that did both failed in TFDS's
  final rename with FileExistsError)."""
  make = lambda: sh.SyntheticHistology(config='smoke', data_dir=str(tmp_path))
  folder = tmp_path / 'synthetic_histology' / 'smoke'
  folder.mkdir(parents=True)
  generated, out = [], {}
  waiting = threading.Thread(target=lambda: out.update(builder=tfds_source.prepared(
      make, lambda b: (generated.append(b), b.download_and_prepare()))), daemon=True)
  with tfds_source._file_lock(str(folder / '.prepare.lock')):  # the other process  # pylint: disable=protected-access
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive()  # blocked on the lock
    make().download_and_prepare()
  waiting.join(60.0)
  assert not waiting.is_alive() and not generated
  assert out['builder'].is_prepared() and out['builder'].info.splits['train'].num_examples == 64
  # The lock file beside the version folder does not disturb TFDS: a new builder finds the data,
  # and a prepared one is returned at once.
  assert tfds_source.prepared(make, generated.append).is_prepared() and not generated
