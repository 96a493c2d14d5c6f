"""Resampling ops shared by the student view and the FM/AT+ terms (pure JAX).

Bilinear resizing with align_corners=True is written as two small interpolation matrices
(out = R_h @ x @ R_w^T per channel): exact, differentiable, and a pair of matmuls that XLA
runs on the MXU/tensor cores instead of a gather.
"""
import functools

import jax.numpy as jnp
import numpy as np


def at_least_f32(x):
  """x in float32, or kept in float64 when it already is (loss arithmetic is never below f32;
  x64 gradient checks stay in float64 end to end)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.lru_cache(maxsize=64)
def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of bilinear weights with align_corners=True (float32)."""
  m = np.zeros((out_size, in_size), np.float64)
  if in_size == 1:
    m[:, 0] = 1.0
    return m.astype(np.float32)
  if out_size == 1:
    m[0, 0] = 1.0  # PyTorch's align_corners=True maps a single output pixel to the first input
    return m.astype(np.float32)
  pos = np.arange(out_size) * (in_size - 1) / (out_size - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, in_size - 2)
  frac = pos - lo
  m[np.arange(out_size), lo] += 1.0 - frac
  m[np.arange(out_size), lo + 1] += frac
  return m.astype(np.float32)


def resize_align_corners(x, size):
  """Bilinear resize of NHWC `x` to `size` = (H, W) with align_corners=True."""
  h, w = x.shape[1], x.shape[2]
  oh, ow = size
  if (h, w) == (oh, ow):
    return x
  rh = jnp.asarray(align_corners_matrix(h, oh), x.dtype)
  rw = jnp.asarray(align_corners_matrix(w, ow), x.dtype)
  return jnp.einsum('oh,bhwc,pw->bopc', rh, x, rw)


def avg_pool(x, factor: int):
  """Average pooling with a factor x factor window and stride factor (NHWC)."""
  if factor == 1:
    return x
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f'image size {h}x{w} is not divisible by the down-sampling factor {factor}')
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


VIEWS = ('upsampled', 'native')


def check_view(view: str, what: str = 'student view') -> str:
  """`view` if it is one of VIEWS, else a ValueError 'unknown <what> <view>; known: [...]'
  (`what` names where the view came from, e.g. 'config.student.view')."""
  if view not in VIEWS:
    raise ValueError(f'unknown {what} {view!r}; known: {list(VIEWS)}')
  return view


def student_view(images, factor: int, view: str = 'upsampled'):
  """The student's input from full-resolution images. 'upsampled' (the reference): average-pool by
  `factor`, then bilinear upsampling (align_corners=True) back to the input size, so the student
  runs on as many pixels as the teacher. 'native': the pooled image at its own size S / factor, so
  the student's convolutions run on 1 / factor^2 of the pixels. factor=1 returns the images."""
  check_view(view)
  if factor == 1:
    return images
  pooled = avg_pool(images, factor)
  return pooled if view == 'native' else resize_align_corners(pooled, images.shape[1:3])


def student_input_size(image_size: int, factor: int, view: str = 'upsampled') -> int:
  """Side length of the student's input: S / factor for a native student, else S."""
  return image_size // factor if view == 'native' else image_size


def magnification_factor(magnification: float, base: float = 10.0) -> int:
  """f = base / m, which must be a power of two (10x -> 1, 5x -> 2, ..., 0.625x -> 16)."""
  ratio = base / float(magnification)
  f = int(round(ratio))
  if f < 1 or abs(ratio - f) > 1e-6 or (f & (f - 1)) != 0:
    raise ValueError(
        f'magnification {magnification} is not a power-of-two fraction of {base}x '
        f'(valid: {[base / 2 ** k for k in range(6)]})')
  return f
