"""Tests of camkd_jax.benchmark: helpers against closed forms, FLOP counts against XLA's cost
analysis, and a tiny end-to-end run on the CPU (the CI smoke test)."""
import json

import jax
import jax.numpy as jnp
import pytest

from camkd_jax import benchmark

TINY = ['--image_size=32', '--width=0.0625', '--batch_size=4', '--steps=3', '--warmup=1']


def test_flops_from_cost_accepts_dict_list_and_none():
  assert benchmark.flops_from_cost({'flops': 12.0, 'bytes accessed': 3.0}) == 12.0
  assert benchmark.flops_from_cost([{'flops': 2.0}, {'flops': 5.0}]) == 7.0  # older JAX
  assert benchmark.flops_from_cost([{}]) is None
  assert benchmark.flops_from_cost(None) is None


@pytest.mark.parametrize('kind,dtype,precision,want', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', None, 989.0),
    ('NVIDIA H100 80GB HBM3', 'float32', None, 494.0),      # TF32 at JAX's default precision
    ('NVIDIA H100 80GB HBM3', 'float32', 'highest', 67.0),  # true float32
    ('NVIDIA H100 PCIe', 'bfloat16', None, 756.0),
    ('NVIDIA H200', 'bfloat16', None, 989.0),
    ('NVIDIA A100-SXM4-80GB', 'float32', 'float32', 19.5),
    ('TPU v5 lite', 'bfloat16', None, 197.0),
    ('TPU v5', 'bfloat16', None, 459.0),
    ('TPU v6 lite', 'bfloat16', None, 918.0),
])
def test_peak_table(kind, dtype, precision, want):
  assert benchmark.peak_tflops(kind, dtype, precision)[0] == want


def test_peak_unknown_chip_is_none_and_names_the_flag():
  peak, why = benchmark.peak_tflops('cpu', 'float32')
  assert peak is None and '--peak_tflops' in why


@pytest.mark.parametrize('n', [2, 5, 32])
def test_exact_padding_conv_count_matches_xla(n):
  """A 3x3 'same' conv over n pixels has (3n - 2)^2 valid taps; XLA counts exactly those."""
  f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  lowered = f.lower(jax.ShapeDtypeStruct((1, n, n, 3), jnp.float32),
                    jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32))
  # One conv of 3 -> 5 channels: the first conv of a VGG with a single 5-channel layer.
  fwd, first = benchmark.vgg_conv_flops(n, 1.0, channels=((5,),), num_classes=0)
  assert fwd == first == benchmark.flops_from_cost(lowered.cost_analysis())
  assert fwd == 2 * (3 * n - 2) ** 2 * 3 * 5


def test_full_size_vgg16_step_is_about_20_tflop():
  """The issue's 20.5 TFLOP/step is the naive count; XLA's padding-exact count is ~1.5 % less."""
  naive = benchmark.analytic_flops('distill', ('ce', 'fm', 'at'), 'vgg16', 512, 1.0, 32,
                                   exact_padding=False)
  exact = benchmark.analytic_flops('distill', ('ce', 'fm', 'at'), 'vgg16', 512, 1.0, 32)
  # VGG16 features at 224 px are 15.35 GMAC (the published 15.5 G includes the FC layers).
  fwd224, _ = benchmark.vgg_conv_flops(224, 1.0, exact_padding=False)
  assert fwd224 == pytest.approx(2 * 15.35e9, rel=2e-3)
  assert naive == pytest.approx(20.5e12, rel=2e-3)
  assert exact == pytest.approx(20.2e12, rel=2e-3)
  teacher = benchmark.analytic_flops('teacher', ('ce',), 'vgg16', 512, 1.0, 32)
  evals = benchmark.analytic_flops('eval', (), 'vgg16', 512, 1.0, 32)
  assert exact - teacher == pytest.approx(evals)  # distillation = teacher step + one forward


