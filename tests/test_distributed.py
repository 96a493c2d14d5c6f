"""camkd_jax.distributed: settings, and multi-process data parallelism: the real CLI as
two processes == one process.

`python -m camkd_jax.main` runs as TWO processes on localhost (CPU backend, gloo collectives, two
fake devices each, coordinator on a free port chosen at run time) and as ONE process with FOUR
devices, both fed the same global batches (the smoke config: teacher and AT+ student, 3 steps
each, augmentation on, evaluation batches that need padding). The tests check that
  * parameters, losses and metrics of the two runs agree (to float tolerance: only the order of
    the cross-device sums differs), every evaluation example counted once;
  * files come from process 0 only (one TensorBoard stream, one summary on the console);
  * a two-process run killed with SIGKILL in the middle of the student stage and restarted
    resumes from its (collective, orbax) checkpoint and ends exactly as the uninterrupted run.
Every launch has a deadline; all its processes are killed as soon as one fails or it runs out.
A persistent compilation cache shared by the runs keeps the relaunches cheap.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import ml_collections
import numpy as np
import pytest

from camkd_jax import distributed
from helpers import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 420                 # per launch, all its processes together (2-core CI: ~1-2 min)
CONFIG = 'configs/attn_kd.py:smoke=1'
# 32 validation / test examples: 12 per global batch leaves padded batches on 1 and 2 processes.
ARGS = ['--config.eval_batch_size=12']
NO_FIGURES = ['--config.num_figure_images=0']   # figures only where checked: saves compiles
FLOAT_RTOL = 1e-4                # two processes vs one: only the reduction order differs


# ----------------------------------------------------------------------------- settings (fast)
def test_settings_arguments_override_environment():
  env = {'CAMKD_COORDINATOR': 'envhost:1', 'CAMKD_NUM_PROCESSES': '4', 'CAMKD_PROCESS_ID': '3'}
  assert distributed.settings(environ=env) == {
      'coordinator_address': 'envhost:1', 'num_processes': 4, 'process_id': 3}
  assert distributed.settings('h:2', 2, 1, environ=env) == {
      'coordinator_address': 'h:2', 'num_processes': 2, 'process_id': 1}
  # Empty variables count as unset; nothing set -> nothing explicit.
  assert distributed.settings(environ={'CAMKD_COORDINATOR': '', 'CAMKD_PROCESS_ID': ''}) == {}


@pytest.mark.parametrize('env, match', [
    ({'CAMKD_NUM_PROCESSES': 'two'}, 'CAMKD_NUM_PROCESSES=.two. is not an integer'),
    ({'CAMKD_NUM_PROCESSES': '0'}, 'CAMKD_NUM_PROCESSES=0 must be >= 1'),
    ({'CAMKD_PROCESS_ID': '-1'}, 'CAMKD_PROCESS_ID=-1 must be >= 0'),
    ({'CAMKD_NUM_PROCESSES': '2', 'CAMKD_PROCESS_ID': '2'}, 'CAMKD_PROCESS_ID=2 must be smaller'),
    ({'CAMKD_COORDINATOR': 'localhost'}, 'must be host:port'),
])
def test_bad_settings_name_the_variable(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.settings(environ=env)


def test_single_process_run_never_initializes(monkeypatch):
  def fail(**kwargs):
    raise AssertionError(f'jax.distributed.initialize called with {kwargs}')
  monkeypatch.setattr(distributed.jax.distributed, 'initialize', fail)
  config = ml_collections.ConfigDict({'distributed': False})
  assert distributed.maybe_initialize(config, environ={}) is False
  assert distributed.maybe_initialize(None, environ={}) is False
  assert distributed.is_enabled(ml_collections.ConfigDict({'distributed': True}), {})
  assert distributed.is_enabled(config, {'num_processes': 2})


def test_initialize_receives_explicit_settings(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, 'check_process_blocks', lambda: None)
  env = {'CAMKD_COORDINATOR': 'h:5', 'CAMKD_NUM_PROCESSES': '2', 'CAMKD_PROCESS_ID': '1',
         'CAMKD_INIT_TIMEOUT': '7'}
  assert distributed.maybe_initialize(None, environ=env) is True
  assert calls == [{'coordinator_address': 'h:5', 'num_processes': 2, 'process_id': 1,
                    'initialization_timeout': 7}]
  # config.distributed alone: JAX auto-detects everything (TPU pods, SLURM, Open MPI).
  calls.clear()
  assert distributed.maybe_initialize(ml_collections.ConfigDict({'distributed': True}),
                                      environ={}) is True
  assert calls == [{'initialization_timeout': 300}]


def test_check_process_blocks():
  dev = lambda p: types.SimpleNamespace(process_index=p)
  assert distributed.check_process_blocks([dev(0), dev(0), dev(1), dev(1)])
  assert distributed.check_process_blocks([dev(0)])
  for owners in ([0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]):
    assert not distributed.check_process_blocks([dev(p) for p in owners]), owners


# ----------------------------------------------------------------------------- launching
def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int, cache_dir: str, extra=None):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('CAMKD_', 'JAX_COORDINATOR', 'SLURM_', 'OMPI_', 'XLA_FLAGS'))}
  env.update(PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''), JAX_PLATFORMS='cpu',
             # Cheaper CPU compiles (same flags for every run: the numerics stay comparable).
             XLA_FLAGS=xla_flags(devices),
             TF_CPP_MIN_LOG_LEVEL='2', CAMKD_INIT_TIMEOUT='120',
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.update(extra or {})
  return env


class Launch:
  """`num_processes` processes of the CLI (a jax.distributed group when > 1), logs in files."""

  def __init__(self, name, workdir, data_dir, num_processes, devices, cache_dir, args=(),
               prelude=''):
    self.name, self.workdir, self.procs, self.logs = name, workdir, [], []
    port = free_port()
    cli = ['--config', CONFIG, '--workdir', workdir, f'--config.data.data_dir={data_dir}', *ARGS,
           *args]
    argv = [sys.executable, '-m', 'camkd_jax.main', *cli]
    if prelude:  # test code run first in every process, then the CLI as `-m` would run it
      argv = [sys.executable, '-c', '\n'.join([
          prelude, 'import sys', 'from absl import app', 'from camkd_jax import main',
          f"sys.argv = ['camkd_jax.main'] + {cli!r}", 'app.run(main.main)'])]
    for i in range(num_processes):
      extra = {}
      if num_processes > 1:
        extra = dict(CAMKD_COORDINATOR=f'localhost:{port}', CAMKD_PROCESS_ID=str(i),
                     CAMKD_NUM_PROCESSES=str(num_processes))
      log = open(f'{workdir}.{name}.p{i}.log', 'w')
      self.logs.append(log.name)
      # Own session: a kill also reaches any child the process started.
      self.procs.append(subprocess.Popen(
          argv, env=_env(devices, cache_dir, extra), cwd=REPO, stdout=log,
          stderr=subprocess.STDOUT, start_new_session=True))
      log.close()

  def codes(self):
    return [p.poll() for p in self.procs]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    for p in self.procs:
      p.wait()

  def crashed(self):
    return any('Traceback (most recent call last)' in self.log(i) for i in range(len(self.logs)))

  def log(self, i=0):
    with open(self.logs[i]) as f:
      return f.read()

  def tails(self, n=4000):
    """Each log from its first traceback (or its end): the Python error, not the crash dump."""
    out = []
    for i, name in enumerate(self.logs):
      text = self.log(i)
      at = text.find('Traceback (most recent call last)')
      out.append(f'--- {name}\n' + (text[at:at + n] if at >= 0 else text[-n:]))
    return '\n'.join(out)


def wait(launches, deadline_s=DEADLINE_S, until=None):
  """Until every process exited 0, or `until()` is true; kills everything on failure/timeout."""
  t_end = time.time() + deadline_s
  try:
    while True:
      codes = [c for l in launches for c in l.codes()]
      # A Python error in one process leaves it waiting in the distributed shutdown barrier
      # (minutes): fail on the traceback, not on the exit code.
      bad = [l for l in launches if any(c not in (None, 0) for c in l.codes()) or l.crashed()]
      if bad:
        raise AssertionError(f'{bad[0].name}: a process failed (exit codes {bad[0].codes()}):\n'
                             f'{bad[0].tails()}')
      if until is not None and until():
        return
      if all(c == 0 for c in codes):
        if until is not None:
          raise AssertionError('the run finished before the condition to stop it was met')
        return
      if time.time() > t_end:
        raise AssertionError(f'timed out after {deadline_s} s:\n' +
                             '\n'.join(l.tails() for l in launches))
      time.sleep(0.1)
  except BaseException:
    for l in launches:
      l.kill()
    raise


def wait_stopped(launch, deadline_s=DEADLINE_S):
  """Until every process of `launch` exited, whatever the code (a signalled run); a group still
  running at the deadline (one process waiting for another) is killed and fails the test."""
  t_end = time.time() + deadline_s
  while None in launch.codes() and time.time() < t_end:
    time.sleep(0.2)
  if None in launch.codes():
    launch.kill()
    raise AssertionError(f'{launch.name}: the group did not stop (a process waits for the other) '
                         f'within {deadline_s} s:\n{launch.tails()}')


# ----------------------------------------------------------------------------- reading results
def load_params(path):
  """Exported parameters (orbax, written by any number of processes) as numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = ocp.StandardCheckpointer()
  try:
    tree = ckpt.metadata(path).item_metadata.tree
    target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree)
    return ckpt.restore(path, target)
  finally:
    ckpt.close()


