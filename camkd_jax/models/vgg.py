"""VGG16 in Flax with the reference's five-block split.

block1 = conv64, relu, conv64, relu, maxpool      (torchvision features.0 .. features.4)
block2 = conv128 x2 (+relu), maxpool              (features.5 .. features.9)
block3 = conv256 x3 (+relu), maxpool              (features.10 .. features.16)
block4 = conv512 x3 (+relu), maxpool              (features.17 .. features.23)
block5 = conv512, relu, conv512, relu, conv512    (features.24 .. features.28, no final ReLU/pool)
then global average pooling and a Dense head (`classifier`).

Convolutions are named `features_N` with N the torchvision index, so a torchvision state dict maps one
to one onto the Flax tree (see camkd_jax/weights.py). The module can run any contiguous range of blocks
(`start`/`stop`), which is what Grad-CAM needs: the activation at a block is an input of the tail.
"""
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

BLOCKS = ('block1', 'block2', 'block3', 'block4', 'block5')
# Four 2x2 max-pools before block5: an input under 16 px leaves no block5 map.
MIN_INPUT_SIZE = 16
# Output channels of the convolutions of each block (VGG16 configuration "D").
VGG16_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def torchvision_indices(channels=VGG16_CHANNELS):
  """Torchvision `features.N` index of every conv, as a tuple of tuples per block."""
  out, index = [], 0
  for block in channels:
    idx = []
    for _ in block:
      idx.append(index)
      index += 2  # conv, relu
    index += 1  # maxpool (the last block's pool position is unused)
    out.append(tuple(idx))
  return tuple(out)


def layer_order(name):
  """Position of an activation name in the forward order ('input' first, 'logits' last)."""
  order = ('input',) + BLOCKS + ('pooled', 'logits')
  if name not in order:
    raise ValueError(f'unknown activation {name!r}; known: {list(order)}')
  return order.index(name)


# torchvision's VGG initialisation: Kaiming-normal (fan_out, ReLU gain) convs, zero biases and
# N(0, 0.01) linear weights. Flax's default (LeCun, fan_in) halves the signal's variance at each
# ReLU, and 13 convs without batch norm then start from near-constant logits that Adam 1e-4 on
# [0, 1] inputs does not escape for several epochs.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, as reshape + max. Same values as nn.max_pool; its gradient is
  element-wise work instead of XLA's select-and-scatter (measured 22 % less CPU per distillation
  step at width 0.125 / 64 px). Ties split the gradient; after a ReLU they only occur at zeros,
  where the ReLU's gradient is zero anyway."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class VGG(nn.Module):
  """VGG with a GAP + Dense head. Returns `(logits, activations)`.

  Attributes:
    num_classes: outputs of the Dense head.
    width: channel multiplier (1.0 = VGG16; 0.125 gives 8..64 channels for CPU demos).
    dtype: activation/compute dtype; parameters are always float32.
  """
  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32
  channels: Sequence[Sequence[int]] = VGG16_CHANNELS
  # Optional per-channel input standardisation (x - mean) / std of the [0, 1] images. The reference
  # uses none (ImageNet-pretrained weights cope with x / 255); from random initialisation on
  # low-contrast H&E-like images, training stalls at chance without it.
  input_mean: Optional[Sequence[float]] = None
  input_std: Optional[Sequence[float]] = None

  def setup(self):
    for block, indices in zip(self.channels, torchvision_indices(self.channels)):
      for ch, idx in zip(block, indices):
        setattr(self, f'features_{idx}', nn.Conv(
            max(1, int(round(ch * self.width))), (3, 3), padding=1, dtype=self.dtype,
            param_dtype=jnp.float32, kernel_init=CONV_INIT, name=None))
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                               kernel_init=nn.initializers.normal(0.01))

  def _block(self, b, x):
    indices = torchvision_indices(self.channels)[b]
    last_block = b == len(self.channels) - 1
    for j, idx in enumerate(indices):
      x = getattr(self, f'features_{idx}')(x)
      if not (last_block and j == len(indices) - 1):
        x = nn.relu(x)
    if not last_block:
      x = max_pool_2x2(x)
    return x

  def __call__(self, x, start: str = 'input', stop: Optional[str] = None,
               perturb: Optional[Mapping[str, Any]] = None):
    """Runs the network from activation `start` (x is that activation) up to `stop`.

    Args:
      x: images in [0, 1] (NHWC) when start == 'input', else the activation named `start`.
      start: activation x stands for ('input' or 'block1'..'block5').
      stop: last activation to compute; None runs to the logits.
      perturb: optional {name: array} added to the named activations. With zeros this is the
        identity; differentiating with respect to it gives d(output)/d(activation), which is how
        several Grad-CAM layers share one forward and one backward pass.
    Returns:
      (logits or None if stopped early, dict of the activations computed, including `start`).
    """
    perturb = perturb or {}
    acts = {start: x}
    if start == 'input' and self.input_mean is not None:
      x = (x - jnp.asarray(self.input_mean, x.dtype)) / jnp.asarray(self.input_std, x.dtype)
    x = x.astype(self.dtype)
    first = layer_order(start)  # blocks after `start` run
    stop_at = layer_order(stop) if stop is not None else layer_order('logits')
    for b, name in enumerate(BLOCKS):
      pos = b + 1
      if pos <= first:
        continue
      if pos > stop_at:
        return None, acts
      x = self._block(b, x)
      if name in perturb:
        x = x + perturb[name].astype(x.dtype)
      acts[name] = x
    if stop_at < layer_order('pooled'):
      return None, acts
    pooled = jnp.mean(x.astype(self.out_dtype), axis=(1, 2))
    acts['pooled'] = pooled
    if stop_at < layer_order('logits'):
      return None, acts
    logits = self.classifier(pooled.astype(self.dtype)).astype(self.out_dtype)
    return logits, acts

  def head(self, pooled):
    """The classifier alone (used by the SR term: teacher head on student features)."""
    return self.classifier(pooled.astype(self.dtype)).astype(self.out_dtype)

  @property
  def out_dtype(self):
    """Pooled features and logits: at least float32 (float64 when the model computes in it)."""
    return jnp.promote_types(self.dtype, jnp.float32)
