"""The command `python -m camkd_jax.export`: its flags, `main` (one line printed; a user error
ends in one `error:` line, exit 2, through camkd_jax.cli); __main__.py runs them."""
from camkd_jax import cli as command_line
from camkd_jax.export.model import FORMATS, model_mpp
from camkd_jax.export.writer import export


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A finished run (for a multi-seed run: RUN/seed_<n>).')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which model of the run.')
  flags.DEFINE_string('format', 'all', f'One of {list(FORMATS)}.')
  flags.DEFINE_string('out', None, 'Folder to write (must not exist unless --overwrite).')
  flags.DEFINE_string('onnx_input', 'uint8', 'Element type of the ONNX input: uint8, or float32 '
                      '(values 0..255).')
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier export in --out.')


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  fl = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's restore lines are not news here
  with command_line.user_errors():
    result = export(fl.workdir, fl.out, fl.model, fl.format, fl.overwrite, fl.onnx_input)
  rm = result['model']
  worst = max(result['parity'].values())
  print(f'wrote {", ".join(result["files"])} to {result["out"]}: {fl.model} at '
        f'{rm.magnification:g}x ({model_mpp(rm):g} um/px), {rm.tile_size} px tiles'
        + (f', view {rm.view}' if fl.model == 'student' else '') +
        f'; largest probability difference from JAX {worst:.1e}')