def read_json(path):
  with open(path) as f:
    return json.load(f)


def flatten(obj, prefix=''):
  """{'a.b.0.c': leaf} of nested dicts / lists."""
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
    items = enumerate(obj)
  else:
    return {prefix[:-1]: obj}
  out = {}
  for k, v in items:
    out.update(flatten(v, f'{prefix}{k}.'))
  return out


def comparable_metrics(path):
  """metrics.json without what legitimately differs between workdirs (paths, wall time)."""
  flat = flatten(read_json(path))
  return {k: v for k, v in flat.items() if not k.endswith(('wall_time_s', '.checkpoint'))}


def assert_trees_close(a, b, rtol, atol=0.0, what=''):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb), (what, sorted(set(fa) ^ set(fb)))
  for k in fa:
    if isinstance(fa[k], float) or isinstance(fb[k], float) or isinstance(fa[k], np.ndarray):
      np.testing.assert_allclose(fb[k], fa[k], rtol=rtol, atol=atol, err_msg=f'{what}{k}')
    else:
      assert fa[k] == fb[k], (f'{what}{k}', fa[k], fb[k])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  return {'root': str(root), 'cache': str(root / 'jax_cache'), 'data': str(root / 'tfds'),
          'data_1p': str(root / 'tfds_1p')}


