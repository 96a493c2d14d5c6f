"""Errors that end a run with one sentence instead of a traceback.

Every error the user can fix (a config key, a workdir, the disk, a teacher export, the data)
derives from `UserError`; the command line (camkd_jax.main) prints `error: <message>` on one
screen, without a traceback, and exits with EXIT_USER_ERROR. The subclasses also derive from the
built-in type callers already catch (ValueError, OSError, FileNotFoundError), so existing
`except ValueError` code keeps working. Data errors (camkd_jax.datasets.base.DataError) are meant
to derive from UserError too.

Interrupts: SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) become `Interrupted`, raised
between steps; the driver checkpoints the last finished step and main exits with 130 / 143.

No TensorFlow or JAX here: importable from anywhere.
"""
import contextlib
import difflib
import errno
import os
import signal
from typing import Iterable, Optional

EXIT_USER_ERROR = 2
EXIT_SIGINT = 128 + signal.SIGINT    # 130, as a shell reports a Ctrl-C'd command
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class UserError(Exception):
  """An error with a message that names what is wrong, where, and what to do."""


class ConfigError(UserError, ValueError):
  """A config key or value that cannot work."""


class WorkdirError(UserError, ValueError):
  """The workdir holds something this run may not use or replace."""


class ModelExportError(UserError, FileNotFoundError):
  """An exported model (teacher/ or student/) that is missing parts or cannot be read."""


class OutputError(UserError, OSError):
  """The disk refused a write (full, read-only, no permission); errno and filename are set."""

  def __str__(self):
    return str(self.args[0])  # the sentence (OSError's own text would be '[Errno N] ...')


class NonFiniteError(UserError, FloatingPointError):
  """A loss term, the total or a gradient became NaN / inf; the message names the step, the term
  and the last good checkpoint, and what to change."""


class Interrupted(UserError):
  """SIGINT / SIGTERM, raised between training steps."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return EXIT_SIGTERM if self.signum == signal.SIGTERM else EXIT_SIGINT


def is_user_error(exc: BaseException) -> bool:
  """A fault of the input, config or machine (every UserError, camkd_jax.datasets' DataError
  included): the message says what to do, so no traceback."""
  return isinstance(exc, UserError)


def closest(name: str, known: Iterable[str]) -> str:
  """" (did you mean 'x'?)" for the closest known name, or ''."""
  known = list(known)
  match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  if not match:  # a nested key: compare the last part ('widht' -> 'model.width')
    tails = {k.rsplit('.', 1)[-1]: k for k in known}
    tail = difflib.get_close_matches(name.rsplit('.', 1)[-1], list(tails), n=1, cutoff=0.7)
    match = [tails[tail[0]]] if tail else []
  return f' (did you mean {match[0]!r}?)' if match else ''


# ----------------------------------------------------------------------------- disk faults
DISK_ERRNOS = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is exceeded',
               errno.EROFS: 'the file system is read-only', errno.EACCES: 'permission denied',
               errno.EPERM: 'permission denied'}


def find_disk_error(exc: BaseException) -> Optional[OSError]:
  """The OSError with a disk errno in `exc` or the exceptions it was raised from (orbax wraps)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
      return exc
    # TensorFlow's file errors (TensorBoard events) carry no errno, only the system's text.
    for code in DISK_ERRNOS:
      if not isinstance(exc, OSError) and os.strerror(code) in str(exc):
        return OSError(code, os.strerror(code))
    exc = exc.__cause__ or exc.__context__
  return None


def disk_message(err: OSError, path: str, what: str, resume: str = '') -> str:
  where = err.filename or path
  fix = ('free space on it' if err.errno in (errno.ENOSPC, errno.EDQUOT) else
         'make it writable')
  return (f'cannot write {what} to {where}: {DISK_ERRNOS[err.errno]} ({os.strerror(err.errno)}). '
          f'{fix[0].upper() + fix[1:]} or choose another --workdir, then rerun the same command'
          f'{resume}. Nothing written before was lost.')


@contextlib.contextmanager
def disk_writes(path: str, what: str, resume: str = ''):
  """Turns a full / read-only / forbidden disk under `path` into an OutputError naming it."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    err = find_disk_error(e)
    if err is None:
      raise
    out = OutputError(disk_message(err, path, what, resume))
    out.errno, out.filename = err.errno, err.filename or path
    raise out from e
