"""camkd_jax.interrupts: re-arming. The handler installed twice, or again after a signal was acted
on, behaves as installed once; the multi-process wording; a thread that is not the main one.
(Signals outside / inside a loop and the unraisable-hook race: tests/test_errors.py.)"""
import os
import signal
import sys
import threading

import pytest

from camkd_jax import errors
from camkd_jax import interrupts


@pytest.fixture
def restore_handlers():
  """The process's handlers and unraisable hook come back after the test."""
  old = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
  hook, previous = sys.unraisablehook, interrupts._previous_hook
  yield
  for s, h in old.items():
    signal.signal(s, h)
  sys.unraisablehook, interrupts._previous_hook = hook, previous
  interrupts.reset()


def test_installed_twice_wraps_the_hook_once_and_still_raises(restore_handlers):
  hook = sys.unraisablehook = lambda info: None  # the process's hook before the first install
  interrupts.install()
  interrupts.install()
  assert sys.unraisablehook is interrupts._unraisable
  # The hook it falls back to for other exceptions is the one before, not itself (no loop).
  assert interrupts._previous_hook is hook
  for s in interrupts.SIGNALS:
    assert signal.getsignal(s) is interrupts._handler
  with pytest.raises(errors.Interrupted) as info:
    os.kill(os.getpid(), signal.SIGINT)
  assert info.value.exit_code == 130 and info.value.signum == signal.SIGINT


def test_install_after_a_signal_rearms(restore_handlers):
  """A run stopped by a signal leaves it recorded; the next install (the next run in the same
  process, e.g. a sweep) starts clean: nothing pending, a fresh message, a signal deferred again."""
  interrupts.install()
  interrupts.progress('teacher', 5, 5)
  with interrupts.deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    assert interrupts.pending() == signal.SIGTERM
  with pytest.raises(errors.Interrupted) as info:
    interrupts.stop(interrupts.pending())
  assert info.value.exit_code == 143
  assert str(info.value) == ('interrupted at step 5; rerun the same command to resume from step 5 '
                             '(teacher stage, SIGTERM)')
  interrupts.install()
  assert interrupts.pending() is None
  assert interrupts.resume_message(signal.SIGINT) == (
      'interrupted before the first training step (SIGINT); rerun the same command to start again')
  interrupts.progress('student', 3, None)
  with interrupts.deferred():
    os.kill(os.getpid(), signal.SIGINT)  # deferred again: the first signal of this run
    assert interrupts.pending() == signal.SIGINT
  assert interrupts.resume_message(signal.SIGINT, by_peer=True) == (
      'interrupted at step 3; rerun the same command to resume from step 0 (student stage, '
      'SIGINT, process group)')


def test_nested_deferred_blocks_defer_until_the_outermost_ends(restore_handlers):
  interrupts.install()
  with interrupts.deferred():
    with interrupts.deferred():
      pass
    os.kill(os.getpid(), signal.SIGINT)  # still inside the outer block: recorded
    assert interrupts.pending() == signal.SIGINT
  interrupts.reset()
  with pytest.raises(errors.Interrupted):
    os.kill(os.getpid(), signal.SIGINT)  # outside every block: at once


def test_install_outside_the_main_thread_changes_nothing(restore_handlers):
  before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
  hook = sys.unraisablehook
  t = threading.Thread(target=interrupts.install)
  t.start()
  t.join()
  assert {s: signal.getsignal(s) for s in interrupts.SIGNALS} == before
  assert sys.unraisablehook is hook


def test_other_unraisable_exceptions_reach_the_previous_hook(restore_handlers):
  seen = []
  sys.unraisablehook = seen.append
  interrupts.install()

  class Info:
    exc_value = RuntimeError('not a signal')
  interrupts._unraisable(Info)
  assert seen == [Info]