@pytest.fixture(scope='module')
def uninterrupted(base):
  """(1-process 4-device run, 2-process 2x2-device run) of the smoke config, run side by side.

  The single process builds its own copy of the dataset; the two processes share one data_dir,
  which process 0 fills first (distributed.main_process_first)."""
  t0 = time.time()
  one = Launch('one', os.path.join(base['root'], 'one'), base['data_1p'], 1, 4, base['cache'],
                NO_FIGURES)
  two = Launch('two', os.path.join(base['root'], 'two'), base['data'], 2, 2, base['cache'],
               ['--config.distributed=True', '--config.num_figure_images=2'])
  wait([one, two])
  print(f'uninterrupted 1-process and 2-process runs: {time.time() - t0:.1f} s')
  return one, two


# ----------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(uninterrupted):
  one, two = uninterrupted
  m1 = read_json(os.path.join(one.workdir, 'metrics.json'))
  m2 = read_json(os.path.join(two.workdir, 'metrics.json'))
  # Every example of each split evaluated exactly once, whatever the padding.
  for m in (m1, m2):
    for model in ('teacher', 'student'):
      for split in ('val', 'test'):
        assert m[model][split]['num_examples'] == 32
        assert sum(map(sum, m[model][split]['confusion_matrix'])) == 32
  # Same losses (history), metrics and confusion matrices.
  assert_trees_close(comparable_metrics(os.path.join(one.workdir, 'metrics.json')),
                     comparable_metrics(os.path.join(two.workdir, 'metrics.json')),
                     rtol=FLOAT_RTOL, what='metrics.json ')
  assert m2['student']['step'] == 3 and len(m2['student']['history']) == 1
  # Same trained parameters (teacher trained here too, then the distilled student).
  for model in ('teacher', 'student'):
    p1 = load_params(os.path.join(one.workdir, model, 'params'))
    p2 = load_params(os.path.join(two.workdir, model, 'params'))
    assert_trees_close(p1, p2, rtol=FLOAT_RTOL, atol=1e-6, what=f'{model} params ')
  # Process 0 alone writes reports: one event stream per stage, the summary on its console only.
  for stage in ('teacher', 'student'):
    events = os.listdir(os.path.join(two.workdir, 'tensorboard', stage))
    assert len(events) == 1, events
  assert 'outputs in' in two.log(0) and 'outputs in' not in two.log(1)
  assert os.path.isfile(os.path.join(two.workdir, 'figures', 'gradcam.png'))


