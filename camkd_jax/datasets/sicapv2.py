"""`sicapv2`: TFDS builder over the manually downloaded SICAPv2 archive (prostate Gleason grading).

SICAPv2 (Silva-Rodriguez et al. 2020, CC BY 4.0) cannot be fetched automatically: download it from
Mendeley Data and extract it into the manual directory (config.data.manual_dir, which the config
argument data_dir=... sets):

  <manual_dir>/images/*.jpg                              512x512 patches at 10x
  <manual_dir>/partition/Validation/Val1..Val4/{Train,Test}.xlsx
  <manual_dir>/partition/Test/{Train,Test}.xlsx

(a top-level SICAPv2/ folder from the zip is also accepted). Spreadsheet columns:
image_name, NC, G3, G4, G5, G4C (one-hot class; G4C flags cribriform G4 and is kept as a feature).

One builder config per validation fold, as in the reference: train = Validation/<fold>/Train.xlsx,
validation = Validation/<fold>/Test.xlsx, test = Test/Test.xlsx. Images are stored as their
original JPEG bytes at their original size (the pipeline resizes). Every image is decoded once when
the dataset is built, so a corrupt or truncated file is named then (or skipped, with
skip_corrupt=True; the skipped names are kept in the dataset's metadata).
"""
import dataclasses
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from camkd_jax.datasets import base
from camkd_jax.datasets import tfds_source

CLASS_NAMES = ('NC', 'G3', 'G4', 'G5')
FOLDS = ('Val1', 'Val2', 'Val3', 'Val4')
URL = 'https://data.mendeley.com/datasets/9xxm58dvs3/2'
INSTRUCTIONS = f"""\
SICAPv2 must be downloaded by hand: Mendeley Data, dataset 9xxm58dvs3 version 2 (~2.2 GB),
{URL} ("Download All"). Extract the zip so that the manual directory holds images/ and
partition/ (a single SICAPv2/ folder inside it is fine too), and pass that directory as
--config configs/<experiment>.py:dataset=sicapv2,data_dir=DIR."""


@dataclasses.dataclass
class Sicapv2Config(tfds.core.BuilderConfig):
  fold: str = 'Val1'


def partition_paths(root, fold):
  """{split: spreadsheet path} of a fold (train/validation from the fold, test from Test/)."""
  return {
      'train': os.path.join(root, 'partition', 'Validation', fold, 'Train.xlsx'),
      'validation': os.path.join(root, 'partition', 'Validation', fold, 'Test.xlsx'),
      'test': os.path.join(root, 'partition', 'Test', 'Test.xlsx'),
  }


def find_root(manual_dir, fold):
  """The folder holding images/ and partition/; raises naming everything that is missing."""
  manual_dir = os.fspath(manual_dir) if manual_dir else ''
  candidates = [manual_dir, os.path.join(manual_dir, 'SICAPv2')] if manual_dir else []
  for root in candidates:
    if os.path.isdir(os.path.join(root, 'images')):
      break
  else:
    root = manual_dir
  missing = []
  if not manual_dir or not os.path.isdir(manual_dir):
    missing.append(f'the manual directory {manual_dir!r} itself')
  else:
    if not os.path.isdir(os.path.join(root, 'images')):
      missing.append(os.path.join(root, 'images') + '/ (the JPEG patches)')
    missing += [p for p in partition_paths(root, fold).values() if not os.path.isfile(p)]
  if missing:
    raise base.DataNotFoundError(
        f'SICAPv2 ({fold}) is not where it was expected; missing:\n  ' + '\n  '.join(missing)
        + '\n' + INSTRUCTIONS)
  return root


def read_partition(path):
  """[(row_number, image_name, label, g4c)] of one partition spreadsheet."""
  header, rows = base.read_table(path)
  col = {h: j for j, h in enumerate(header)}
  need = ['image_name'] + list(CLASS_NAMES)
  lacking = [c for c in need if c not in col]
  if lacking:
    raise base.DataError(f'{path}: missing column(s) {lacking}; expected {need + ["G4C"]}, '
                     f'found {header}')
  out = []
  for n, r in rows:
    name = r[col['image_name']]
    where = f'{path}, row {n} (image_name {name!r})'
    if not name:
      raise base.DataError(f'{path}, row {n}: empty image_name')
    label = base.one_hot_label([r[col[c]] for c in CLASS_NAMES], CLASS_NAMES, where)
    g4c = r[col['G4C']] if 'G4C' in col else ''
    try:
      g4c = int(float(g4c)) if g4c else 0
    except ValueError:
      raise base.DataError(f'{where}: G4C must be 0/1, got {g4c!r}') from None
    out.append((n, name, label, g4c))
  return out


