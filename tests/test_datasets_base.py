"""camkd_jax.datasets.base: full decoding flags truncated images."""
import numpy as np

from camkd_jax.datasets import base
from helpers import png_bytes
from helpers import random_image


def test_pil_check_flags_truncation():
  arr = random_image(1, 32)
  good = png_bytes(arr)
  assert base.check_image(good) is None
  assert 'truncated' in base.check_image(good[:len(good) // 2]).lower()
  np.testing.assert_array_equal(base.decode_with_pil(good), arr)
