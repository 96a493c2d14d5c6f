"""On-device data augmentation (pure JAX): flip, rotation, scale, translation, colour jitter.

Follows the reference's kornia pipeline (cvblab/kd_resolution, main.py), applied to the
high-resolution batch before the student view is made:

  RandomHorizontalFlip(p)                     -> flip
  RandomRotation(degrees=45, p)               -> rotate
  RandomAffine(degrees=0, scale=(.95, 1.2), p) -> scale
  RandomAffine(degrees=0, translate=(.05, 0), p) -> translate (horizontal only)
  ColorJitter(.1, .1, .1, hue=0, p)           -> color_jitter (one gate for all three)

Every gate is an independent Bernoulli(p) draw per example. Differences from the reference, on
purpose: flip, rotation, scale and translation are composed into ONE bilinear resampling per
example (the reference resamples up to three times, blurring more), and the colour ops run in the
fixed order brightness -> contrast -> saturation (kornia/torchvision permute the order randomly).

Geometry conventions (shared with torchvision/kornia):
  * pixel centres sit at integer indices; transforms act about the image centre
    ((W - 1) / 2, (H - 1) / 2) in (x = column, y = row) coordinates;
  * a positive angle rotates the content counter-clockwise as displayed (row 0 on top), so
    +90 degrees on a square image equals np.rot90(image, k=1);
  * scale > 1 enlarges the content; tx > 0 moves it right, ty > 0 moves it down;
  * samples outside the image read zeros and are blended bilinearly with the inside pixels
    (grid_sample padding_mode='zeros', i.e. scipy.ndimage mode='grid-constant', cval=0).

The per-example random numbers are drawn by `sample_draws` into an `AugmentDraws` pytree and
applied by `apply_draws`; both are pure, so tests can apply known draws.
"""
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Static augmentation settings (hashable: usable as a jit static argument)."""
  enabled: bool = True
  prob: float = 0.5
  flip: bool = True
  rotate: float = 45.0               # max |angle| in degrees, 0 = off
  scale: tuple = (0.95, 1.20)        # (lo, hi), (1, 1) = off
  translate: float = 0.05            # max |tx| as a fraction of the width, 0 = off
  color_jitter: float = 0.1          # brightness/contrast/saturation strength, 0 = off

  def __post_init__(self):
    try:
      scale = tuple(float(s) for s in self.scale)
    except TypeError:
      scale = ()
    if len(scale) != 2:
      raise ValueError(f'augment.scale must be a pair (lo, hi), got {self.scale!r}')
    object.__setattr__(self, 'scale', scale)
    for name in ('prob', 'rotate', 'translate', 'color_jitter'):
      object.__setattr__(self, name, float(getattr(self, name)))
    object.__setattr__(self, 'enabled', bool(self.enabled))
    object.__setattr__(self, 'flip', bool(self.flip))
    checks = (
        (0.0 <= self.prob <= 1.0, 'prob', 'must lie in [0, 1]'),
        (0.0 <= self.rotate <= 180.0, 'rotate', 'must be degrees in [0, 180] (0 = off)'),
        (0.0 < scale[0] <= scale[1], 'scale', 'must be (lo, hi) with 0 < lo <= hi ((1, 1) = off)'),
        (0.0 <= self.translate < 1.0, 'translate', 'must be a width fraction in [0, 1) (0 = off)'),
        (0.0 <= self.color_jitter <= 1.0, 'color_jitter', 'must lie in [0, 1] (0 = off)'),
    )
    for ok, name, what in checks:
      if not ok:
        raise ValueError(f'augment.{name} = {getattr(self, name)!r} {what}')

  @classmethod
  def from_config(cls, cfg) -> 'AugmentParams':
    """Builds the params from `config.augment` (an ml_collections ConfigDict or a dict)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    keys = set(cfg.keys())
    unknown = sorted(keys - set(fields))
    if unknown:
      raise ValueError(f'unknown config.augment key(s) {unknown}; known: {fields}')
    return cls(**{k: cfg[k] for k in fields if k in keys})

  @classmethod
  def identity(cls) -> 'AugmentParams':
    """Params that leave every image unchanged."""
    return cls(enabled=False)

  @property
  def geometric(self) -> bool:
    """Whether rotation, scale or translation can happen (needs a resampling)."""
    return self.rotate > 0 or self.scale != (1.0, 1.0) or self.translate > 0

  @property
  def is_identity(self) -> bool:
    """True when no example can ever change: the batch is returned untouched."""
    return (not self.enabled or self.prob == 0.0 or
            not (self.flip or self.geometric or self.color_jitter > 0))


