"""Ctrl-C (SIGINT) and pre-emption (SIGTERM) that stop a run at a step boundary, checkpointed.

`install()` (the command line does it) replaces the default handlers. Inside a training loop
(`deferred()`), a signal is only recorded: the loop finishes the step it is in, checkpoints it
(if no checkpoint holds it yet) and raises errors.Interrupted with the message
  interrupted at step N; rerun the same command to resume from step M (teacher stage, SIGINT)
Outside a loop (data loading, exports, figures) a signal raises errors.Interrupted at once: nothing
of a stage is lost there (its last step is checkpointed before its loop ends). A second Ctrl-C
during a deferred stop raises at once too. camkd_jax.main exits with 130 (SIGINT) or 143 (SIGTERM).

A signal that lands in code whose exceptions Python only prints (JAX's garbage-collection
callback, a __del__) is sent again from a helper thread (sys.unraisablehook), so it is neither
printed as a traceback nor lost.

The state is per process. With several processes (jax.distributed) the training loop makes them
stop at the same step with one collective checkpoint, whichever process was signalled: SIGTERM is
taken by JAX's preemption service, which shares the notice and picks a safe step
(camkd_jax.distributed.reached_preemption_sync_point, checked after every step); SIGINT is agreed
on at every log step and epoch end (distributed.agreed_signal; both in distributed.stop_signal).
Such processes report `(..., SIGTERM, process group)` and exit with the signal's code. A SIGINT
outside the training loop (data loading, export) stops only the process that received it; a
SIGTERM there is held by JAX until the next training step (or ignored if none follows).
"""
import contextlib
import signal
import sys
import threading
from typing import Optional

from camkd_jax import errors

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESEND_DELAY_S = 0.01


class _State:
  signum: Optional[int] = None  # the signal received and not yet acted on
  deferring = 0                 # > 0 inside deferred()
  stage = ''                    # the stage whose loop ran last
  step = 0                      # its last finished step
  saved: Optional[int] = None   # its latest checkpointed step
  in_hook = False               # inside _unraisable


_state = _State()


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def resume_message(signum: int, by_peer: bool = False) -> str:
  """'interrupted at step N; rerun the same command to resume from step M (stage, SIGNAL)'
  ('SIGNAL, process group' when it reached this process through a multi-process agreement)."""
  if not _state.stage:
    return (f'interrupted before the first training step ({signal_name(signum)}); rerun the same '
            'command to start again')
  saved = 0 if _state.saved is None else _state.saved
  source = ', process group' if by_peer else ''
  return (f'interrupted at step {_state.step}; rerun the same command to resume from step '
          f'{saved} ({_state.stage} stage, {signal_name(signum)}{source})')


def _handler(signum, frame):  # pylint: disable=unused-argument
  again = _state.signum is not None
  _state.signum = signum
  if _state.in_hook:
    # The resent signal arrived while _unraisable itself still runs (a loaded machine: starting
    # the helper thread took longer than its delay). Raising here would be lost as well.
    _resend(signum)
    return
  if not _state.deferring or again:
    # Raised from wherever the main thread is; if that is a callback whose exceptions Python
    # only prints, _unraisable raises it again.
    raise errors.Interrupted(resume_message(signum), signum)


def _resend(signum: int):
  """The same signal to the main thread again, from a helper thread, a moment later."""
  threading.Timer(RESEND_DELAY_S, signal.pthread_kill,
                  (threading.main_thread().ident, signum)).start()


def _unraisable(info):
  """An Interrupted raised where Python can only print it (a garbage-collection callback, a
  __del__) is raised again in the main thread's own code instead of being printed and lost."""
  if isinstance(info.exc_value, errors.Interrupted):
    # Sent again once this hook has returned; until then the handler only re-arms it.
    _state.in_hook = True
    try:
      _resend(info.exc_value.signum)
    finally:
      _state.in_hook = False
    return
  _previous_hook(info)


_previous_hook = sys.unraisablehook


def install():
  """Handles SIGINT and SIGTERM as above (main thread only; elsewhere a no-op)."""
  global _previous_hook
  if threading.current_thread() is not threading.main_thread():
    return
  reset()
  for s in SIGNALS:
    signal.signal(s, _handler)
  if sys.unraisablehook is not _unraisable:
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable


def reset():
  _state.signum, _state.deferring, _state.stage, _state.step, _state.saved = None, 0, '', 0, None
  _state.in_hook = False


@contextlib.contextmanager
def deferred():
  """Signals received inside are recorded (see pending()), not raised."""
  _state.deferring += 1
  try:
    yield
  finally:
    _state.deferring -= 1


def pending() -> Optional[int]:
  """The signal received inside deferred() and not yet acted on, or None."""
  return _state.signum


def progress(stage: str, step: int, saved: Optional[int]):
  """Where the current stage stands (for the message of an interrupt outside its loop)."""
  _state.stage, _state.step, _state.saved = stage, int(step), saved


def stop(signum: int, by_peer: bool = False):
  """Raises the Interrupted of a recorded signal (after the caller checkpointed)."""
  raise errors.Interrupted(resume_message(signum, by_peer), signum)
