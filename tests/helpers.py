"""Helpers shared by several test files: smoke configs, JSON, encoded images, spreadsheets."""
import io
import json
import os

import numpy as np
from PIL import Image

from configs import attn_kd
from configs import base as base_config


def set_fields(config, **overrides):
  """Sets dotted-key fields, e.g. **{'loss.at': 5.0}; returns the config."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config


def smoke_config(**overrides):
  """configs/attn_kd.py:smoke=1 with dotted-key overrides, e.g. **{'loss.at': 5.0}."""
  return set_fields(attn_kd.get_config('smoke=1'), **overrides)


def load_json(path):
  with open(path) as f:
    return json.load(f)


def data_config(**data):
  c = base_config.base_config('smoke=1')
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def png_bytes(arr):
  b = io.BytesIO()
  Image.fromarray(arr).save(b, 'PNG')
  return b.getvalue()


def decode_image(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def write_xlsx(path, rows, header=('image_name', 'NC', 'G3', 'G4', 'G5', 'G4C')):
  import openpyxl  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  wb = openpyxl.Workbook()
  ws = wb.active
  ws.append(list(header))
  for r in rows:
    ws.append(list(r))
  wb.save(path)


def random_image(seed, size=12):
  return np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype(np.uint8)
