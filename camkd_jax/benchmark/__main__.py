"""`python -m camkd_jax.benchmark`: see camkd_jax/benchmark/__init__.py and `--help`."""
from camkd_jax.benchmark import cli

if __name__ == '__main__':
  cli.main()
