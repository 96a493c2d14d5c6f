"""`base.Source` over a prepared TFDS builder; images stay encoded until the pipeline decodes."""
import contextlib
import fcntl
import inspect
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from camkd_jax.datasets import base


def _code_path(cls):
  return epath.Path(inspect.getfile(cls))

# TFDS looks up a builder's source file through `importlib_resources`, a dependency that is not
# always installed (it is not here); our builders need nothing from it, so use the plain file path
# (TFDS's own fallback). Builders set `code_path = tfds_source.CODE_PATH`.
CODE_PATH = tfds.core.utils.classproperty(classmethod(_code_path))


@contextlib.contextmanager
def _file_lock(path):
  """Holds an exclusive lock on the file at `path` (made if missing) until the block ends."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
    yield


def prepared(make, prepare, check=None):
  """`make()`'s builder, prepared by `prepare(builder)` in one process at a time.

  Processes that start together (a sweep's workers, a pod's hosts on one shared disk) would each
  generate the same folder, and all but the first fail when TFDS renames its temporary folder into
  place. Here the first takes a lock file beside the version folders and generates; the others wait
  for it and then read what it wrote. Cloud paths (gs://...) have no file locks and are prepared
  unguarded. `make` is called again after the wait: a builder made before another process finished
  still describes the unprepared folder. `check(builder)`, if given, runs first, before anything is
  written: its error (a missing manual download, say) leaves no folders behind.
  """
  builder = make()
  if builder.is_prepared():
    return builder
  if check is not None:
    check(builder)
  folder = os.fspath(builder.data_dir_root / builder.name / builder.builder_config.name)
  if '://' in folder:
    lock = contextlib.nullcontext()
  else:
    os.makedirs(folder, exist_ok=True)
    lock = _file_lock(os.path.join(folder, '.prepare.lock'))
  with lock:
    builder = make()
    if not builder.is_prepared():
      prepare(builder)
  return builder


class TfdsSource(base.Source):
  """Reads splits of a prepared builder with the images left encoded (SkipDecoding).

  `name_feature` names examples in error messages (e.g. SICAPv2's image_name); without it an
  example is called '<dataset>/<split>[<index>]'.
  """

  def __init__(self, name, builder, name_feature=None, skipped_names=()):
    self.name = name
    self.builder = builder
    self.class_names = list(builder.info.features['label'].names)
    self._name_feature = name_feature
    self.skipped_names = list(skipped_names)
    self.skipped = len(self.skipped_names)

  def num_examples(self, split):
    return self.builder.info.splits[split].num_examples

  def read(self, split, start=0, stop=None):
    n = self.num_examples(split)
    stop = n if stop is None else min(stop, n)
    if stop <= start:
      return base.Examples([], np.zeros([0], np.int32), [], from_files=False)
    # One file at a time, in order: every process sees the same example order.
    ds = self.builder.as_dataset(
        split=f'{split}[{start}:{stop}]', shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1))
    items, labels, names = [], [], []
    for i, ex in enumerate(tfds.as_numpy(ds)):
      items.append(ex['image'])
      labels.append(ex['label'])
      if self._name_feature:
        names.append(ex[self._name_feature].decode('utf-8'))
      else:
        names.append(f'{self.name}/{split}[{start + i}]')
    return base.Examples(items, np.asarray(labels, np.int32), names, from_files=False)
