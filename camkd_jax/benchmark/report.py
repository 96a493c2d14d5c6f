"""The report: the markdown table, the one-line summary of a row, the environment record and the
JSON file (written atomically, so a reader never sees half of it)."""
import json
import os
import sys
from typing import Dict, Sequence

import jax

from camkd_jax import runs


COLUMNS = (
    ('program', 'name', '{}'), ('dtype', 'dtype', '{}'), ('batch', 'batch_size', '{}'),
    ('image', 'image_size', '{}'), ('f', 'factor', '{}'), ('view', 'view', '{}'),
    ('width', 'width', '{:g}'),
    ('compile s', 'compile_s', '{:.1f}'), ('median ms', 'step_ms_median', '{:.2f}'),
    ('min ms', 'step_ms_min', '{:.2f}'), ('host CPU ms', 'host_cpu_ms_median', '{:.1f}'),
    ('images/s', 'images_per_s', '{:.1f}'),
    ('pipelined images/s', 'pipelined_images_per_s', '{:.1f}'),
    ('TFLOP/step (XLA)', 'flops', '{:.4g}'), ('TFLOP/step (conv count)', 'analytic_flops',
                                              '{:.4g}'),
    ('TFLOP/s', 'achieved_tflops', '{:.3g}'), ('% of peak', 'peak_fraction', '{:.1%}'),
)
_TERA = ('flops', 'analytic_flops')


def _cell(row, key, fmt):
  v = row.get(key)
  if v is None:
    return '-'
  if key in _TERA:
    v = v / 1e12
  return fmt.format(v)


def markdown_table(rows: Sequence[Dict]) -> str:
  head = '| ' + ' | '.join(c[0] for c in COLUMNS) + ' |'
  rule = '|' + '|'.join('---' for _ in COLUMNS) + '|'
  body = ['| ' + ' | '.join(_cell(r, k, f) for _, k, f in COLUMNS) + ' |' for r in rows]
  return '\n'.join([head, rule] + body)


def environment() -> Dict:
  """The device, the JAX / Flax / Python versions and XLA_FLAGS of this process."""
  dev = jax.devices()[0]
  import flax  # pylint: disable=g-import-not-at-top
  return dict(device_kind=dev.device_kind, platform=dev.platform,
              num_devices=jax.device_count(), jax_version=jax.__version__,
              flax_version=flax.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''), python=sys.version.split()[0])


def write_json(result, path):
  """The result as JSON at `path` (nothing for an empty path), replacing the file atomically:
  written after every configuration, so a crash later in the run loses nothing already timed."""
  if path:
    runs.atomic_write(path, lambda f: json.dump(result, f, indent=1))


def summary(row) -> str:
  """One line: compile time, median step and images/s, FLOPs per step (what the row has)."""
  parts = []
  if row.get('compile_s') is not None:
    parts.append(f'compile {row["compile_s"]:.1f}s')
  if row.get('step_ms_median') is not None:
    parts.append(f'median {row["step_ms_median"]:.2f} ms, {row["images_per_s"]:.1f} images/s')
  if row.get('flops'):
    parts.append(f'{row["flops"] / 1e12:.4g} TFLOP/step ({row["flops_source"]})')
  return ', '.join(parts)

