"""Prints the markdown tables of BENCHMARKS.md "Native students: measured cost" from the JSON
of experiments/results/ (native_flops_512*.json, native_cpu.json).

  python experiments/native_tables.py
"""
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def _rows(name):
  path = os.path.join(HERE, name)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = json.load(f)['rows']
  return {(r['name'], r['view'], r['factor']): r for r in rows}


def flops_table():
  rows = {**_rows('native_flops_512.json'), **_rows('native_flops_512_student_step.json')}
  print('| program (batch 32, 512 px, f32) | f | upsampled TFLOP | native TFLOP | ratio | '
        'f^2 | conv-count ratio | source |')
  print('|---|---|---|---|---|---|---|---|')
  for name in ('distill[ce+fm+at]', 'distill[ce]', 'eval'):
    for f in (2, 4, 8):
      up, nat = rows.get((name, 'upsampled', f)), rows.get((name, 'native', f))
      if not up or not nat:
        continue
      print(f'| {name} | {f} | {up["flops"] / 1e12:.4f} | {nat["flops"] / 1e12:.4f} | '
            f'{up["flops"] / nat["flops"]:.2f} | {f * f} | '
            f'{up["analytic_flops"] / nat["analytic_flops"]:.2f} | {nat["flops_source"]} |')
  teacher = rows.get(('teacher', None, 1))
  if teacher:
    print(f'\nteacher step (CE, f = 1, view-independent): {teacher["flops"] / 1e12:.4f} TFLOP '
          f'({teacher["flops_source"]})')


def cpu_table():
  rows = _rows('native_cpu.json')
  if not rows:
    return
  print('| program | f | upsampled images/s | native images/s | speed-up | FLOP ratio | '
        'upsampled host CPU ms | native host CPU ms | CPU-time ratio |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name in sorted({k[0] for k in rows}):
    for f in (2, 4, 8):
      up, nat = rows.get((name, 'upsampled', f)), rows.get((name, 'native', f))
      if not up or not nat or 'images_per_s' not in up:
        continue
      print(f'| {name} | {f} | {up["images_per_s"]:.1f} | {nat["images_per_s"]:.1f} | '
            f'{nat["images_per_s"] / up["images_per_s"]:.2f} | '
            f'{up["flops"] / nat["flops"]:.2f} | {up["host_cpu_ms_median"]:.0f} | '
            f'{nat["host_cpu_ms_median"]:.0f} | '
            f'{up["host_cpu_ms_median"] / nat["host_cpu_ms_median"]:.2f} |')


if __name__ == '__main__':
  flops_table()
  print()
  cpu_table()
