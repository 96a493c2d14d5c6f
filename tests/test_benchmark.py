"""Tests of camkd_jax.benchmark: helpers against closed forms, FLOP counts against XLA's cost
analysis, and a tiny end-to-end run on the CPU (the CI smoke test)."""
import json

import jax
import jax.numpy as jnp
import pytest

from camkd_jax import benchmark
from camkd_jax.models import vgg
import conftest  # pylint: disable=g-import-not-at-top

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
    (['--views=native,tiny'], 'views'),
    (['--image_size=32', '--factors=4', '--views=native'], 'under 16 px'),
    (['--factors=2,x'], 'factors'),
    (['--image_size=512', '--factors=2,3'], 'divisible'),
    (['--rounds=0'], 'rounds'),
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
  # bf16 at f = 4: the upsampled target, then its native counterpart, for distill and eval.
  assert [c.label for c in cases[:6]] == [
      'distill[ce+fm+at] bfloat16', 'distill[ce+fm+at] bfloat16 native',
      'eval bfloat16', 'eval bfloat16 native',
      'distill[ce+fm+at] float32', 'eval float32']
  for dtype in ('float32', 'bfloat16'):
    names = {c.name for c in cases if c.dtype == dtype}
    assert {'distill[ce+fm+at]', 'distill[ce+fm]', 'teacher', 'eval'} <= names


def test_gpu_suite_lists_the_native_rows_at_every_factor():
  cases = benchmark.cases_from_args(benchmark.parse_args(['--suite=gpu']))
  native = [(c.program, c.dtype, c.student_factor(benchmark.parse_args([]))) for c in cases
            if c.view == 'native']
  assert sorted(native) == [('distill', 'bfloat16', 2), ('distill', 'bfloat16', 4),
                            ('distill', 'bfloat16', 8), ('eval', 'bfloat16', 4)]
  for case in cases:  # every factor divides the paper's 512 px and leaves >= 16 px
    f = case.student_factor(benchmark.parse_args([]))
    assert 512 % f == 0 and 512 // f >= vgg.MIN_INPUT_SIZE


def test_views_and_factors_make_one_case_per_combination_teacher_once():
  args = benchmark.parse_args(['--programs=distill,teacher,eval', '--dtypes=float32',
                               '--views=upsampled,native', '--factors=2,4'])
  labels = [c.label for c in benchmark.cases_from_args(args)]
  assert labels == ['distill[ce+fm+at] float32 f=2', 'distill[ce+fm+at] float32 native f=2',
                    'distill[ce+fm+at] float32 f=4', 'distill[ce+fm+at] float32 native f=4',
                    'teacher float32',
                    'eval float32 f=2', 'eval float32 native f=2', 'eval float32 f=4',
                    'eval float32 native f=4']


def test_views_option_builds_both_programs_on_a_tiny_model():
  """Both views of distill and eval lower at width 0.0625, 32 px; the native student sees
  32 / 2 = 16 px and costs less, the teacher forward of the distill step being the same."""
  out = benchmark.main(['--lower_only', '--image_size=32', '--width=0.0625', '--batch_size=4',
                        '--dtypes=float32', '--programs=distill,eval', '--factors=2',
                        '--views=upsampled,native', '--no_augment'])
  rows = {(r['program'], r['view']): r for r in out['rows']}
  assert sorted(rows) == [('distill', 'native'), ('distill', 'upsampled'),
                          ('eval', 'native'), ('eval', 'upsampled')]
  for program in ('distill', 'eval'):
    up, nat = rows[program, 'upsampled'], rows[program, 'native']
    assert (up['student_size'], nat['student_size']) == (32, 16)
    assert up['factor'] == nat['factor'] == 2
    assert 0 < nat['flops'] < up['flops']
    assert nat['analytic_flops'] < up['analytic_flops']


