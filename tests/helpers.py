"""Helpers shared by several test files: smoke configs, JSON, encoded images, spreadsheets."""
import io
import json
import os

import numpy as np
from PIL import Image

from configs import attn_kd
from configs import base as base_config


# Unoptimised XLA CPU code for every test program (conftest.py sets it for this process; tests
# that start processes with their own XLA_FLAGS pass xla_flags(devices)). The tiny test programs
# compile in about half the time and run as fast; numbers change only in the last bits, and
# tests that compare two runs give both the same flags.
FAST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def xla_flags(devices=None):
  """XLA_FLAGS of a test subprocess: FAST_XLA_FLAGS, with `devices` fake CPU devices if given."""
  count = f'--xla_force_host_platform_device_count={devices} ' if devices else ''
  return count + FAST_XLA_FLAGS


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


class FixedPredictionData:
  """Eval splits in batches of 4, padded like input_pipeline.Data.eval_batches: pixel [0, 0, 0] of
  each image is the class a fake model predicts. Padded rows (mask False) carry `pad_label` and
  predict `pad_pred`, so counting them would change the metrics. `splits`: split -> (labels,
  predictions); `slide_level` is passed on as the data's slide-level information."""

  def __init__(self, splits, num_classes, pad_label, pad_pred, slide_level=None):
    self.splits, self.num_classes, self.slide_level = splits, num_classes, slide_level
    self.pad_label, self.pad_pred = pad_label, pad_pred

  def eval_batches(self, split):
    labels, preds = (np.asarray(v) for v in self.splits[split])
    for start in range(0, len(labels), 4):
      lab, pred = labels[start:start + 4], preds[start:start + 4]
      pad = 4 - len(lab)
      image = np.zeros((4, 2, 2, 3), np.uint8)
      image[:, 0, 0, 0] = np.concatenate([pred, np.full(pad, self.pad_pred)])
      yield {'image': image,
             'label': np.concatenate([lab, np.full(pad, self.pad_label)]).astype(np.int32),
             'mask': np.arange(4) < len(lab)}
