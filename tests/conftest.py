"""Shared test helpers."""
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import FAST_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Before any test starts the XLA backend; inherited by the subprocesses that copy os.environ.
if FAST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_XLA_FLAGS).strip()


def run_python(code, env_extra=None, timeout=300):
  """Runs `code` in a fresh Python process (own XLA flags / x64 mode) and returns stdout."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc.stdout


@pytest.fixture
def python_runner():
  return run_python


@pytest.fixture(scope='module')
def tiny():
  """(model, variables, images): a width-0.0625 VGG16 with 4 classes and 3 random 32 px images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from camkd_jax.models import get_model  # pylint: disable=g-import-not-at-top
  model = get_model('vgg16', 4, width=0.0625)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3))
  return model, variables, x


@pytest.fixture(autouse=True)
def _image_check_cache(tmp_path_factory, monkeypatch):
  """The image-check cache of the folder/table datasets goes to a temporary folder, not ~/.cache."""
  monkeypatch.setenv('CAMKD_CACHE_DIR', str(tmp_path_factory.getbasetemp() / 'camkd_cache'))


@pytest.fixture(scope='session')
def smoke_builder(tmp_path_factory):
  """The synthetic_histology TFDS builder's `smoke` build (64/32/32 patches of 32 px), prepared
  once per session for the tests that read it."""
  from camkd_jax.datasets import synthetic_histology  # pylint: disable=g-import-not-at-top
  builder = synthetic_histology.SyntheticHistology(
      config='smoke', data_dir=str(tmp_path_factory.mktemp('tfds_smoke')))
  builder.download_and_prepare()
  return builder


# ----------------------------------------------------------------------------- test slides
SLIDE_TILE = 32                               # patch = teacher tile at 10x
# 8 regions of 5 x 5 cells less corners: 168 tissue tiles
SLIDE_CLASSES = ((0, 1, 2, 3), (3, 2, 1, 0))


@pytest.fixture(scope='session')
def slides(tmp_path_factory):
  """Synthetic Aperio-like slides (camkd_jax.slide_testdata), written once for the whole run."""
  from camkd_jax import slide_testdata  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('slides')
  out = {'s10': slide_testdata.write_slide(str(d / 's10.svs'), SLIDE_TILE, SLIDE_CLASSES),
         's20': slide_testdata.write_slide(str(d / 's20.svs'), SLIDE_TILE, SLIDE_CLASSES,
                                        magnification=20),
         'nometa': slide_testdata.write_slide(str(d / 'nometa.tif'), SLIDE_TILE, ((1,),),
                                              metadata=False)}
  (d / 'notes.svs').write_text('not a slide\n')
  out['corrupt'] = _corrupt_level0_tile(d)
  return d, out


def _corrupt_level0_tile(d):
  """A slide that opens (metadata and thumbnail fine) but whose level-0 tile data is garbage."""
  import tifffile  # pylint: disable=g-import-not-at-top
  from camkd_jax import slide_testdata  # pylint: disable=g-import-not-at-top
  path = str(d / 'corrupt.svs')
  slide_testdata.write_slide(path, SLIDE_TILE, ((2, 3),))
  with tifffile.TiffFile(path) as tif:
    offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
  with open(path, 'r+b') as f:
    for off, n in zip(offsets, counts):
      f.seek(off)
      f.write(bytes(range(256)) * (n // 256) + b'\x00' * (n % 256))
  return path
