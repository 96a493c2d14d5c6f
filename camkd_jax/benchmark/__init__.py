r"""Times the compiled train and eval programs exactly as the trainer builds them.

Three programs, each built with `camkd_jax.distill` the way the trainer builds them (random
parameters, Adam, donated train state, device-resident random uint8 batches placed with
`sharding.shard_batch`, so the input pipeline is out of the measurement):

  distill  the student step at factor f with the chosen loss terms (default CE + FM + AT+, the
           2.5x setting of the reference: a_fm 0.1, a_at 10), teacher forward included;
  teacher  the teacher's own training step (CE only, factor 1);
  eval     the student's eval forward (student view + logits).

The student of distill and eval sees either the reference view ('upsampled': pooled by f, then
upsampled back to the teacher's size) or the native one (the pooled image at S / f), --views;
--factors sweeps f. The teacher program has no view.

For each (program, terms, dtype, view, factor) it reports compile time, median / min / mean step time after
warm-up, images/s (= batch / median), the FLOPs of the compiled program from XLA's cost analysis,
an analytic convolution count for VGG, the achieved TFLOP/s and its fraction of a known peak.
Output: one markdown table row per configuration on stdout, and JSON with --json_out.

Paper setting (the default: VGG16, 512 px, batch 32, factor 4, float32 and bfloat16):
  python -m camkd_jax.benchmark --json_out=/tmp/bench.json
CPU smoke test:
  python -m camkd_jax.benchmark --image_size=32 --width=0.0625 --batch_size=4 --steps=3 \
      --warmup=1
FLOPs only, nothing executed (lower + compile; e.g. the full-size program on a CPU):
  python -m camkd_jax.benchmark --compile_only --programs=distill,teacher,eval
Native against upsampled students at f = 2, 4, 8 on a shared CPU, interleaved round by round:
  python -m camkd_jax.benchmark --image_size=128 --width=0.25 --batch_size=8 --steps=3 \
      --rounds=5 --programs=distill,eval --dtypes=float32 --views=upsampled,native --factors=2,4,8
Every GPU measurement of experiments/BENCHMARKS.md, prioritised, in < 8 minutes:
  python -m camkd_jax.benchmark --suite=gpu --time_budget_s=420 --json_out=FILE.json

No TensorFlow here: this runs where only JAX is installed.

Modules, by job:
  cli       the flags and `main`
  suites    the programs, one configuration (`Case`), the fixed suites (`SUITES`)
  programs  the run config of a configuration and its jitted program (`run_config`,
            `build_program`)
  timing    lower, compile and time a configuration, alone or interleaved round by round
  flops     XLA's FLOP count, the analytic VGG count, peak rates (`PEAK_TFLOPS`)
  report    the markdown table, the summary line and the atomic JSON write
The names below are the package's public API, so `from camkd_jax import benchmark` reaches them.
"""
from camkd_jax.benchmark.cli import main, parse_args
from camkd_jax.benchmark.flops import (PEAK_TFLOPS, analytic_flops, flops_from_cost,
                                       peak_tflops, vgg_conv_flops)
from camkd_jax.benchmark.programs import Program, build_program, run_config
from camkd_jax.benchmark.report import markdown_table
from camkd_jax.benchmark.suites import NUM_CLASSES, PROGRAMS, SUITES, Case, cases_from_args
from camkd_jax.benchmark.timing import compile_case, run_case, run_interleaved
