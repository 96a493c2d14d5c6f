"""camkd_jax.datasets.export_folder: the folder layout, patch i = the TFDS builder's patch i, and
the command line."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from camkd_jax.datasets import export_folder
from camkd_jax.datasets import synthetic_histology as sh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layout_and_content(tmp_path):
  paths = export_folder.export(str(tmp_path), {'train': 6, 'test': 3}, size=16, seed=3)
  assert len(paths) == 9
  assert sorted(os.listdir(tmp_path)) == ['test', 'train']  # no validation folder
  labels = sh.split_labels(6, 3, 0)
  for i, label in enumerate(labels):
    path = tmp_path / 'train' / sh.CLASS_NAMES[label] / f'train_{i:05d}.png'
    assert str(path) in paths
    want = sh.render_patch(np.random.default_rng([3, 0, i]), int(label), 16)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), want)  # PNG: lossless
  test_label = sh.split_labels(3, 3, 2)[2]
  assert (tmp_path / 'test' / sh.CLASS_NAMES[test_label] / 'test_00002.png').is_file()


def test_jpg_and_validation_split(tmp_path):
  paths = export_folder.export(str(tmp_path), {'validation': 2}, size=16, fmt='jpg')
  assert [os.path.basename(p) for p in paths] == ['validation_00000.jpg', 'validation_00001.jpg']
  with Image.open(paths[0]) as im:
    assert im.format == 'JPEG' and im.size == (16, 16)


def test_command_line(tmp_path):
  out = tmp_path / 'patches'
  proc = subprocess.run([sys.executable, '-m', 'camkd_jax.datasets.export_folder', f'--out={out}',
                         '--train=2', '--test=1', '--size=8'], cwd=REPO, capture_output=True,
                        text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep +
                                 os.environ.get('PYTHONPATH', '')))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == f'wrote 3 patches of 8 px to {out}: train 2, test 1'
  assert sum(len(fs) for _, _, fs in os.walk(out)) == 3
