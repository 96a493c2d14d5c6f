r"""The benchmark behind experiments/BENCHMARKS.md; same entry as `python -m camkd_jax.benchmark`.

  python experiments/benchmark.py --suite=gpu --time_budget_s=420 \
      --json_out=experiments/results/benchmark_gpu.json

Every flag is documented in camkd_jax/benchmark/cli.py (`--help`).
"""
import os
import sys

# Runnable from anywhere without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from camkd_jax import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  benchmark.main()