def test_lowered_program_flops_match_conv_count():
  """XLA's count of the real (unoptimised) programs = the conv count + a few % of elementwise
  work (Adam, ReLU, pooling) at this tiny size; a missing or duplicated backward would be off
  by >= 30 %."""
  out = benchmark.main(['--lower_only', '--image_size=32', '--width=0.25', '--batch_size=4',
                        '--dtypes=float32', '--programs=teacher,eval', '--no_augment'])
  for row in out['rows']:
    ratio = row['flops'] / row['analytic_flops']
    assert 1.0 <= ratio < 1.08, (row['name'], ratio)


@pytest.mark.parametrize('argv,match', [
    (['--programs=distill,train'], 'programs'),
    (['--terms=ce,xx'], 'terms'),
    (['--dtypes=float64'], 'dtypes'),
    (['--image_size=30', '--factor=4'], 'divisible'),
    (['--steps=0'], 'steps'),
])
def test_bad_flags_fail_naming_the_flag(argv, match, capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(argv)
  assert match in capsys.readouterr().err


def test_cases_cover_every_program_dtype_and_term_set():
  args = benchmark.parse_args(['--terms=ce,fm,at', '--terms=ce,fm'])
  names = [(c.name, c.dtype) for c in benchmark.cases_from_args(args)]
  assert names == [(n, d) for d in ('float32', 'bfloat16')
                   for n in ('distill[ce+fm+at]', 'distill[ce+fm]', 'teacher', 'eval')]


def test_gpu_suite_puts_the_targets_first_and_covers_every_program():
  args = benchmark.parse_args(['--suite=gpu'])
  cases = benchmark.cases_from_args(args)
  assert [(c.name, c.dtype) for c in cases[:2]] == [('distill[ce+fm+at]', 'bfloat16'),
                                                    ('distill[ce+fm+at]', 'float32')]
  for dtype in ('float32', 'bfloat16'):
    names = {c.name for c in cases if c.dtype == dtype}
    assert {'distill[ce+fm+at]', 'distill[ce+fm]', 'teacher', 'eval'} <= names


def test_time_budget_skips_and_lists_configurations(tmp_path):
  path = tmp_path / 'b.json'
  out = benchmark.main(['--lower_only', '--time_budget_s=1e-9', '--programs=eval',
                        f'--json_out={path}'])
  assert out['rows'] == [] and out['skipped'] == ['eval float32', 'eval bfloat16']
  assert json.loads(path.read_text())['skipped'] == out['skipped']


@pytest.mark.slow
def test_tiny_run_reports_sensible_numbers(tmp_path, capsys):
  path = tmp_path / 'bench.json'
  out = benchmark.main(TINY + ['--programs=distill,eval', '--dtypes=float32',
                               f'--json_out={path}'])
  assert json.loads(path.read_text())['rows'] == json.loads(json.dumps(out['rows']))
  assert out['jax_version'] == jax.__version__ and out['device_kind']
  table = capsys.readouterr().out
  assert '| distill[ce+fm+at] | float32 | 4 | 32 | 4 |' in table
  assert '| eval | float32 | 4 | 32 | 4 |' in table
  distill_row, eval_row = out['rows']
  for row in out['rows']:
    assert row['finite']
    assert row['compile_s'] > 0 and row['steps'] == 3
    assert 0 < row['step_ms_min'] <= row['step_ms_median']
    assert row['host_cpu_ms_median'] > 0
    assert row['images_per_s'] == pytest.approx(4 / (row['step_ms_median'] / 1e3))
    assert row['flops'] > 0 and row['flops_source'] == 'compiled'
    assert row['achieved_tflops'] == pytest.approx(
        row['flops'] / (row['step_ms_median'] / 1e3) / 1e12)
    assert row['peak_fraction'] is None  # a CPU is not in the peak table
  # A distillation step does a teacher forward, a student forward and a backward (~4 forwards).
  assert 3.0 < distill_row['flops'] / eval_row['flops'] < 5.0
  assert distill_row['augment'] and not eval_row['augment']