class Sicapv2(tfds.core.GeneratorBasedBuilder):
  """SICAPv2 prostate patches (NC, G3, G4, G5), one config per validation fold."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  BUILDER_CONFIGS = [Sicapv2Config(name=f, fold=f, description=f'Fold {f}: train = '
                                   f'Validation/{f}/Train.xlsx, validation = Validation/{f}/'
                                   'Test.xlsx, test = Test/Test.xlsx.') for f in FOLDS]
  DEFAULT_CONFIG_NAME = 'Val1'
  code_path = tfds_source.CODE_PATH

  def __init__(self, *, skip_corrupt=False, **kwargs):
    self._skip_corrupt = skip_corrupt
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            'image_name': tfds.features.Text(),
            'g4c': tfds.features.Scalar(dtype=np.int32, doc='cribriform G4 flag'),
        }),
        supervised_keys=('image', 'label'),
        homepage=URL,
        citation='Silva-Rodriguez et al., "Going deeper through the Gleason scoring scale: an '
                 'automatic end-to-end system for histology prostate grading and cribriform '
                 'pattern detection", Computer Methods and Programs in Biomedicine, 2020.',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    fold = self.builder_config.fold
    root = find_root(dl_manager._manual_dir, fold)  # pylint: disable=protected-access
    images = os.path.join(root, 'images')
    splits = {s: read_partition(p) for s, p in partition_paths(root, fold).items()}
    names = sorted({r[1] for rows in splits.values() for r in rows})
    paths = [os.path.join(images, n) for n in names]
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
      raise base.DataNotFoundError(
          f'SICAPv2: {len(absent)} image(s) listed in the partition spreadsheets are missing '
          f'from {images}, e.g. {absent[:3]}; the archive may be incompletely extracted.\n'
          + INSTRUCTIONS)
    logging.info('SICAPv2: checking that %d images decode', len(paths))
    bad = base.find_unreadable(paths)
    if bad and not self._skip_corrupt:
      raise base.DataError('SICAPv2: ' + base.corrupt_files_message(
          [(paths[i], r) for i, r in bad], len(paths)))
    skipped = sorted(names[i] for i, _ in bad)
    if skipped:
      logging.warning('SICAPv2: skipping %d unreadable image(s): %s', len(skipped), skipped[:10])
    self.info.metadata['skipped'] = skipped
    drop = set(skipped)
    return {s: self._generate_examples(images, [r for r in rows if r[1] not in drop])
            for s, rows in splits.items()}

  def _generate_examples(self, images, rows):
    for _, name, label, g4c in rows:
      with open(os.path.join(images, name), 'rb') as f:
        data = f.read()
      yield name, {'image': data, 'label': label, 'image_name': name, 'g4c': g4c}


def source(config):
  """Builds (once) the fold config.data.fold and returns it as a `base.Source`."""
  fold = config.data.fold
  if fold not in FOLDS:
    raise base.DataError(f'unknown SICAPv2 fold {fold!r} (config.data.fold); known: {list(FOLDS)}')
  data_dir = config.data.data_dir or None

  def manual_dir(builder):
    # TFDS's default place for manual downloads unless the config names one
    return (config.data.manual_dir or config.data.data_dir
            or os.path.join(os.fspath(builder.data_dir_root), 'downloads', 'manual'))

  def build(builder):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir(builder)))

  builder = tfds_source.prepared(
      lambda: Sicapv2(config=fold, data_dir=data_dir, skip_corrupt=bool(config.data.skip_corrupt)),
      build, check=lambda b: find_root(manual_dir(b), fold))  # a clear error before TFDS's own
  skipped = list(builder.info.metadata.get('skipped', []))
  return tfds_source.TfdsSource('sicapv2', builder, name_feature='image_name',
                                skipped_names=skipped)
