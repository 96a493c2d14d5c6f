"""FLOP accounting: XLA's cost analysis, an analytic convolution count for VGG, the peak rates
of known chips and the achieved TFLOP/s of a timed row."""
from typing import Optional, Tuple

from camkd_jax.benchmark.suites import NUM_CLASSES


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


def flops_from_cost(cost) -> Optional[float]:
  """Total 'flops' of a cost analysis: a dict (new JAX), a list of dicts (old JAX) or None."""
  return cost_value(cost, 'flops')


def cost_value(cost, key) -> Optional[float]:
  """Total of `key` over a cost analysis (see flops_from_cost), None where no entry has it."""
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


def finish(row, args, device_kind):
  """Adds achieved TFLOP/s and the fraction of the peak rate (of --peak_tflops or the chip's)."""
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