def test_analytic_native_distill_is_teacher_forward_plus_a_small_student_step():
  s, f, w, b = 512, 4, 1.0, 32
  fwd_t, _ = benchmark.vgg_conv_flops(s, w)
  fwd_s, dgrad_s = benchmark.vgg_conv_flops(s // f, w)
  got = benchmark.analytic_flops('distill', ('ce', 'fm', 'at'), 'vgg16', s, w, b,
                                 student_size=s // f)
  assert got == b * (fwd_t + 3 * fwd_s - dgrad_s)
  assert benchmark.analytic_flops('eval', (), 'vgg16', s, w, b, student_size=s // f) == (
      b * fwd_s)
  # The teacher program ignores the student size.
  assert benchmark.analytic_flops('teacher', ('ce',), 'vgg16', s, w, b, student_size=8) == (
      benchmark.analytic_flops('teacher', ('ce',), 'vgg16', s, w, b))


@pytest.mark.parametrize('factor', [2, 4])
def test_native_eval_program_costs_under_upsampled_over_f_squared(factor):
  """XLA's count of the compiled eval programs: the native student's convolutions see 1 / f^2
  of the pixels (and fewer padding taps), so its FLOPs are < upsampled / (0.9 f^2)."""
  out = benchmark.main(['--compile_only', '--image_size=64', '--width=0.25', '--batch_size=2',
                        '--dtypes=float32', '--programs=eval', f'--factors={factor}',
                        '--views=upsampled,native'])
  up, nat = out['rows']
  assert (up['view'], nat['view'], up['flops_source']) == ('upsampled', 'native', 'compiled')
  assert nat['flops'] < up['flops'] / (0.9 * factor ** 2)
  assert nat['flops'] > up['flops'] / (2 * factor ** 2)  # and not absurdly small


def test_rounds_interleave_and_pool_every_step(tmp_path):
  """--rounds=2 times each compiled case twice (--steps per round); medians over all steps."""
  out = benchmark.main(TINY + ['--programs=eval', '--dtypes=float32', '--factors=2',
                               '--views=upsampled,native', '--rounds=2', '--steps=2',
                               '--no_pipelined', f'--json_out={tmp_path / "r.json"}'])
  assert [r['label'] for r in out['rows']] == ['eval float32 f=2', 'eval float32 native f=2']
  for row in out['rows']:
    assert row['rounds'] == 2 and row['steps'] == 4 and row['finite']
    assert 0 < row['step_ms_min'] <= row['step_ms_median']
  assert json.loads((tmp_path / 'r.json').read_text())['rows'][1]['view'] == 'native'


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


def _lowered_text(jitted, abstract_args):
  return jitted.lower(*abstract_args).as_text()


@pytest.mark.parametrize('program', ['distill', 'teacher'])
def test_benchmark_times_the_training_program(program):
  """The benchmark's program, given the flags of a run config, lowers to the same HLO as the
  program the trainer builds for that config (models.from_config, config_checks.step_configs,
  distill.make_optimizer -> distill.make_train_step, as in stage.StageRunner); another loss
  weight gives another program."""
  # pylint: disable-next=g-import-not-at-top
  from camkd_jax import config_checks, distill, models, sharding
  from configs import attn_kd  # pylint: disable=g-import-not-at-top
  config = attn_kd.get_config('smoke=1')
  mesh = sharding.make_mesh()
  flags = ['--config_arg=smoke=1', f'--programs={program}', '--dtypes=float32',
           f'--width={config.model.width}', f'--image_size={config.image_size}',
           f'--batch_size={config.batch_size}', '--factor=4', '--terms=ce,fm,at',
           f'--learning_rate={config.optimizer.learning_rate}']
  loss = [f'--a_fm={config.loss.fm}', f'--a_at={config.loss.at}']

  def bench(extra):
    args = benchmark.parse_args(flags + extra)
    (case,) = benchmark.cases_from_args(args)
    return benchmark.build_program(case, args, mesh)

  prog = bench(loss)
  model = models.from_config(config.model, benchmark.NUM_CLASSES)
  teacher_cfg, student_cfg = config_checks.step_configs(config)
  step_cfg = teacher_cfg if program == 'teacher' else student_cfg
  trained = distill.make_train_step(step_cfg, model, distill.make_optimizer(config.optimizer),
                                    mesh, teacher=model if step_cfg.needs_teacher else None)
  want = _lowered_text(trained, prog.abstract_args)
  assert _lowered_text(prog.jitted, prog.abstract_args) == want
  if program == 'distill':
    other = bench([f'--a_fm={2 * config.loss.fm}', f'--a_at={config.loss.at}'])
    assert _lowered_text(other.jitted, other.abstract_args) != want


def test_benchmark_runs_without_tensorflow():
  """The GPU machines have JAX but no TensorFlow: with every `tensorflow` import refused, the
  package and its modules import, `python -m camkd_jax.benchmark --help` works and a distill
  program (augmentation on, as in training) builds and lowers."""
  out = conftest.run_python('''
      import importlib.abc, runpy, sys

      class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split('.')[0] == 'tensorflow':
            raise ImportError('tensorflow is blocked')

      sys.meta_path.insert(0, NoTensorFlow())
      from camkd_jax import benchmark
      from camkd_jax.benchmark import cli, flops, programs, report, suites, timing
      out = benchmark.main(['--lower_only', '--programs=distill', '--dtypes=float32',
                            '--image_size=32', '--width=0.0625', '--batch_size=2'])
      assert out['rows'][0]['flops'] > 0 and out['rows'][0]['augment'], out
      sys.argv = ['camkd_jax.benchmark', '--help']
      try:
        runpy.run_module('camkd_jax.benchmark', run_name='__main__', alter_sys=True)
      except SystemExit as e:
        assert e.code == 0, e.code
      print('TF', sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))
      ''')
  assert 'usage: python -m camkd_jax.benchmark' in out and '--suite' in out
  assert out.strip().splitlines()[-1] == 'TF []'
