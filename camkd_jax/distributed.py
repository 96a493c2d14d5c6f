"""Multi-process (multi-host) start-up: `jax.distributed.initialize` when configured, and only then.

  maybe_initialize(config, coordinator_address=None, num_processes=None, process_id=None)

Where the settings come from, first match wins:
  1. explicit arguments (cli.initialize_distributed passes the --coordinator_address /
     --num_processes / --process_id flags of main and slide),
  2. the environment: CAMKD_COORDINATOR (host:port of process 0), CAMKD_NUM_PROCESSES,
     CAMKD_PROCESS_ID,
  3. JAX's own detection, for whatever is still unset: Cloud TPU pods, SLURM (srun), Open MPI,
     and JAX_COORDINATOR_ADDRESS. With config.distributed=True and nothing else set this is a
     plain `jax.distributed.initialize()`.
A run is distributed when config.distributed is True or any setting of 1. or 2. is given; a
plain single-process run never touches the distributed runtime.

The call must come before anything that starts a JAX backend (jax.devices(), device_put, any
computation): JAX fixes the device set at that moment.

On CPU the cross-process collectives go through gloo (JAX 0.10's default; set where a JAX version
defaults to none), which is what lets two processes on one machine rehearse a multi-host run.

After initialisation `check_process_blocks` checks (and warns otherwise) what makes results
independent of the number of processes: in `jax.devices()` order (the order of
sharding.make_mesh's `data` axis) the devices of process 0 come first, then those of process 1,
..., each process holding the same number. Process p then owns rows [p * B / P, (p + 1) * B / P)
of every global batch, exactly the slice input_pipeline gives it, so the global batch, and with
it the per-example augmentation, is the same whatever the number of processes. (Verified for
the local CPU rehearsal; on other platforms the check warns if it does not hold.)
"""
import os
import signal
from typing import Callable, Dict, Optional, Tuple, TypeVar

from absl import logging
import jax

ENV_COORDINATOR = 'CAMKD_COORDINATOR'
ENV_NUM_PROCESSES = 'CAMKD_NUM_PROCESSES'
ENV_PROCESS_ID = 'CAMKD_PROCESS_ID'
ENV_TIMEOUT = 'CAMKD_INIT_TIMEOUT'        # seconds to wait for the other processes (default 300)

T = TypeVar('T')


def _int_setting(value, name: str, minimum: int) -> Optional[int]:
  if value is None or value == '':
    return None
  try:
    out = int(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name}={value!r} is not an integer') from None
  if out < minimum:
    raise ValueError(f'{name}={out} must be >= {minimum}')
  return out


def settings(coordinator_address: Optional[str] = None, num_processes=None, process_id=None,
             environ=None) -> Dict[str, object]:
  """The explicitly given settings (arguments, else CAMKD_* variables); unset keys are absent."""
  environ = os.environ if environ is None else environ
  coordinator = coordinator_address or environ.get(ENV_COORDINATOR) or None
  n_name = 'num_processes' if num_processes is not None else ENV_NUM_PROCESSES
  i_name = 'process_id' if process_id is not None else ENV_PROCESS_ID
  n = _int_setting(num_processes if num_processes is not None
                   else environ.get(ENV_NUM_PROCESSES), n_name, 1)
  i = _int_setting(process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
                   i_name, 0)
  if coordinator is not None and (':' not in coordinator or
                                  not coordinator.rsplit(':', 1)[1].isdigit()):
    raise ValueError(f'coordinator address {coordinator!r} (--coordinator_address or '
                     f'{ENV_COORDINATOR}) must be host:port of process 0, e.g. 10.0.0.1:12345')
  if n is not None and i is not None and i >= n:
    raise ValueError(f'{i_name}={i} must be smaller than {n_name}={n} (ids are 0 .. {n - 1})')
  out = {'coordinator_address': coordinator, 'num_processes': n, 'process_id': i}
  return {k: v for k, v in out.items() if v is not None}


def is_enabled(config, explicit: Dict[str, object]) -> bool:
  return bool(config is not None and config.get('distributed', False)) or bool(explicit)


