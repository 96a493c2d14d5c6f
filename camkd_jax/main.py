r"""Command line: train a teacher and distil it into a lower-magnification student.

  python -m camkd_jax.main --config configs/attn_kd.py [--workdir DIR]
  python -m camkd_jax.main --config configs/attn_kd.py:magnification=1.25,seeds=22,32,43
  python -m camkd_jax.main --config configs/attn_kd.py --config.num_epochs=10

Run from the repository root (the configs import configs/base.py). The default workdir is
workdirs/<config name>_m<magnification> (workdirs/teacher for configs/teacher.py). Rerunning the
same command resumes from the latest checkpoint in the workdir.
"""
import importlib.util
import re

# TensorFlow (input pipeline only) is chatty at start-up (its oneDNN notice); keep the console
# for progress lines. Before anything imports TensorFlow.
from camkd_jax import quiet_tf  # noqa: F401  pylint: disable=unused-import

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from camkd_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import interrupts  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import runs  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from camkd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/attn_kd.py[:key=value,...].',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Output directory (default: workdirs/<config name>_m<magnification>).')
cli.define_distributed_flags()  # multi-host: see camkd_jax/distributed.py


def _config_file_arg(argv):
  """The value of --config in argv ('' if absent)."""
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _config_keys(argv):
  """Dotted keys of the config that --config names (empty if it cannot be loaded)."""
  path, _, arg = _config_file_arg(argv).partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_camkd_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return []
  return list(runs.flatten(config))


def flag_error_message(error, argv) -> str:
  """One line for a flag error: an unknown --config.KEY with the closest key, the last line of
  a config file's error (e.g. an unknown config argument), or absl's own message."""
  text = str(error)
  if 'Error whilst parsing config file' in text:
    last = [l.strip() for l in text.strip().splitlines() if l.strip()][-1]
    return last.split(': ', 1)[1] if ': ' in last and last.split(':')[0].endswith(
        ('Error', 'Exception')) else last
  for a in argv:
    key = a[len('--config.'):].split('=', 1)[0] if a.startswith('--config.') else ''
    last = key.rsplit('.', 1)[-1]
    if key and re.search(rf'\b{re.escape(last)}\b', text):
      keys = _config_keys(argv)
      if key in keys:  # a known key with a bad value: absl's message says what is wrong
        break
      return (f'unknown config key {key!r} in {a}{errors.closest(key, keys)}; the keys are '
              'defined in configs/base.py')
  return text.splitlines()[0] if text else type(error).__name__


def parse_flags(argv):
  """absl's flag parsing, with a bad flag or config argument as one line (exit code 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    cli.fail(flag_error_message(e, argv))
  except Exception as e:  # pylint: disable=broad-except
    # lock_config=True: an override of an unknown key surfaces as AttributeError/KeyError.
    if any(a.startswith('--config.') for a in argv) and isinstance(e, (AttributeError, KeyError)):
      cli.fail(flag_error_message(e, argv))
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  interrupts.install()
  with cli.user_errors(cli.USER_ERRORS):  # anything else is a bug: it keeps its traceback
    _main(argv)


def _main(argv):
  del argv
  cli.quiet_logging()
  config = FLAGS.config
  cli.initialize_distributed(config)  # before any other JAX use
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # one progress log: process 0's
  workdir = FLAGS.workdir or workdir_lib.default_workdir(
      config_flags.get_config_filename(FLAGS['config']), config)
  logging.info('workdir %s', workdir)
  train.run(config, workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)
