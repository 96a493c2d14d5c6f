r"""Writes synthetic_histology patches as a folder of image files, laid out as your own data.

  python -m camkd_jax.datasets.export_folder --out patches --train 400 --test 120 --size 128

gives patches/train/<class>/*.png and patches/test/<class>/*.png (classes NC, G3, G4, G5; no
validation folder, so a run carves one out of train), for trying the folder dataset
(docs/own_data.md) and for tests. Patch i of a split is the same as the TFDS builder's with the
same seed and size.
"""
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from camkd_jax.datasets import synthetic_histology as sh

SPLIT_INDEX = {'train': 0, 'validation': 1, 'test': 2}


def export(root, counts, size=64, seed=0, fmt='png'):
  """Writes root/<split>/<class>/<split>_<i>.<fmt> for {split: count}; returns the paths."""
  paths = []
  for split, n in counts.items():
    s = SPLIT_INDEX[split]
    for i, label in enumerate(sh.split_labels(n, seed, s)):
      img = sh.render_patch(np.random.default_rng([seed, s, i]), int(label), size)
      path = os.path.join(root, split, sh.CLASS_NAMES[label], f'{split}_{i:05d}.{fmt}')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(img).save(path, **({'quality': 95} if fmt == 'jpg' else {}))
      paths.append(path)
  return paths


def main(argv):
  del argv
  f = flags.FLAGS
  counts = {s: n for s, n in (('train', f.train), ('validation', f.validation), ('test', f.test))
            if n > 0}
  paths = export(f.out, counts, f.size, f.seed, f.format)
  print(f'wrote {len(paths)} patches of {f.size} px to {f.out}: '
        + ', '.join(f'{s} {n}' for s, n in counts.items()))


if __name__ == '__main__':
  flags.DEFINE_string('out', None, 'Folder to write (created).')
  flags.DEFINE_integer('train', 400, 'Train patches.')
  flags.DEFINE_integer('validation', 0, 'Validation patches (0: no validation folder).')
  flags.DEFINE_integer('test', 120, 'Test patches.')
  flags.DEFINE_integer('size', 128, 'Patch side in pixels.')
  flags.DEFINE_integer('seed', 0, 'Content seed.')
  flags.DEFINE_enum('format', 'png', ['png', 'jpg'], 'File format.')
  flags.mark_flags_as_required(['out'])
  app.run(main)