def _use_gloo_on_cpu():
  """Cross-process collectives on the CPU backend (harmless on GPU / TPU)."""
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:  # a JAX without the option: nothing to choose
    return
  if current in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def maybe_initialize(config=None, *, coordinator_address: Optional[str] = None,
                     num_processes=None, process_id=None, initialization_timeout=None,
                     environ=None) -> bool:
  """Starts the JAX distributed runtime if this run is distributed; returns whether it did."""
  environ = os.environ if environ is None else environ
  explicit = settings(coordinator_address, num_processes, process_id, environ)
  if not is_enabled(config, explicit):
    return False
  timeout = _int_setting(initialization_timeout if initialization_timeout is not None
                         else environ.get(ENV_TIMEOUT), ENV_TIMEOUT, 1) or 300
  _use_gloo_on_cpu()
  logging.info('jax.distributed.initialize(%s)', ', '.join(
      f'{k}={v!r}' for k, v in explicit.items()) or 'auto-detect')
  try:
    jax.distributed.initialize(initialization_timeout=timeout, **explicit)
  except RuntimeError as e:
    if 'must be called before' in str(e):
      raise RuntimeError('camkd_jax.distributed.maybe_initialize must run before any JAX '
                         'computation or jax.devices() call (call it first thing in main)') from e
    raise
  except ValueError as e:
    raise ValueError(f'distributed run: JAX could not determine the cluster ({e}). Outside TPU '
                     f'pods, SLURM and Open MPI set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and '
                     f'{ENV_PROCESS_ID} (or --coordinator_address, --num_processes, '
                     f'--process_id) on every process.') from e
  check_process_blocks()
  logging.info('distributed: process %d of %d, %d local / %d global device(s)',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def check_process_blocks(devices=None) -> bool:
  """Whether `devices` (default jax.devices()) are grouped by process, in process order, with the
  same number per process; warns when not (see the module docstring for what depends on it)."""
  devices = jax.devices() if devices is None else list(devices)
  owners = [d.process_index for d in devices]
  count = max(owners) + 1
  expected = [p for p in range(count) for _ in range(len(devices) // count)]
  if owners == expected:
    return True
  logging.warning(
      'devices are not grouped by process in process order (process of each device in '
      'jax.devices() order: %s). Training is still correct data parallelism, but each '
      'process\'s rows of the global batch differ from its input-pipeline slice, so results '
      'are not identical to runs with another number of processes.', owners)
  return False


def is_main() -> bool:
  """Whether this is process 0, the one that writes files and logs progress."""
  return jax.process_index() == 0


def main_process_first(fn: Callable[[], T]) -> T:
  """fn() on process 0, then, after a barrier, on the others.

  For work that fills a shared cache, e.g. generating a TFDS dataset into a data_dir that every
  process sees: concurrent builds would race on the final rename.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    out = fn()
    multihost_utils.sync_global_devices('camkd_jax_main_process_first')
    return out
  multihost_utils.sync_global_devices('camkd_jax_main_process_first')
  return fn()


class _Preemption:
  calls = 0  # training steps so far in this process: the step id of JAX's preemption sync


def reached_preemption_sync_point() -> bool:
  """Call once after every training step, on every process: True on all of them at the same step
  once any process received SIGTERM (a scheduler's pre-emption notice).

  In a multi-process run jax.distributed's preemption service takes SIGTERM (our Python handler
  never sees it there): the notice is shared with every process and they agree on a safe step
  (jax.experimental.multihost_utils.reached_preemption_sync_point). The step id is this process's
  count of calls, the same on every process since all run the same steps from the same start.
  On one process (no service) it is False at no cost."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  step, _Preemption.calls = _Preemption.calls, _Preemption.calls + 1
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:  # jax_enable_preemption_service=False: SIGTERM reaches our handler
    return False


def agreed_signal(own: Optional[int]) -> Optional[int]:
  """The stop signal every process acts on: `own` (this process's pending SIGINT, or
  None) combined over all processes, the lowest process index with one winning. Call it at the
  same step on every process (it is a collective); on one process it returns `own` at no cost.

  Why: a Ctrl-C reaches one process (or several, not at the same instant), so each would stop
  (and write its collective checkpoint) at a different step and the group would hang. Agreeing
  at fixed steps makes all of them stop, and checkpoint, at the same one. (SIGTERM goes through
  reached_preemption_sync_point instead.)"""
  if jax.process_count() == 1:
    return own
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  signals = np.ravel(multihost_utils.process_allgather(np.int32(own or 0)))
  return own or next((int(s) for s in signals if s), None)


def stop_signal(own: Optional[int], sync: bool) -> Tuple[Optional[int], bool]:
  """(the signal all processes stop on now, or None; whether another process received it).

  Call once per training step on every process. `own`: this process's pending signal
  (camkd_jax.interrupts.pending). With several processes SIGTERM arrives through JAX's preemption
  sync (reached_preemption_sync_point, every call) and SIGINT by agreement (agreed_signal, a
  collective) at the steps where `sync` is True, the same on every process (log steps and epoch
  ends): a process signalled alone, or before the others, stops together with them. On one
  process: (own, False)."""
  if jax.process_count() == 1:
    return own, False
  signum = signal.SIGTERM if reached_preemption_sync_point() else None
  by_peer = signum is not None  # JAX's service took the signal: which process is not known
  if signum is None and sync:
    signum = agreed_signal(own)
    by_peer = signum is not None and own is None
  return signum, by_peer
