"""System faults that end in one sentence: a full or read-only disk (nothing written before is
lost), a broken teacher export, magnification <= 0, and the Ctrl-C / SIGTERM handler."""
import errno
import json
import os
import signal
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from configs import attn_kd
from camkd_jax import checkpoints
from camkd_jax import config_checks
from camkd_jax import errors
from camkd_jax import interrupts
from camkd_jax import runs
from camkd_jax import workdir as workdir_lib


class _Data:
  image_size, class_names, num_classes = 32, ['a', 'b'], 2


# metadata.json as the trainer writes it
META = runs.model_metadata(attn_kd.get_config('smoke=1'), _Data, None)


# ----------------------------------------------------------------------------- disk
def test_full_disk_keeps_the_previous_json(tmp_path, monkeypatch):
  path = str(tmp_path / 'metrics.json')
  checkpoints.write_json(path, {'kappa': 0.5})

  def dump(obj, f, **kw):
    f.write('{"kappa": 0.')  # half written, then the disk is full
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(runs.json, 'dump', dump)
  with pytest.raises(errors.OutputError) as info:
    checkpoints.write_json(path, {'kappa': 0.75})
  assert str(info.value) == (
      f'cannot write metrics.json to {path}: the disk is full (No space left on device). Free '
      'space on it or choose another --workdir, then rerun the same command. Nothing written '
      'before was lost.')
  assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
  with open(path) as f:
    assert json.load(f) == {'kappa': 0.5}
  assert os.listdir(tmp_path) == ['metrics.json'], 'no temporary file left behind'


def test_read_only_workdir_names_the_path(tmp_path, monkeypatch):
  def makedirs(path, exist_ok=False):
    raise OSError(errno.EROFS, 'Read-only file system', path)
  monkeypatch.setattr(workdir_lib.os, 'makedirs', makedirs)
  run = str(tmp_path / 'run')
  with pytest.raises(errors.OutputError) as info:
    workdir_lib.prepare_workdir(attn_kd.get_config('smoke=1'), run)
  assert str(info.value).startswith(f'cannot write the run directory to {run}: the file system '
                                    'is read-only (Read-only file system). Make it writable or '
                                    'choose another --workdir')


def test_checkpoint_write_error_names_the_resume_step(tmp_path):
  """orbax wraps the OSError: the disk error is found in the exception chain."""
  ckpt = checkpoints.StageCheckpoints(str(tmp_path / 'ckpt'))
  state = {'w': jnp.ones(3)}
  ckpt.save(3, state, state, {'history': []})

  def save(*args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'ckpt' / '6'))
    except OSError as e:
      raise RuntimeError('orbax: save failed') from e
  ckpt.manager.save = save
  with pytest.raises(errors.OutputError, match=r'cannot write the checkpoint of step 6 to .*ckpt/6:'
                     r' the disk is full .* rerun the same command \(it resumes from step 3\)'):
    ckpt.save(6, state, state, {'history': []})
  assert ckpt.latest_step() == 3
  ckpt.close()


def test_other_errors_pass_through():
  with pytest.raises(RuntimeError, match='boom'):
    with errors.disk_writes('/x', 'y'):
      raise RuntimeError('boom')
  with pytest.raises(FileNotFoundError):  # not a disk fault: the original error
    with errors.disk_writes('/x', 'y'):
      raise FileNotFoundError(errno.ENOENT, 'No such file', '/x')


def test_closest_key():
  keys = ['num_epochs', 'model.width', 'teacher.num_epochs', 'magnification']
  assert errors.closest('num_epoch', keys) == " (did you mean 'num_epochs'?)"
  assert errors.closest('model.widht', keys) == " (did you mean 'model.width'?)"
  assert errors.closest('widht', keys) == " (did you mean 'model.width'?)"
  assert errors.closest('zzz', keys) == ''


# ----------------------------------------------------------------------------- teacher exports
@pytest.fixture
def export(tmp_path):
  path = tmp_path / 'teacher'
  checkpoints.save_model(str(path), {'w': jnp.arange(600.0)}, META)
  return path


def _corrupt(path, case):
  if case == 'no metadata':
    os.remove(path / 'metadata.json')
  elif case == 'truncated metadata':
    (path / 'metadata.json').write_text('{"model": {"na')
  elif case == 'metadata lacks keys':
    (path / 'metadata.json').write_text('{"model": {}}')
  elif case == 'no params':
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path / 'params')
  elif case == 'params incomplete':
    os.remove(path / 'params' / '_METADATA')
  elif case == 'no directory':
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path)


@pytest.mark.parametrize('case, message', [
    ('no directory', 'the directory does not exist (metadata.json not found)'),
    ('no metadata', 'metadata.json not found (the export never finished, or the file was not '
                    'copied)'),
    ('truncated metadata', 'metadata.json is truncated or not JSON (Unterminated string'),
    ('metadata lacks keys', "metadata.json lacks the key(s) ['image_size', 'class_names', "
                            "'num_classes']"),
    ('no params', 'params/ not found'),
    ('params incomplete', 'params/ is incomplete (no _METADATA)'),
])
def test_broken_teacher_export_names_what_is_missing(export, case, message):
  _corrupt(export, case)
  config = attn_kd.get_config('smoke=1')
  config.teacher.checkpoint = str(export)
  with pytest.raises(errors.ModelExportError) as info:
    config_checks.validate_config(config, 1)
  assert str(info.value).startswith(f'{export} is not a usable camkd_jax model export: {message}')
  assert 'leave config.teacher.checkpoint empty' in str(info.value)


