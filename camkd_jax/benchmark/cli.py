"""The command line: flags (`parse_args`, each bad value named in one line) and `main`, which
compiles and times every configuration, prints the table and writes the JSON."""
import argparse
import contextlib
import os
import sys
import time
from typing import Dict, Optional, Sequence

import jax

from camkd_jax import distill
from camkd_jax import models
from camkd_jax import ops
from camkd_jax import parsing
from camkd_jax import sharding
from camkd_jax.benchmark import report
from camkd_jax.benchmark import timing
from camkd_jax.benchmark.suites import PROGRAMS, SUITES, cases_from_args
from camkd_jax.models import vgg


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m camkd_jax.benchmark',
      description='Times the jitted distillation / teacher / eval programs.')
  p.add_argument('--programs', default='distill,teacher,eval',
                 help=f'comma-separated subset of {",".join(PROGRAMS)}')
  p.add_argument('--terms', action='append', default=None,
                 help='loss terms of the distill program, e.g. ce,fm,at (repeat the flag to '
                      'time several sets, e.g. --terms=ce,fm,at --terms=ce,fm). Default ce,fm,at')
  p.add_argument('--dtypes', default='float32,bfloat16',
                 help='model compute dtypes (parameters stay float32)')
  p.add_argument('--config_arg', default='protocol=paper',
                 help="argument of configs/base.py for the run config that the programs are "
                      "built from as in training ('' = the embedded dataset's defaults, with their "
                      "input standardisation); the flags below set its fields")
  p.add_argument('--model', default='vgg16', help='backbone name in camkd_jax.models')
  p.add_argument('--width', type=float, default=1.0, help='channel multiplier (1.0 = VGG16)')
  p.add_argument('--image_size', type=int, default=512, help='teacher input size (pixels)')
  p.add_argument('--factor', type=int, default=4,
                 help='student down-sampling factor (2.5x of 10x -> 4); teacher program uses 1')
  p.add_argument('--factors', default='',
                 help='comma-separated factors to sweep, e.g. 2,4,8 (overrides --factor for the '
                      'distill and eval programs)')
  p.add_argument('--views', default='upsampled',
                 help=f'comma-separated student views of the distill and eval programs, from '
                      f'{",".join(ops.VIEWS)} (the teacher program has none)')
  p.add_argument('--batch_size', type=int, default=32, help='global batch')
  p.add_argument('--eval_batch_size', type=int, default=0, help='0 = --batch_size')
  p.add_argument('--a_kd', type=float, default=1.0, help='weight of KD when on')
  p.add_argument('--a_fm', type=float, default=0.1, help='weight of FM when on')
  p.add_argument('--a_at', type=float, default=10.0, help='weight of AT+ when on')
  p.add_argument('--a_sr', type=float, default=1.0, help='weight of SR when on')
  p.add_argument('--at_layer', default='block5', help='activation for Grad-CAM / AT+')
  p.add_argument('--at_map', default='gradcam_plus',
                 help='saliency map of the AT term (camkd_jax.saliency.MAPS); norm minmax, '
                      'distance rmse as config.attention defaults')
  p.add_argument('--no_augment', action='store_true',
                 help='leave on-device augmentation out of the train steps (it is in by '
                      'default, as in training)')
  p.add_argument('--learning_rate', type=float, default=1e-4)
  p.add_argument('--steps', type=int, default=30, help='timed steps (after warm-up)')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps after compilation')
  p.add_argument('--rounds', type=int, default=1,
                 help='time every configuration in this many rounds of --steps steps, the '
                      'configurations interleaved round by round (all compiled first), so that '
                      'a shared machine\'s load hits all of them alike; medians over all rounds')
  p.add_argument('--no_pipelined', action='store_true',
                 help='skip the extra timing of --steps steps dispatched back to back')
  p.add_argument('--compile_only', action='store_true',
                 help='lower + compile with abstract inputs and report FLOPs; run nothing')
  p.add_argument('--lower_only', action='store_true',
                 help='only lower (no XLA optimisation): FLOPs of the unoptimised HLO')
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='peak rate for the utilisation column (0 = from the device table)')
  p.add_argument('--matmul_precision', default=None,
                 help='jax_default_matmul_precision for the programs (e.g. highest to forbid '
                      'TF32); default: JAX default')
  p.add_argument('--xla_flags', default='',
                 help='appended to XLA_FLAGS before the backend starts (e.g. '
                      '--xla_gpu_autotune_level=2)')
  p.add_argument('--suite', default='', choices=('',) + tuple(SUITES),
                 help='gpu = the fixed, prioritised list of SUITES["gpu"] at the paper setting '
                      '(replaces --programs/--terms/--dtypes)')
  p.add_argument('--time_budget_s', type=float, default=0.0,
                 help='start no new configuration after this many seconds (0 = no limit); '
                      'skipped ones are listed in the output')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json_out', default='', help='write all results to this JSON file')
  args = p.parse_args(argv)
  _check_args(p, args)
  return args


