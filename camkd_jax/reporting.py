"""What a run leaves for people: TensorBoard scalars, the Grad-CAM figure, the results table.

`EventWriter` writes TensorBoard event files directly (TFRecord framing + the Event protobuf, both
hand-encoded, ~60 lines). Why not clu.metric_writers: clu's writer needs the `tensorboard` Python
package (and TensorFlow), which this environment and the GPU machines lack; the interface here
(`write_scalars(step, scalars)`, `flush()`, `close()`) is clu's, so swapping back is one line.
"""
import os
import socket
import struct
import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np


# ----------------------------------------------------------------------------- TensorBoard events
def _crc32c_table():
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    bits, value = value & 0x7F, value >> 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  key = _varint(number << 3 | wire_type)
  if wire_type == 2:  # length-delimited
    return key + _varint(len(payload)) + payload
  return key + payload


def _event(step: int, wall_time: float, summary_values=None, file_version=None) -> bytes:
  """Serialized tensorflow.Event: wall_time=1 (double), step=2, file_version=3, summary=5."""
  msg = _field(1, 1, struct.pack('<d', wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _field(3, 2, file_version.encode())
  if summary_values:
    values = b''.join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack('<f', value)))
        for tag, value in summary_values)  # Summary.Value: tag=1, simple_value=2
    msg += _field(5, 2, values)
  return msg


def _record(data: bytes) -> bytes:
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked_crc(length)) + data
          + struct.pack('<I', _masked_crc(data)))


class EventWriter:
  """Scalars to a TensorBoard event file in `logdir` (same interface as clu's MetricWriter)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}'
            f'.camkd_jax')
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'ab')
    self._file.write(_record(_event(0, time.time(), file_version='brain.Event:2')))
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    values = [(k, float(v)) for k, v in scalars.items()]
    self._file.write(_record(_event(int(step), time.time(), summary_values=values)))

  def flush(self):
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()


class NullWriter:
  """The writer of processes other than 0."""

  def write_scalars(self, step, scalars):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def make_writer(logdir: str, is_main: bool):
  return EventWriter(logdir) if is_main else NullWriter()


# ----------------------------------------------------------------------------- tables
def _fmt(x, digits=4):
  return '-' if x is None else f'{x:.{digits}f}'


def results_rows(runs: Mapping[str, Mapping]) -> List[List[str]]:
  """Rows (model, magnification, val bal.acc, val kappa, test bal.acc, test kappa, epoch)."""
  rows = []
  for label, r in runs.items():
    mag = f"{r.get('magnification', 10.0):g}x"
    rows.append([label, mag, _fmt(r['val'].get('balanced_accuracy')), _fmt(r['val'].get('kappa')),
                 _fmt(r['test'].get('balanced_accuracy')), _fmt(r['test'].get('kappa')),
                 str(r.get('epoch', '-'))])
  return rows


def summary_rows(summary: Mapping[str, Mapping], magnifications: Mapping[str, float]):
  """Mean +- std rows from metrics.json's `summary`."""
  rows = []
  for model, s in summary.items():
    cell = lambda split, key: (f"{s[split][key + '_mean']:.4f} ± {s[split][key + '_std']:.4f}"
                               if key + '_mean' in s.get(split, {}) else '-')
    rows.append([f'{model} (mean ± std)', f'{magnifications.get(model, 10.0):g}x',
                 cell('val', 'balanced_accuracy'), cell('val', 'kappa'),
                 cell('test', 'balanced_accuracy'), cell('test', 'kappa'), '-'])
  return rows


HEADER = ['model', 'magnification', 'val bal. acc.', 'val kappa', 'test bal. acc.',
          'test kappa', 'best epoch']


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def text_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
  """Fixed-width table for the console."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  fmt = lambda r: '  '.join(str(c).ljust(w) for c, w in zip(r, widths))
  return '\n'.join([fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows])


# ----------------------------------------------------------------------------- Grad-CAM figure
def save_gradcam_figure(path: str, images: np.ndarray, labels: np.ndarray,
                        class_names: Sequence[str], columns: Sequence[Mapping]):
  """PNG with one row per image: the image, then for each model its input view and Grad-CAM map.

  images: uint8 (N, H, W, 3); columns: dicts with 'title', 'view' (N, H, W, 3) in [0, 1],
  'maps' (N, h, w) Grad-CAM of the true class, 'probs' (N, C).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n = len(images)
  ncols = 1 + 2 * len(columns)
  fig, axes = plt.subplots(n, ncols, figsize=(2.0 * ncols, 2.1 * n), squeeze=False)
  size = images.shape[1]
  for i in range(n):
    label = int(labels[i])
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(f'true {class_names[label]}', fontsize=8)
    for j, col in enumerate(columns):
      view_ax, cam_ax = axes[i, 1 + 2 * j], axes[i, 2 + 2 * j]
      view_ax.imshow(np.clip(col['view'][i], 0, 1))
      view_ax.set_title(f"{col['title']} input", fontsize=8)
      cam = np.asarray(col['maps'][i], np.float64)
      span = cam.max() - cam.min()
      cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
      cam_ax.imshow(images[i])
      cam_ax.imshow(cam, cmap='jet', alpha=0.5, interpolation='bilinear',
                    extent=(-0.5, size - 0.5, size - 0.5, -0.5))
      cam_ax.set_title(f"{col['title']} CAM p={float(col['probs'][i][label]):.2f}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def format_duration(seconds: Optional[float]) -> str:
  if seconds is None or not np.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def format_losses(losses: Dict[str, float]) -> str:
  """'loss 0.812 (ce 0.610, fm 0.120)' from {'loss/total': .., 'loss/ce': ..}."""
  terms = [(k.split('/', 1)[1], v) for k, v in losses.items()
           if k.startswith('loss/') and k != 'loss/total']
  total = losses.get('loss/total', float('nan'))
  inner = ', '.join(f'{k} {v:.3f}' for k, v in terms)
  return f'loss {total:.4f}' + (f' ({inner})' if len(terms) > 1 else '')
