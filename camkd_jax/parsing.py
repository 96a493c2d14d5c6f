"""The comma-separated lists of flags and config keys, split one way everywhere.

  split_list('NC=benign, G3=3,,')  -> ['NC=benign', 'G3=3']

No JAX or TensorFlow here: importable from anywhere.
"""
from typing import List


def split_list(text) -> List[str]:
  """The comma-separated items of `text` (str() of it), each stripped, empty ones dropped."""
  return [item.strip() for item in str(text).split(',') if item.strip()]
