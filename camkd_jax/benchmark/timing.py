"""Compiling and timing: lower + compile one configuration (FLOPs and memory from XLA), then time
its steps alone (`run_case`) or interleaved with the others round by round (`run_interleaved`)."""
import statistics
import time
from typing import Dict, List, Optional

import jax
import numpy as np

from camkd_jax import ops
from camkd_jax.benchmark import flops
from camkd_jax.benchmark.programs import Program, build_program
from camkd_jax.benchmark.suites import Case


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


class Runner:
  """Calls a compiled program on its device-resident arguments, made once (train steps carry
  their donated state from call to call and alternate two batches, so no step can reuse a
  cached result)."""

  def __init__(self, compiled, prog: Program):
    self.prog, self.compiled, self.calls = prog, compiled, 0
    if prog.carries_state:
      self.state, self.tparams, self.batches = prog.make_args()
    else:
      self.params, self.images = prog.make_args()

  def __call__(self):
    if not self.prog.carries_state:
      return self.compiled(self.params, self.images)
    batch = self.batches[self.calls % len(self.batches)]
    self.calls += 1
    self.state, metrics = self.compiled(self.state, self.tparams, batch)
    return self.state, metrics

  def finite(self) -> bool:
    out = self()
    if self.prog.carries_state:
      return int(jax.device_get(out[0]['bad_step'])) < 0
    return bool(np.all(np.isfinite(np.asarray(jax.device_get(out)))))


def time_steps(one, steps: int, warmup: int, pipelined: bool):
  """Per-step wall seconds, per-step process CPU seconds (all threads: on a shared CPU the
  contention-robust measure of the work; on an accelerator the host's share) and seconds for
  `steps` steps dispatched back to back (or None)."""
  for _ in range(warmup):
    jax.block_until_ready(one())
  times, cpu_times = [], []
  for _ in range(steps):
    c0 = time.process_time()
    _, dt = _timed(lambda: jax.block_until_ready(one()))
    cpu_times.append(time.process_time() - c0)
    times.append(dt)
  total = None
  if pipelined:
    def run_all():
      out = None
      for _ in range(steps):
        out = one()
      return jax.block_until_ready(out)
    _, total = _timed(run_all)
  return times, cpu_times, total


def time_program(compiled, prog: Program, steps: int, warmup: int, pipelined: bool):
  """time_steps of a fresh Runner, and whether its output (the train state) stayed finite."""
  one = Runner(compiled, prog)
  times, cpu_times, total = time_steps(one, steps, warmup, pipelined)
  return times, cpu_times, total, one.finite()


def _cost_analysis(stage):
  """`stage.cost_analysis()` of a Lowered/Compiled, or None where a JAX version lacks it."""
  try:
    return stage.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    print(f'# cost_analysis unavailable on {type(stage).__name__}: {e!r}', flush=True)
    return None


def _memory(compiled) -> Dict[str, Optional[int]]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  names = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
           'alias_size_in_bytes')
  return {n: (int(getattr(m, n)) if m is not None and hasattr(m, n) else None) for n in names}


def _peak_device_bytes():
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def compile_case(case: Case, args, mesh, device_kind: str):
  """Builds, lowers and (unless --lower_only) compiles one configuration: (row, compiled or
  None, Program). The row holds everything but the timings."""
  prog = build_program(case, args, mesh)
  factor = case.student_factor(args)
  view = None if case.program == 'teacher' else case.view
  row = dict(program=case.program, name=case.name, label=case.label, terms=','.join(case.terms),
             dtype=case.dtype, model=args.model, width=args.width, view=view,
             image_size=args.image_size, factor=factor,
             student_size=(ops.student_input_size(args.image_size, factor, view)
                           if view else None),
             batch_size=prog.batch, augment=(case.program != 'eval' and not args.no_augment),
             matmul_precision=args.matmul_precision)
  lowered, row['lower_s'] = _timed(lambda: prog.jitted.lower(*prog.abstract_args))
  row['flops_unoptimized'] = flops.flops_from_cost(_cost_analysis(lowered))
  row['analytic_flops'] = flops.analytic_flops(case.program, case.terms, args.model,
                                               args.image_size, args.width, prog.batch,
                                               student_size=row['student_size'])
  if args.lower_only:
    row['flops'], row['flops_source'] = row['flops_unoptimized'], 'lowered'
    return flops.finish(row, args, device_kind), None, prog
  compiled, row['compile_s'] = _timed(lowered.compile)
  cost = _cost_analysis(compiled)
  row['flops'], row['flops_source'] = flops.flops_from_cost(cost), 'compiled'
  row['flops_compiled'] = row['flops']
  # A backend may count library calls (cuDNN convs, cuBLAS) as 0 FLOPs: a compiled count well
  # below the unoptimised program's would then be wrong, so use the latter.
  if not row['flops'] or (row['flops_unoptimized'] and
                          row['flops'] < 0.9 * row['flops_unoptimized']):
    row['flops'], row['flops_source'] = row['flops_unoptimized'], 'lowered'
  row['bytes_accessed'] = flops.cost_value(cost, 'bytes accessed')
  row.update(_memory(compiled))
  return flops.finish(row, args, device_kind), compiled, prog


def add_timings(row, args, times, cpu_times, totals, finite, batch, device_kind):
  """Medians etc. of all timed steps (over every round) into the row."""
  row.update(steps=len(times), rounds=args.rounds, warmup=args.warmup, finite=finite,
             step_ms_median=1e3 * statistics.median(times), step_ms_min=1e3 * min(times),
             step_ms_mean=1e3 * statistics.fmean(times),
             host_cpu_ms_median=1e3 * statistics.median(cpu_times))
  row['images_per_s'] = batch / (row['step_ms_median'] / 1e3)
  totals = [t for t in totals if t]
  row['pipelined_images_per_s'] = (batch * args.steps / statistics.median(totals)
                                   if totals else None)
  row['peak_device_bytes'] = _peak_device_bytes()
  return flops.finish(row, args, device_kind)


def run_case(case: Case, args, mesh, device_kind: str) -> Dict:
  """Builds, lowers, compiles and (unless asked not to) times one configuration."""
  row, compiled, prog = compile_case(case, args, mesh, device_kind)
  if compiled is None or args.compile_only:
    return row
  times, cpu_times, total, finite = time_program(compiled, prog, args.steps, args.warmup,
                                                 not args.no_pipelined)
  return add_timings(row, args, times, cpu_times, [total], finite, prog.batch, device_kind)


def run_interleaved(compiled_cases, args, device_kind, on_round=None) -> List[Dict]:
  """Times the compiled cases in --rounds rounds, one block of --steps steps per case per round
  (warm-up in every round), so slow phases of a shared machine fall on every case alike.
  on_round(r, rows) is called after each round with the rows so far."""
  runners = [Runner(compiled, prog) for _, compiled, prog in compiled_cases]
  acc = [dict(times=[], cpu=[], totals=[]) for _ in runners]

  def rows(finite):
    return [add_timings(dict(row), args, a['times'], a['cpu'], a['totals'], finite(one),
                        prog.batch, device_kind)
            for (row, _, prog), one, a in zip(compiled_cases, runners, acc)]
  for r in range(args.rounds):
    for one, a in zip(runners, acc):
      times, cpu_times, total = time_steps(one, args.steps, args.warmup, not args.no_pipelined)
      a['times'] += times
      a['cpu'] += cpu_times
      a['totals'].append(total)
    if on_round:  # the rounds so far (finiteness unchecked: None), e.g. to save them
      on_round(r, rows(lambda one: None))
  return rows(lambda one: one.finite())

