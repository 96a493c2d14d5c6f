"""What the commands (camkd_jax.main, .predict, .slide, .export) share on the command line.

  with cli.user_errors():     # a user error -> `error: <message>` on stderr, exit code 2
    ...                       # Interrupted (SIGINT / SIGTERM) -> its message, exit 130 / 143
  cli.quiet_logging()         # INFO lines of orbax / TFDS / JAX internals dropped
  cli.define_distributed_flags(); cli.initialize_distributed(config)

A user error is one the message says how to fix (errors.UserError, camkd_jax.datasets' DataError
included); the commands that load a finished run also count the built-in FileNotFoundError /
ValueError that inference and the data readers raise (`COMMAND_ERRORS`). Anything else is a bug
and keeps its traceback. The exit codes are errors.EXIT_USER_ERROR (2) and Interrupted.exit_code
(130 / 143); see docs/faults.md.
"""
import contextlib
import logging as std_logging
import os
import sys
from typing import NoReturn, Tuple, Type

from camkd_jax import errors

# The errors main counts as the user's: every UserError.
USER_ERRORS: Tuple[Type[BaseException], ...] = (errors.UserError,)
# predict, slide and export: also the plain FileNotFoundError / ValueError of inference (a missing
# or unfinished run) and of the data readers.
COMMAND_ERRORS: Tuple[Type[BaseException], ...] = (errors.UserError, FileNotFoundError,
                                                   ValueError)
NOISY_LIBRARIES = ('orbax', 'tensorflow_datasets', 'jax')


def fail(message: str, code: int = errors.EXIT_USER_ERROR) -> NoReturn:
  """Prints `error: message` on stderr (no traceback) and exits with `code`."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def user_errors(kinds: Tuple[Type[BaseException], ...] = COMMAND_ERRORS):
  """Ends the command with one `error:` line for an Interrupted (its exit code) or an error of
  `kinds` (exit code 2); other exceptions propagate with their traceback."""
  try:
    yield
  except errors.Interrupted as e:
    fail(str(e), e.exit_code)
  except kinds as e:  # pylint: disable=catching-non-exception
    fail(str(e))


def quiet_library_record(record: std_logging.LogRecord) -> bool:
  """A logging filter: False for INFO (and lower) lines logged from orbax, TFDS or JAX code
  (dozens per checkpoint); their warnings stay."""
  noisy = any(f'{os.sep}{lib}{os.sep}' in record.pathname for lib in NOISY_LIBRARIES)
  return not (noisy and record.levelno < std_logging.WARNING)


def quiet_logging():
  """Adds quiet_library_record to absl's log handler (once)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler().python_handler
  if quiet_library_record not in handler.filters:
    handler.addFilter(quiet_library_record)


# ----------------------------------------------------------------------------- multi-host
def define_distributed_flags():
  """--coordinator_address, --num_processes, --process_id (see camkd_jax/distributed.py); unset
  values come from CAMKD_* or JAX's own cluster detection."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 (or CAMKD_COORDINATOR); starts jax.distributed.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (or CAMKD_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 '
                       '(or CAMKD_PROCESS_ID).')


def initialize_distributed(config=None) -> bool:
  """distributed.maybe_initialize with the flags of define_distributed_flags. Call it before any
  other JAX use: the set of devices is fixed when the backend starts."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from camkd_jax import distributed  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  return distributed.maybe_initialize(config, coordinator_address=fl.coordinator_address,
                                      num_processes=fl.num_processes, process_id=fl.process_id)