def test_truncated_params_file_is_named(export):
  params, _ = checkpoints.load_model(str(export), {'w': jnp.zeros(600)})
  np.testing.assert_array_equal(np.asarray(params['w']), np.arange(600.0))  # intact: loads
  data = [os.path.join(d, f) for d, _, fs in os.walk(export / 'params') for f in fs
          if os.sep + 'd' + os.sep in os.path.join(d, f)]
  big = max(data, key=os.path.getsize)
  with open(big, 'r+b') as f:
    f.truncate(os.path.getsize(big) // 2)
  with pytest.raises(errors.ModelExportError, match=r'params/ cannot be read, it is truncated or '
                                                    r'damaged'):
    checkpoints.load_model(str(export), {'w': jnp.zeros(600)})


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize('key, value', [('magnification', 0.0), ('magnification', -2.5),
                                        ('base_magnification', 0.0),
                                        ('magnification', float('nan'))])
def test_magnification_must_be_positive(key, value):
  config = attn_kd.get_config('smoke=1')
  config[key] = value
  with pytest.raises(errors.ConfigError) as info:
    config_checks.validate_config(config, 1)
  assert str(info.value) == (f'config.{key}={value:g} is not a magnification: use a positive '
                             'objective power such as 10, 5, 2.5, 1.25 or 0.625 '
                             '(base_magnification / a power of two)')


def test_config_errors_are_user_errors_and_value_errors():
  config = attn_kd.get_config('smoke=1')
  config.method = 'distil'
  with pytest.raises(errors.ConfigError) as info:
    config_checks.validate_config(config, 1)
  assert isinstance(info.value, ValueError) and isinstance(info.value, errors.UserError)


# ----------------------------------------------------------------------------- interrupts
@pytest.fixture
def installed_interrupts():
  """interrupts.install() for one test; the previous handlers come back afterwards."""
  old = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
  interrupts.install()
  yield
  for s, h in old.items():
    signal.signal(s, h)
  interrupts.reset()


def test_signal_outside_a_loop_raises_at_once(installed_interrupts):
  with pytest.raises(errors.Interrupted) as info:
    os.kill(os.getpid(), signal.SIGTERM)
  assert info.value.exit_code == 143
  assert str(info.value) == ('interrupted before the first training step (SIGTERM); rerun the '
                             'same command to start again')


def test_signal_inside_a_loop_is_deferred_then_a_second_one_raises(installed_interrupts):
  interrupts.progress('student', 7, 6)
  with interrupts.deferred():
    os.kill(os.getpid(), signal.SIGINT)  # recorded only
    assert interrupts.pending() == signal.SIGINT
    interrupts.progress('student', 8, 8)
    with pytest.raises(errors.Interrupted) as info:
      os.kill(os.getpid(), signal.SIGINT)  # the user insists
  assert info.value.exit_code == 130
  assert str(info.value) == ('interrupted at step 8; rerun the same command to resume from '
                             'step 8 (student stage, SIGINT)')


def assert_sigterm_in_del_is_raised_again(capfd):
  """SIGTERM sent inside a __del__ surfaces as Interrupted in the code after it, printing
  nothing (sys.unraisablehook is restored afterwards)."""
  hook = sys.unraisablehook

  class SignalInDel:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(100):  # the handler runs here, inside __del__
        pass
  try:
    with pytest.raises(errors.Interrupted, match=r'\(SIGTERM\)'):
      obj = SignalInDel()
      del obj
      for _ in range(100):
        time.sleep(0.001)
    assert 'Traceback' not in capfd.readouterr().err
  finally:
    sys.unraisablehook = hook


def test_signal_swallowed_by_a_callback_is_raised_again(capfd, installed_interrupts):
  """A signal that lands in a __del__ (or JAX's GC callback): Python would print the exception
  and go on; it is raised again in the main code instead, and nothing is printed."""
  assert_sigterm_in_del_is_raised_again(capfd)


def test_user_errors_include_data_errors():
  from camkd_jax.datasets import base  # pylint: disable=g-import-not-at-top
  assert errors.is_user_error(errors.ConfigError('x'))
  assert errors.is_user_error(base.DataError('x')) and errors.is_user_error(
      base.DataNotFoundError('x'))
  assert isinstance(base.DataError('x'), ValueError)
  assert not errors.is_user_error(ValueError('x')) and not errors.is_user_error(KeyError('x'))


def test_tensorboard_disk_error_is_named(tmp_path):
  """TensorFlow's errors have no errno: the system's text identifies the disk fault."""
  from camkd_jax import reporting  # pylint: disable=g-import-not-at-top

  class Full:
    def write_scalars(self, step, scalars):
      raise RuntimeError('tensorflow: /x/events.out: No space left on device')
  w = reporting.SkipWrittenSteps(Full(), -1, str(tmp_path / 'tb'))
  with pytest.raises(errors.OutputError, match=r'cannot write TensorBoard events to .*tb: the disk '
                                               r'is full'):
    w.write_scalars(1, {'a': 1.0})


def test_signal_resent_while_the_hook_still_runs_is_not_lost(capfd, installed_interrupts,
                                                             monkeypatch):
  """The race seen on a loaded CI machine: the resent signal lands while the unraisable hook is
  still starting its helper thread. It must be re-armed, not raised inside the hook (where Python
  would print it and lose it)."""
  real, calls = interrupts._resend, []

  def resend(signum):
    calls.append(signum)
    if len(calls) == 1:
      signal.raise_signal(signum)  # delivered at once, inside the hook
    else:
      real(signum)
  monkeypatch.setattr(interrupts, '_resend', resend)
  assert_sigterm_in_del_is_raised_again(capfd)
  assert calls == [signal.SIGTERM, signal.SIGTERM]  # the hook's resend, then the re-armed one
