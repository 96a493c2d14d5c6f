"""Datasets behind the input pipeline, all seen through `base.Source`.

  synthetic_histology  embedded TFDS builder (no download), the default
  sicapv2              TFDS builder over the manually downloaded SICAPv2 archive
  folder, table        bring-your-own patches (plain file lists)

Only this package and camkd_jax/input_pipeline.py import TensorFlow.
"""
from absl import logging
from camkd_jax import quiet_tf  # noqa: F401  (before TensorFlow)

KNOWN = ('synthetic_histology', 'sicapv2', 'folder', 'table')


def get_source(config):
  """The `base.Source` named by config.data.name (prepared / listed, ready to read)."""
  name = config.data.name
  if name not in KNOWN:
    raise ValueError(f'unknown dataset {name!r} (config.data.name); known: {list(KNOWN)}')
  if name in ('folder', 'table'):
    from camkd_jax.datasets import folder  # pylint: disable=g-import-not-at-top
    from camkd_jax.datasets import table  # pylint: disable=g-import-not-at-top
    return folder.folder_source(config) if name == 'folder' else table.table_source(config)
  from camkd_jax.datasets import tfds_source  # pylint: disable=g-import-not-at-top
  data_dir = config.data.data_dir or None
  if name == 'synthetic_histology':
    from camkd_jax.datasets import synthetic_histology as sh  # pylint: disable=g-import-not-at-top
    size = config.data.synthetic_size
    known = [c.name for c in sh.SyntheticHistology.BUILDER_CONFIGS]
    if size not in known:
      raise ValueError(f'unknown synthetic_histology size {size!r} (config.data.synthetic_size);'
                       f' known: {known}')

    def generate(builder):
      logging.info('generating synthetic_histology/%s into %s (once; cached by TFDS)', size,
                   builder.data_dir)
      builder.download_and_prepare()

    builder = tfds_source.prepared(lambda: sh.SyntheticHistology(config=size, data_dir=data_dir),
                                   generate)
    return tfds_source.TfdsSource('synthetic_histology', builder)
  from camkd_jax.datasets import sicapv2  # pylint: disable=g-import-not-at-top
  return sicapv2.source(config)