def _check_args(parser, args):
  """Normalises list flags and rejects bad values with a message naming the flag."""
  args.programs = parsing.split_list(args.programs)
  args.views = parsing.split_list(args.views)
  try:
    args.factors = [int(f) for f in parsing.split_list(args.factors)] or [args.factor]
  except ValueError:
    parser.error(f'--factors={args.factors!r}: expected comma-separated integers, e.g. 2,4,8')
  args.dtypes = parsing.split_list(args.dtypes)
  args.terms = [tuple(parsing.split_list(t)) for t in (args.terms or ['ce,fm,at'])]
  bad = [x for x in args.programs if x not in PROGRAMS]
  if bad or not args.programs:
    parser.error(f'--programs: unknown {bad}; choose from {list(PROGRAMS)}')
  bad = [x for x in args.dtypes if x not in models.DTYPES]
  if bad or not args.dtypes:
    parser.error(f'--dtypes: unknown {bad}; choose from {sorted(models.DTYPES)}')
  for terms in args.terms:
    bad = [t for t in terms if t not in distill.TERMS]
    if bad or not terms:
      parser.error(f'--terms={",".join(terms)}: unknown {bad}; choose from {list(distill.TERMS)}')
  for view in args.views or ['']:
    try:
      ops.check_view(view)
    except ValueError as e:
      parser.error(f'--views: {e}')
  for name in ('steps', 'batch_size', 'image_size', 'factor', 'rounds'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be >= 1, got {getattr(args, name)}')
  if args.warmup < 0:
    parser.error(f'--warmup must be >= 0, got {args.warmup}')
  for f in args.factors:
    if f < 1 or args.image_size % f:
      parser.error(f'--image_size={args.image_size} is not divisible by factor {f} '
                   '(--factor / --factors)')
    if 'native' in args.views and args.image_size // f < vgg.MIN_INPUT_SIZE:
      parser.error(f'--views=native: the native student input {args.image_size} / {f} = '
                   f'{args.image_size // f} px is under {vgg.MIN_INPUT_SIZE} px (VGG has no block5 '
                   'map there); raise --image_size or lower the factor')
  args.eval_batch_size = args.eval_batch_size or args.batch_size


def _set_xla_flags(extra: str):
  if extra:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + extra).strip()


def main(argv: Optional[Sequence[str]] = None) -> Dict:
  """Runs every configuration; prints the table and returns (and optionally writes) the JSON."""
  args = parse_args(argv)
  _set_xla_flags(args.xla_flags)  # before the first call that starts the backend
  env = report.environment()
  mesh = sharding.make_mesh()
  print(f'# device: {env["device_kind"]} x{env["num_devices"]} ({env["platform"]}), '
        f'jax {env["jax_version"]}, flax {env["flax_version"]}', flush=True)
  result = dict(env, argv=list(sys.argv[1:] if argv is None else argv), rows=[], skipped=[])
  start = time.perf_counter()
  interleave = args.rounds > 1 and not (args.compile_only or args.lower_only)
  compiled_cases = []
  for case in cases_from_args(args):
    if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
      result['skipped'].append(case.label)
      print(f'# skipped {case.label}: --time_budget_s={args.time_budget_s:g} spent', flush=True)
      continue
    precision = (jax.default_matmul_precision(args.matmul_precision)
                 if args.matmul_precision else contextlib.nullcontext())
    with precision:
      if interleave:
        compiled_cases.append(timing.compile_case(case, args, mesh, env['device_kind']))
        row = compiled_cases[-1][0]
      else:
        row = timing.run_case(case, args, mesh, env['device_kind'])
    result['rows'].append(row)
    print(f'# done {case.label}: ' + report.summary(row), flush=True)
    report.write_json(result, args.json_out)  # after every case: a later crash loses nothing
  if interleave:
    def on_round(r, rows):
      print(f'# round {r + 1}/{args.rounds} timed', flush=True)
      report.write_json(dict(result, rows=rows, rounds_done=r + 1), args.json_out)
    result['rows'] = timing.run_interleaved(compiled_cases, args, env['device_kind'],
                                            on_round)
    for row in result['rows']:
      print(f'# timed {row["label"]}: ' + report.summary(row), flush=True)
  result['total_s'] = time.perf_counter() - start
  report.write_json(result, args.json_out)
  print(report.markdown_table(result['rows']), flush=True)
  return result