class AugmentDraws(NamedTuple):
  """One example's random transform, with the gates already applied (off = neutral value)."""
  flip: jax.Array          # bool
  angle: jax.Array         # radians, counter-clockwise as displayed
  scale: jax.Array         # isotropic factor
  tx: jax.Array            # horizontal shift in pixels
  brightness: jax.Array    # colour factors, 1 = unchanged
  contrast: jax.Array
  saturation: jax.Array


# ---- geometry ---------------------------------------------------------------------------------


def affine_matrix(angle_rad, scale, tx, ty=0.0, flip=False):
  """3x3 forward map of content positions in centred (x, y) pixel coordinates.

  Applies, in this order: horizontal flip, rotation by `angle_rad` (counter-clockwise as
  displayed), isotropic scaling, translation by (tx, ty) pixels. Output pixel p shows the input at
  inverse(matrix) @ p.
  """
  c, s = jnp.cos(angle_rad), jnp.sin(angle_rad)
  fx = jnp.where(flip, -1.0, 1.0)
  # With y pointing down, a counter-clockwise turn on screen is [[c, s], [-s, c]].
  return jnp.array([
      [scale * c * fx, scale * s, tx],
      [-scale * s * fx, scale * c, ty],
      [0.0, 0.0, 1.0],
  ], jnp.float32)


def _inverse_affine(matrix):
  """Closed-form inverse of the 2x3 part (cheaper than a general 3x3 solve under vmap)."""
  a, b, t0 = matrix[0, 0], matrix[0, 1], matrix[0, 2]
  c, d, t1 = matrix[1, 0], matrix[1, 1], matrix[1, 2]
  det = a * d - b * c
  ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
  return ia, ib, ic, id_, -(ia * t0 + ib * t1), -(ic * t0 + id_ * t1)


def _axis_taps(src, size):
  """Start index s in [0, size - 2] and the weights of samples s and s + 1 along one axis.

  Bilinear interpolation reads samples floor(src) and floor(src) + 1 with weights 1 - frac and
  frac; a sample outside [0, size) reads zero. Clamping the start keeps the 2-wide window inside
  the image, so each weight goes to the window slot that holds its sample, or is dropped when
  that sample lies outside (zero padding without a padded copy of the image).
  """
  lo = jnp.floor(src)
  frac = src - lo
  lo = lo.astype(jnp.int32)
  start = jnp.clip(lo, 0, size - 2)
  w0 = jnp.where(lo == start, 1.0 - frac, 0.0) + jnp.where(lo + 1 == start, frac, 0.0)
  w1 = jnp.where(lo == start + 1, 1.0 - frac, 0.0) + jnp.where(lo + 1 == start + 1, frac, 0.0)
  return start, w0, w1