def trained_teacher(uninterrupted):
  """--config.teacher.checkpoint of the uninterrupted 2-process run's teacher: the kill and
  signal tests below stop the student stage, so they load that teacher instead of training
  their own."""
  return [f'--config.teacher.checkpoint={os.path.join(uninterrupted[1].workdir, "teacher")}']


@pytest.mark.slow
def test_killed_two_process_run_resumes_from_its_checkpoint(base, uninterrupted):
  """Both processes SIGKILLed once a student step is on disk, then rerun: the student resumes
  from that checkpoint and ends with exactly the numbers of the uninterrupted 2-process run (same
  process layout and programs). The teacher is that run's, loaded: only the student trains."""
  _, two = uninterrupted
  workdir = os.path.join(base['root'], 'killed')
  student_ckpts = os.path.join(workdir, 'checkpoints', 'student')

  def student_checkpointed():  # orbax renames a step directory to its number once complete
    return os.path.isdir(student_ckpts) and any(n.isdigit() for n in os.listdir(student_ckpts))

  t0 = time.time()
  # Checkpoints after every step; SIGKILL both processes once a student step is on disk.
  args = ['--config.checkpoint_every_steps=1'] + NO_FIGURES + trained_teacher(uninterrupted)
  killed = Launch('killed', workdir, base['data'], 2, 2, base['cache'], args)
  wait([killed], until=student_checkpointed)
  killed.kill()
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  assert not os.path.exists(os.path.join(workdir, 'student', 'metadata.json'))
  resumed = Launch('resumed', workdir, base['data'], 2, 2, base['cache'], args)
  wait([resumed])
  print(f'killed + resumed 2-process runs: {time.time() - t0:.1f} s')
  assert 'student: resumed from' in resumed.log(0), resumed.tails()
  assert 'teacher: loaded' in resumed.log(0), resumed.tails()
  ours = comparable_metrics(os.path.join(workdir, 'metrics.json'))
  theirs = comparable_metrics(os.path.join(two.workdir, 'metrics.json'))
  keys = [k for k in theirs if k.startswith(('student.', 'teacher.val.', 'teacher.test.'))]
  assert len(keys) > 20 and {k: ours.get(k) for k in keys} == {k: theirs[k] for k in keys}
  assert_trees_close(load_params(os.path.join(two.workdir, 'student', 'params')),
                     load_params(os.path.join(workdir, 'student', 'params')), rtol=0.0,
                     what='student params ')


