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
"""
import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from camkd_jax import distill
from camkd_jax import models
from camkd_jax.models import vgg
from camkd_jax import ops
from camkd_jax import sharding

NUM_CLASSES = 4  # NC, G3, G4, G5
PROGRAMS = ('distill', 'teacher', 'eval')

# Dense peak rates in TFLOP/s per chip. Matched in order against the lower-cased
# `device_kind`, so more specific names come first. Keys: bfloat16, tf32 (NVIDIA tensor cores,
# what XLA uses for float32 convolutions at JAX's default precision), float32 (no tensor cores).
# TPUs run float32 convolutions as bfloat16 passes at the default precision: bfloat16 rate.
PEAK_TFLOPS = (
    ('h100 pcie', dict(bfloat16=756.0, tf32=378.0, float32=51.0)),
    ('h100', dict(bfloat16=989.0, tf32=494.0, float32=67.0)),   # SXM
    ('h200', dict(bfloat16=989.0, tf32=494.0, float32=67.0)),   # same compute as H100 SXM
    ('gh200', dict(bfloat16=989.0, tf32=494.0, float32=67.0)),
    ('a100', dict(bfloat16=312.0, tf32=156.0, float32=19.5)),
    ('tpu v4', dict(bfloat16=275.0, tf32=275.0, float32=275.0)),
    ('tpu v5 lite', dict(bfloat16=197.0, tf32=197.0, float32=197.0)),   # v5e
    ('tpu v5e', dict(bfloat16=197.0, tf32=197.0, float32=197.0)),
    ('tpu v5p', dict(bfloat16=459.0, tf32=459.0, float32=459.0)),
    ('tpu v5', dict(bfloat16=459.0, tf32=459.0, float32=459.0)),        # v5p reports "TPU v5"
    ('tpu v6 lite', dict(bfloat16=918.0, tf32=918.0, float32=918.0)),   # v6e
    ('tpu v6e', dict(bfloat16=918.0, tf32=918.0, float32=918.0)),
)
# Matmul precisions under which float32 convolutions may run as TF32 on NVIDIA tensor cores.
_TF32_PRECISIONS = (None, 'default', 'high', 'tensorfloat32', 'bfloat16', 'fastest')


# ----------------------------------------------------------------------------- options
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
  p.add_argument('--suite', default='', choices=('', 'gpu'),
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


def _split(text):
  return [t.strip() for t in text.split(',') if t.strip()]


def _check_args(parser, args):
  """Normalises list flags and rejects bad values with a message naming the flag."""
  args.programs = _split(args.programs)
  args.views = _split(args.views)
  try:
    args.factors = [int(f) for f in _split(args.factors)] or [args.factor]
  except ValueError:
    parser.error(f'--factors={args.factors!r}: expected comma-separated integers, e.g. 2,4,8')
  args.dtypes = _split(args.dtypes)
  args.terms = [tuple(_split(t)) for t in (args.terms or ['ce,fm,at'])]
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
  bad = [v for v in args.views if v not in ops.VIEWS]
  if bad or not args.views:
    parser.error(f'--views: unknown {bad}; choose from {list(ops.VIEWS)}')
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


# ----------------------------------------------------------------------------- numbers
def flops_from_cost(cost) -> Optional[float]:
  """Total 'flops' of a cost analysis: a dict (new JAX), a list of dicts (old JAX) or None."""
  if cost is None:
    return None
  if isinstance(cost, dict):
    cost = [cost]
  total = [float(c['flops']) for c in cost if c and 'flops' in c]
  return sum(total) if total else None


def _cost_value(cost, key) -> Optional[float]:
  if cost is None:
    return None
  if isinstance(cost, dict):
    cost = [cost]
  vals = [float(c[key]) for c in cost if c and key in c]
  return sum(vals) if vals else None


def peak_tflops(device_kind: str, dtype: str, precision=None) -> Tuple[Optional[float], str]:
  """(peak TFLOP/s, label) of one chip for `dtype`, or (None, reason) for an unknown chip."""
  kind = device_kind.lower()
  for key, peaks in PEAK_TFLOPS:
    if key in kind:
      if dtype in ('bfloat16', 'float16'):
        return peaks['bfloat16'], f'{key} bf16 dense'
      if precision in _TF32_PRECISIONS:
        return peaks['tf32'], f'{key} tf32 dense (float32 at default precision)'
      return peaks['float32'], f'{key} fp32'
  return None, f'unknown chip {device_kind!r} (pass --peak_tflops)'


def vgg_conv_flops(image_size: int, width: float, channels=None, num_classes=NUM_CLASSES,
                   exact_padding: bool = True):
  """(forward FLOPs of one image, FLOPs of the first conv's input gradient) for the VGG in
  camkd_jax.models.vgg (3x3 convs and the head; 2 FLOPs per multiply-add).

  exact_padding counts only the taps that land inside the image (a 3x3 'same' conv over n
  pixels has 3n - 2 valid taps per axis), as XLA's cost analysis does; False gives the usual
  2 * H * W * 9 * Cin * Cout.
  """
  from camkd_jax.models import vgg  # pylint: disable=g-import-not-at-top
  channels = channels or vgg.VGG16_CHANNELS
  size, cin, total, first_dgrad = image_size, 3, 0.0, None
  for b, block in enumerate(channels):
    for ch in block:
      cout = max(1, int(round(ch * width)))
      taps = (3 * size - 2) ** 2 if exact_padding else 9 * size * size
      flops = 2.0 * taps * cin * cout
      if first_dgrad is None:
        first_dgrad = flops
      total += flops
      cin = cout
    if b < len(channels) - 1:
      size //= 2
  total += 2.0 * cin * num_classes
  return total, first_dgrad


def analytic_flops(program, terms, model_name, image_size, width, batch,
                   exact_padding=True, student_size=None) -> Optional[float]:
  """Conv + head FLOPs of one step: forward F, backward 2F minus the unneeded input gradient of
  the first conv; the teacher of a distill step adds one forward at `image_size`. The student
  (distill, eval) runs at `student_size` (default `image_size`; S / f for a native student).
  Grad-CAM is taken as free, which holds for AT+ at block5 (its VJP only goes through the
  pooling and the head; at an earlier layer it would add a partial backward per model). None for
  non-VGG models."""
  if model_name != 'vgg16':
    return None
  size = image_size if program == 'teacher' else (student_size or image_size)
  fwd, first_dgrad = vgg_conv_flops(size, width, exact_padding=exact_padding)
  if program == 'eval':
    per_image = fwd
  else:
    per_image = 3 * fwd - first_dgrad
    if program == 'distill' and any(t != 'ce' for t in terms):
      per_image += vgg_conv_flops(image_size, width, exact_padding=exact_padding)[0]
  return per_image * batch


# ----------------------------------------------------------------------------- programs
@dataclasses.dataclass(frozen=True)
class Case:
  """One configuration. factor 0 = --factor; view and factor are ignored by the teacher program
  (its input is the full-resolution image)."""
  program: str
  dtype: str
  terms: Tuple[str, ...] = ()
  view: str = 'upsampled'
  factor: int = 0

  @property
  def name(self):
    return f'distill[{"+".join(self.terms)}]' if self.program == 'distill' else self.program

  @property
  def label(self):
    """Name and dtype, plus the view and factor where they are not the defaults."""
    extra = '' if self.program == 'teacher' else (
        (f' {self.view}' if self.view != 'upsampled' else '') +
        (f' f={self.factor}' if self.factor else ''))
    return f'{self.name} {self.dtype}{extra}'

  def student_factor(self, args) -> int:
    return 1 if self.program == 'teacher' else (self.factor or args.factor)


_PAPER = ('ce', 'fm', 'at')
# Prioritised: the targets first, then the cost of AT+ and the teacher; with
# --time_budget_s the tail is what gets dropped.
# The native students come right after their upsampled bf16 counterparts at f = 4,
# so the first GPU run compares them within its budget; the f = 2, 8 native steps follow the
# float32 targets (an upsampled step costs the same at every f: its student runs at S).
SUITES = {
    'gpu': (
        Case('distill', 'bfloat16', _PAPER), Case('distill', 'bfloat16', _PAPER, 'native'),
        Case('eval', 'bfloat16'), Case('eval', 'bfloat16', (), 'native'),
        Case('distill', 'float32', _PAPER), Case('eval', 'float32'),
        Case('distill', 'bfloat16', _PAPER, 'native', 2),
        Case('distill', 'bfloat16', _PAPER, 'native', 8),
        Case('distill', 'bfloat16', ('ce', 'fm')), Case('teacher', 'bfloat16', ('ce',)),
        Case('distill', 'float32', ('ce', 'fm')), Case('teacher', 'float32', ('ce',)),
    ),
}


def cases_from_args(args) -> List[Case]:
  """The configurations, by dtype, program, terms, factor, view (the teacher once per dtype).
  A single factor is left as 0 (= --factor) so that labels stay short."""
  if args.suite:
    return list(SUITES[args.suite])
  factors = [0] if args.factors == [args.factor] else args.factors
  out = []
  for dtype in args.dtypes:
    for program in args.programs:
      if program == 'teacher':
        out.append(Case(program, dtype, ('ce',)))
        continue
      for terms in (args.terms if program == 'distill' else [()]):
        out.extend(Case(program, dtype, terms, view, f) for f in factors for view in args.views)
  return out


def run_config(case: Case, args):
  """The run config whose training program this case times: configs/base.py with --config_arg,
  then the benchmark's flags (model, width, image size, dtype, magnification from the factor, the
  case's loss terms and their weights, AT map and layer, augmentation, learning rate). The program
  is built from it as the trainer builds its own (distill.StepConfig.from_config,
  models.from_config, distill.make_optimizer), so the benchmark times what training runs."""
  try:
    from configs import base  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name == 'configs':
      raise SystemExit('camkd_jax.benchmark: run it from the repository root (it builds its '
                       'programs from configs/base.py)') from e
    raise SystemExit(f'camkd_jax.benchmark: configs/base.py needs the package {e.name}: '
                     f'pip install {e.name.replace("_", "-")}') from e
  c = base.base_config(args.config_arg or None)
  c.model.name, c.model.width, c.model.dtype = args.model, float(args.width), case.dtype
  c.image_size = int(args.image_size)
  c.magnification = c.base_magnification / case.student_factor(args)
  weight = {'ce': 1.0, 'kd': args.a_kd, 'fm': args.a_fm, 'at': args.a_at, 'sr': args.a_sr}
  for term in distill.TERMS:
    setattr(c.loss, term, float(weight[term]) if term in case.terms else 0.0)
  c.attention.map, c.attention.layers = args.at_map, args.at_layer
  c.augment.enabled = not args.no_augment
  c.optimizer.name, c.optimizer.learning_rate = 'adam', float(args.learning_rate)
  c.student.view = case.view
  return c


@dataclasses.dataclass
class Program:
  """A jitted program, the abstract arguments to lower it with and a way to make real ones."""
  jitted: object
  abstract_args: tuple
  make_args: object        # () -> concrete device args
  carries_state: bool      # train steps return the (donated) state as their first output
  batch: int


def _init_fn(model, image_size):
  # Parameter shapes do not depend on the image size (global average pooling), so a small
  # init image keeps initialisation cheap; 32 px still reaches block5.
  size = min(image_size, 32)
  return lambda rng: distill.init_params(model, rng, size)


def _numpy_params(init, key, seed):
  """Parameters of `init`'s shapes drawn with NumPy: He-normal (fan-in) kernels, zero biases.
  The timings do not depend on the values, and no PRNG init kernels get compiled (tens of
  seconds per model on a busy 2-core CPU)."""
  rng = np.random.default_rng(seed)

  def leaf(s):
    if len(s.shape) < 2:
      return np.zeros(s.shape, np.float32)
    std = np.sqrt(2.0 / np.prod(s.shape[:-1]))
    return (std * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map(leaf, jax.eval_shape(init, key))


def _batch(rng: np.random.Generator, batch, size):
  return {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (batch,), dtype=np.int32)}


def _abstract_batch(batch, size):
  return {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}


def build_program(case: Case, args, mesh) -> Program:
  """Builds the jitted program with distill.make_train_step / make_eval_step."""
  config = run_config(case, args)
  model = models.from_config(config.model, NUM_CLASSES)
  init = _init_fn(model, args.image_size)
  key = jax.random.PRNGKey(args.seed)
  np_rng = np.random.default_rng(args.seed)
  size = args.image_size

  if case.program == 'eval':
    sharding.check_batch_size(args.eval_batch_size, mesh, 'eval_batch_size')
    fn = distill.make_eval_step(model, case.student_factor(args), mesh, case.view)
    abstract = (jax.eval_shape(init, key),
                jax.ShapeDtypeStruct((args.eval_batch_size, size, size, 3), jnp.uint8))

    def make_args():
      params = sharding.replicate(_numpy_params(init, key, args.seed), mesh)
      images = _batch(np_rng, args.eval_batch_size, size)['image']
      return params, sharding.shard_batch({'image': images}, mesh)['image']
    return Program(fn, abstract, make_args, False, args.eval_batch_size)

  sharding.check_batch_size(args.batch_size, mesh)
  stage = 'teacher' if case.program == 'teacher' else 'student'
  cfg = distill.StepConfig.from_config(config, stage)
  tx = distill.make_optimizer(config.optimizer)
  teacher = model if cfg.needs_teacher else None  # one architecture, as in training
  fn = distill.make_train_step(cfg, model, tx, mesh, teacher=teacher)
  skey, tkey, rkey = jax.random.split(key, 3)
  make_state = lambda: distill.create_train_state(init(skey), tx, rkey)
  tinit = _init_fn(teacher, size) if teacher is not None else None
  abstract = (jax.eval_shape(make_state),
              jax.eval_shape(tinit, tkey) if tinit else None,
              _abstract_batch(args.batch_size, size))

  def make_args():
    params = _numpy_params(init, skey, args.seed)
    state = sharding.replicate(jax.jit(lambda p: distill.create_train_state(p, tx, rkey))(
        params), mesh)
    tparams = (sharding.replicate(_numpy_params(tinit, tkey, args.seed + 1), mesh)
               if tinit else None)
    # Two different batches alternate, so no step can reuse a cached result.
    batches = [sharding.shard_batch(_batch(np_rng, args.batch_size, size), mesh)
               for _ in range(2)]
    return state, tparams, batches
  return Program(fn, abstract, make_args, True, args.batch_size)


# ----------------------------------------------------------------------------- timing
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
  row['flops_unoptimized'] = flops_from_cost(_cost_analysis(lowered))
  row['analytic_flops'] = analytic_flops(case.program, case.terms, args.model,
                                         args.image_size, args.width, prog.batch,
                                         student_size=row['student_size'])
  if args.lower_only:
    row['flops'], row['flops_source'] = row['flops_unoptimized'], 'lowered'
    return _finish(row, args, device_kind), None, prog
  compiled, row['compile_s'] = _timed(lowered.compile)
  cost = _cost_analysis(compiled)
  row['flops'], row['flops_source'] = flops_from_cost(cost), 'compiled'
  row['flops_compiled'] = row['flops']
  # A backend may count library calls (cuDNN convs, cuBLAS) as 0 FLOPs: a compiled count well
  # below the unoptimised program's would then be wrong, so use the latter.
  if not row['flops'] or (row['flops_unoptimized'] and
                          row['flops'] < 0.9 * row['flops_unoptimized']):
    row['flops'], row['flops_source'] = row['flops_unoptimized'], 'lowered'
  row['bytes_accessed'] = _cost_value(cost, 'bytes accessed')
  row.update(_memory(compiled))
  return _finish(row, args, device_kind), compiled, prog


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
  return _finish(row, args, device_kind)


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


def _finish(row, args, device_kind):
  """Adds achieved TFLOP/s and the fraction of the peak rate."""
  if args.peak_tflops > 0:
    peak, label = args.peak_tflops, '--peak_tflops'
  else:
    peak, label = peak_tflops(device_kind, row['dtype'], args.matmul_precision)
  row['peak_tflops'], row['peak_label'] = peak, label
  median = row.get('step_ms_median')
  if median and row.get('flops'):
    row['achieved_tflops'] = row['flops'] / (median / 1e3) / 1e12
    row['peak_fraction'] = row['achieved_tflops'] / peak if peak else None
  else:
    row['achieved_tflops'] = row['peak_fraction'] = None
  return row


# ----------------------------------------------------------------------------- reporting
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
  dev = jax.devices()[0]
  import flax  # pylint: disable=g-import-not-at-top
  return dict(device_kind=dev.device_kind, platform=dev.platform,
              num_devices=jax.device_count(), jax_version=jax.__version__,
              flax_version=flax.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''), python=sys.version.split()[0])


def _set_xla_flags(extra: str):
  if extra:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + extra).strip()


def main(argv: Optional[Sequence[str]] = None) -> Dict:
  """Runs every configuration; prints the table and returns (and optionally writes) the JSON."""
  args = parse_args(argv)
  _set_xla_flags(args.xla_flags)  # before the first call that starts the backend
  env = environment()
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
        compiled_cases.append(compile_case(case, args, mesh, env['device_kind']))
        row = compiled_cases[-1][0]
      else:
        row = run_case(case, args, mesh, env['device_kind'])
    result['rows'].append(row)
    print(f'# done {case.label}: ' + _summary(row), flush=True)
    _write_json(result, args.json_out)  # after every case: a later crash loses nothing
  if interleave:
    def report(r, rows):
      print(f'# round {r + 1}/{args.rounds} timed', flush=True)
      _write_json(dict(result, rows=rows, rounds_done=r + 1), args.json_out)
    result['rows'] = run_interleaved(compiled_cases, args, env['device_kind'], report)
    for row in result['rows']:
      print(f'# timed {row["label"]}: ' + _summary(row), flush=True)
  result['total_s'] = time.perf_counter() - start
  _write_json(result, args.json_out)
  print(markdown_table(result['rows']), flush=True)
  return result


def _write_json(result, path):
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def _summary(row):
  parts = []
  if row.get('compile_s') is not None:
    parts.append(f'compile {row["compile_s"]:.1f}s')
  if row.get('step_ms_median') is not None:
    parts.append(f'median {row["step_ms_median"]:.2f} ms, {row["images_per_s"]:.1f} images/s')
  if row.get('flops'):
    parts.append(f'{row["flops"] / 1e12:.4g} TFLOP/step ({row["flops_source"]})')
  return ', '.join(parts)


if __name__ == '__main__':
  main()
