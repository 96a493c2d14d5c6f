r"""Command line: train a teacher and distil it into a lower-magnification student.

  python -m camkd_jax.main --config configs/attn_kd.py [--workdir DIR]
  python -m camkd_jax.main --config configs/attn_kd.py:magnification=1.25,seeds=22,32,43
  python -m camkd_jax.main --config configs/attn_kd.py --config.num_epochs=10

Run from the repository root (the configs import configs/base.py). The default workdir is
workdirs/<config name>_m<magnification> (workdirs/teacher for configs/teacher.py). Rerunning the
same command resumes from the latest checkpoint in the workdir.
"""
import logging as std_logging
import os
import sys

# TensorFlow (input pipeline only) is chatty at start-up; keep the console for progress lines.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from camkd_jax import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from camkd_jax import workdir as workdir_lib
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from camkd_jax.datasets import base

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/attn_kd.py[:key=value,...].',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Output directory (default: workdirs/<config name>_m<magnification>).')
# Multi-host (see camkd_jax/distributed.py); unset values come from CAMKD_* or JAX's detection.
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 (or CAMKD_COORDINATOR); starts jax.distributed.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (or CAMKD_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 '
                     '(or CAMKD_PROCESS_ID).')


def _quiet_libraries(record):
  """Drops INFO lines of orbax / TFDS internals (dozens per checkpoint); warnings stay."""
  noisy = any(f'{os.sep}{lib}{os.sep}' in record.pathname
              for lib in ('orbax', 'tensorflow_datasets', 'jax'))
  return not (noisy and record.levelno < std_logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
  config = FLAGS.config
  # Before any other JAX use: the set of devices is fixed when the backend starts.
  distributed.maybe_initialize(config, coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # one progress log: process 0's
  workdir = FLAGS.workdir or workdir_lib.default_workdir(
      config_flags.get_config_filename(FLAGS['config']), config)
  logging.info('workdir %s', workdir)
  try:
    train.run(config, workdir)
  except base.DataError as e:  # bad data: the message says what and where, no traceback
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