# Process 1 alone receives SIGNAL while it fetches its `at`-th training batch (of every stage it
# trains).
SIGNAL_ONE_PROCESS = """
import os, signal, time
from camkd_jax import input_pipeline
_orig, _count = input_pipeline.Data.train_batches, [0]
def _train_batches(self, epoch, start_step=0):
  for batch in _orig(self, epoch, start_step):
    _count[0] += 1
    if os.environ.get('CAMKD_PROCESS_ID') == '1':
      if _count[0] == {at}:
        os.kill(os.getpid(), signal.{signal})
      elif _count[0] > {at}:
        time.sleep(0.5)  # slower steps from here: time for the notice to reach the group
    yield batch
input_pipeline.Data.train_batches = _train_batches
"""


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(base, uninterrupted):
  """A pre-emption notice (SIGTERM) that reaches one process of two: JAX's preemption service
  shares it, both processes stop at the same step with one collective checkpoint, exit 143 with
  the same message, and the rerun resumes from that step. (Before: the service swallowed the
  signal and the run went on; a process stopping alone would have left the other waiting.)"""
  workdir = os.path.join(base['root'], 'sigterm')
  t0 = time.time()
  # A loaded teacher, then a student of 8 steps (one epoch); signalled at its 2nd batch.
  args = NO_FIGURES + ['--config.max_steps=8'] + trained_teacher(uninterrupted)
  stopped = Launch('sigterm', workdir, base['data'], 2, 2, base['cache'], args,
                   prelude=SIGNAL_ONE_PROCESS.format(at=2, signal='SIGTERM'))
  wait_stopped(stopped)
  assert stopped.codes() == [143, 143], stopped.tails()
  last = [stopped.log(i).strip().splitlines()[-1] for i in (0, 1)]
  assert last[0] == last[1], last
  match = re.fullmatch(r'error: interrupted at step (\d+); rerun the same command to resume from '
                       r'step (\d+) \(student stage, SIGTERM, process group\)', last[0])
  assert match and match.group(1) == match.group(2), last
  step = int(match.group(1))
  assert 2 <= step <= 8, step  # signalled at the student's 2nd batch, stopped in the stage
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints', 'student'))
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  resumed = Launch('sigterm_resumed', workdir, base['data'], 2, 2, base['cache'], args)
  wait([resumed])
  print(f'SIGTERM to one process + resumed 2-process runs: {time.time() - t0:.1f} s')
  assert re.search(rf'student: resumed from \S+/{step}\n', resumed.log(0)), resumed.tails()
  assert 'teacher: loaded' in resumed.log(0), resumed.tails()
  assert read_json(os.path.join(workdir, 'metrics.json'))['student']['history'][-1]['step'] == 8


@pytest.mark.slow
def test_ctrl_c_in_one_process_stops_both_at_the_next_log_step(base, uninterrupted):
  """SIGINT (not taken by JAX's preemption service) in one process: both agree at the next log
  step (4 here) and stop there; the signalled process names SIGINT, the other the group."""
  workdir = os.path.join(base['root'], 'sigint')
  args = NO_FIGURES + ['--config.max_steps=8', '--config.log_every_steps=4'] + trained_teacher(
      uninterrupted)
  stopped = Launch('sigint', workdir, base['data'], 2, 2, base['cache'], args,
                   prelude=SIGNAL_ONE_PROCESS.format(at=2, signal='SIGINT'))
  wait_stopped(stopped)
  assert stopped.codes() == [130, 130], stopped.tails()
  message = 'error: interrupted at step 4; rerun the same command to resume from step 4 '
  assert stopped.log(1).strip().splitlines()[-1] == message + '(student stage, SIGINT)'
  assert stopped.log(0).strip().splitlines()[-1] == message + (
      '(student stage, SIGINT, process group)')
  assert '4' in os.listdir(os.path.join(workdir, 'checkpoints', 'student'))
