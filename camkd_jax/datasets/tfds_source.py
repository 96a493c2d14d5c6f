"""`base.Source` over a prepared TFDS builder; images stay encoded until the pipeline decodes."""
import inspect

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
