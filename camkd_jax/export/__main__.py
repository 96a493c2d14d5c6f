"""`python -m camkd_jax.export`: see camkd_jax/export/__init__.py and `--help`."""
from absl import app
from absl import flags

import camkd_jax.export
from camkd_jax.export import cli

# What --help prints: the package's description, without its list of modules.
__doc__ = camkd_jax.export.__doc__.split('\nModules, by job:')[0]  # pylint: disable=redefined-builtin

if __name__ == '__main__':
  cli.define_flags()
  flags.adopt_module_key_flags(cli)  # --help lists them as this command's flags
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(cli.main)
