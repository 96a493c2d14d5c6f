"""Independent NumPy float64 references (loops and textbook formulas, no shared code)."""
import numpy as np


def bilinear_align_corners(x, out_h, out_w):
  """NHWC bilinear resize, align_corners=True, one output pixel at a time."""
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    sy = 0.0 if out_h == 1 else i * (h - 1) / (out_h - 1)
    y0 = min(int(np.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    fy = sy - y0
    for j in range(out_w):
      sx = 0.0 if out_w == 1 else j * (w - 1) / (out_w - 1)
      x0 = min(int(np.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      fx = sx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


def avg_pool(x, f):
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  out = np.zeros((b, h // f, w // f, c))
  for i in range(h // f):
    for j in range(w // f):
      out[:, i, j] = x[:, i * f:(i + 1) * f, j * f:(j + 1) * f].mean(axis=(1, 2))
  return out


def log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def cam_plus(a, w):
  """a (B,H,W,K), w (C,B,K) -> (B,H,W,C) = sum_k relu(w a), materialised."""
  prod = a[None] * w[:, :, None, None, :]          # (C,B,H,W,K)
  return np.maximum(prod, 0).sum(-1).transpose(1, 2, 3, 0)


def cam_classic(a, w):
  prod = a[None] * w[:, :, None, None, :]
  return np.maximum(prod.sum(-1), 0).transpose(1, 2, 3, 0)


def minmax(m):
  out = np.zeros_like(m, dtype=np.float64)
  for b in range(m.shape[0]):
    lo, hi = m[b].min(), m[b].max()
    out[b] = (m[b] - lo) / (hi - lo) if hi > lo else 0.0
  return out


def softmax_all(m, t):
  out = np.zeros_like(m, dtype=np.float64)
  for b in range(m.shape[0]):
    z = m[b] / t
    e = np.exp(z - z.max())
    out[b] = e / e.sum()
  return out
