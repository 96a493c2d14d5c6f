"""The command line's faults: each ends in one `error: ...` line (no traceback) and exit code 2.

Each case is a fresh `python -m camkd_jax.main` process (absl parses the flags once per process);
all of them fail before any data is read or anything compiled, in seconds.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = 'configs/attn_kd.py:smoke=1'


def run_main(args, prelude=''):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  code = '\n'.join(['import sys', textwrap.dedent(prelude), 'from absl import app',
                    'from camkd_jax import main', f"sys.argv = ['camkd_jax.main'] + {args!r}",
                    'app.run(main.main, flags_parser=main.parse_flags)'])
  return subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300)


MAGNIFICATION = ('is not a magnification: use a positive objective power such as 10, 5, 2.5, '
                 '1.25 or 0.625 (base_magnification / a power of two)')
KNOWN_ARGS = str(sorted(base.ARG_TYPES))


@pytest.mark.parametrize('args, message', [
    (['--config', SMOKE, '--config.num_epoch=3'],
     "unknown config key 'num_epoch' in --config.num_epoch=3 (did you mean 'num_epochs'?); the "
     'keys are defined in configs/base.py'),
    (['--config', SMOKE, '--config.model.widht=0.5'],
     "unknown config key 'model.widht' in --config.model.widht=0.5 (did you mean "
     "'model.width'?); the keys are defined in configs/base.py"),
    (['--config', 'configs/attn_kd.py:smoke=1,magnificaton=2'],
     "unknown config argument 'magnificaton' (did you mean 'magnification'?) in "
     f"'smoke=1,magnificaton=2'; known: {KNOWN_ARGS}"),
    (['--config', SMOKE, '--config.num_epochs=ten'],
     "flag --config.num_epochs=ten: invalid literal for int() with base 10: 'ten'"),
    (['--config', 'configs/attn_kd.py:smoke=1,magnification=0'],
     f'config.magnification=0 {MAGNIFICATION}'),
    (['--config', SMOKE, '--config.magnification=-2.5'],
     f'config.magnification=-2.5 {MAGNIFICATION}'),
    (['--config', SMOKE, '--config.teacher.checkpoint=/nowhere/teacher'],
     '/nowhere/teacher is not a usable camkd_jax model export: the directory does not exist '
     '(metadata.json not found). An export is a directory with params/ and metadata.json, as a '
     'teacher run writes to <workdir>/teacher; copy it again from its run, or retrain it (leave '
     'config.teacher.checkpoint empty).'),
])
def test_fault_is_one_line(tmp_path, args, message):
  proc = run_main(args + ['--workdir', str(tmp_path / 'run')])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == f'error: {message}'
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_read_only_workdir_is_one_line(tmp_path):
  """A disk error (EROFS) while the workdir is created: the path and the remedy, exit code 2."""
  prelude = """
  import errno
  from camkd_jax import workdir
  def _makedirs(path, exist_ok=False):
    raise OSError(errno.EROFS, 'Read-only file system', path)
  workdir.os.makedirs = _makedirs
  """
  run = str(tmp_path / 'run')
  proc = run_main(['--config', SMOKE, '--workdir', run], prelude=prelude)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: cannot write the run directory to {run}: the file system is read-only (Read-only '
      'file system). Make it writable or choose another --workdir, then rerun the same command. '
      'Nothing written before was lost.')


def test_flag_error_message_of_an_unknown_nested_key():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from camkd_jax import main  # pylint: disable=g-import-not-at-top
  argv = ['x', '--config', SMOKE, '--config.attention.nrom=l2']
  err = flags.UnrecognizedFlagError('config.attention.nrom')
  assert main.flag_error_message(err, argv) == (
      "unknown config key 'attention.nrom' in --config.attention.nrom=l2 (did you mean "
      "'attention.norm'?); the keys are defined in configs/base.py")