def apply_affine(image, matrix):
  """Bilinear resampling of one [H, W, C] image by the forward `matrix` (see `affine_matrix`).

  One gather of a 2x2xC window per output pixel (contiguous reads, fused with the weighting by
  XLA); samples outside the image count as zeros. An exactly integer map (identity, flips, integer
  shifts) reproduces the pixels exactly.
  """
  h, w, ch = image.shape
  if h < 2 or w < 2:
    raise ValueError(f'apply_affine: image must be at least 2x2, got shape {image.shape}')
  ia, ib, ic, id_, ox, oy = _inverse_affine(matrix.astype(jnp.float32))
  cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
  x = jnp.arange(w, dtype=jnp.float32)[None, :] - cx
  y = jnp.arange(h, dtype=jnp.float32)[:, None] - cy
  col, wx0, wx1 = _axis_taps(ia * x + ib * y + ox + cx, w)   # [H, W] each
  row, wy0, wy1 = _axis_taps(ic * x + id_ * y + oy + cy, h)
  starts = jnp.stack([row, col], axis=-1).reshape(h * w, 2)
  dims = jax.lax.GatherDimensionNumbers(
      offset_dims=(1, 2, 3), collapsed_slice_dims=(), start_index_map=(0, 1))
  # Starts are clamped above, so XLA may skip its own bounds handling.
  win = jax.lax.gather(image, starts, dims, slice_sizes=(2, 2, ch),
                       mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  win = win.reshape(h, w, 2, 2, ch).astype(jnp.float32)
  top = wx0[..., None] * win[:, :, 0, 0] + wx1[..., None] * win[:, :, 0, 1]
  bottom = wx0[..., None] * win[:, :, 1, 0] + wx1[..., None] * win[:, :, 1, 1]
  out = wy0[..., None] * top + wy1[..., None] * bottom
  return out.astype(image.dtype)


def hflip(image):
  """Mirrors one [H, W, C] image left-right."""
  return image[:, ::-1, :]


# ---- colour (torchvision ColorJitter semantics, float images in [0, 1]) ------------------------


def rgb_to_grayscale(image):
  """[H, W, 3] -> [H, W, 1] luma, torchvision weights."""
  r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  return _GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b


def _blend(image, other, factor):
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
  """clip(factor * image): a blend with black."""
  return jnp.clip(factor * image, 0.0, 1.0)


def adjust_contrast(image, factor):
  """Blend with the image's mean grey level (one scalar per image)."""
  # The mean of the grey image equals the grey of the channel means (both are linear).
  mean = rgb_to_grayscale(jnp.mean(image, axis=(0, 1)))
  return _blend(image, mean, factor)


def adjust_saturation(image, factor):
  """Blend with the per-pixel grayscale image."""
  return _blend(image, rgb_to_grayscale(image), factor)


# ---- random draws -----------------------------------------------------------------------------


def sample_draws(rng, params: AugmentParams, width: int) -> AugmentDraws:
  """Draws one example's transform; gated-off or disabled ops get their neutral value.

  All eleven numbers come from one uniform draw (one threefry call per example instead of one
  per op): 5 gates, angle, scale, shift, 3 colour factors.
  """
  u = jax.random.uniform(rng, (11,))
  gate = u[:5] < params.prob

  def between(lo, hi, v):
    return lo + (hi - lo) * v

  max_angle = math.radians(params.rotate)
  max_tx = params.translate * width
  cj = params.color_jitter
  colors = between(max(0.0, 1.0 - cj), 1.0 + cj, u[8:11])
  colors = jnp.where(gate[4] & (cj > 0), colors, 1.0)
  return AugmentDraws(
      flip=gate[0] & params.flip,
      angle=jnp.where(gate[1] & (params.rotate > 0), between(-max_angle, max_angle, u[5]), 0.0),
      scale=jnp.where(gate[2] & (params.scale != (1.0, 1.0)), between(*params.scale, u[6]), 1.0),
      tx=jnp.where(gate[3] & (params.translate > 0), between(-max_tx, max_tx, u[7]), 0.0),
      brightness=colors[0], contrast=colors[1], saturation=colors[2])


def apply_draws(image, draws: AugmentDraws, params: AugmentParams):
  """Applies one example's draws to one [H, W, 3] image: geometry, then colour."""
  dtype = image.dtype
  x = image.astype(jnp.float32)
  if params.geometric:
    matrix = affine_matrix(draws.angle, draws.scale, draws.tx, 0.0, draws.flip)
    # Bilinear weights may sum to 1 + 1 ulp; keep the [0, 1] promise.
    x = jnp.clip(apply_affine(x, matrix), 0.0, 1.0)
  elif params.flip:
    x = jnp.where(draws.flip, hflip(x), x)
  if params.color_jitter > 0:
    # A factor of exactly 1 (gate off) leaves every value bit-identical.
    x = adjust_brightness(x, draws.brightness)
    x = adjust_contrast(x, draws.contrast)
    x = adjust_saturation(x, draws.saturation)
  return x.astype(dtype)


# ---- public entry points ----------------------------------------------------------------------


def _check_images(images, rank):
  kind = 'image' if rank == 3 else 'batch'
  if images.ndim != rank or images.shape[-1] != 3:
    want = '[H, W, 3]' if rank == 3 else '[B, H, W, 3]'
    raise ValueError(f'augment: {kind} must have shape {want} (RGB, NHWC), got {images.shape}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f'augment: {kind} dtype is {images.dtype}; convert to float in [0, 1] '
                    '(x / 255) before augmenting')


def augment_image(rng, image, params: AugmentParams):
  """Augments one [H, W, 3] float image in [0, 1]; the same key gives the same output."""
  _check_images(image, 3)
  if params.is_identity:
    return image
  return apply_draws(image, sample_draws(rng, params, image.shape[1]), params)


def augment_batch(rng, images, params: AugmentParams):
  """Augments a [B, H, W, 3] batch; example i uses key jax.random.split(rng, B)[i].

  Pure and shape-preserving: works inside jit and with the batch sharded on its leading axis
  (each example's work is independent, so no communication is needed).
  """
  _check_images(images, 4)
  if params.is_identity:
    return images
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda k, x: augment_image(k, x, params))(keys, images)
