"""The pictures of a slide's predictions (camkd_jax/slide_outputs.py writes them with the rest).

  heatmap.png  one panel of P(class) per class on the tile grid, and the predicted class;
  overlay.png  the predicted class over the slide's thumbnail.

Both are in level-0 pixels: grid cell (row, col) is centred on its tile. matplotlib is imported
only when a picture is drawn (Agg backend).
"""
import os

import numpy as np

from camkd_jax import runs

CLASS_COLOURS = ('#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02', '#a6761d',
                 '#666666', '#1f78b4', '#b2df8a')


def probability_grids(plan, probs) -> np.ndarray:
  """(C, rows, cols) probabilities on the tile grid, NaN where no tissue tile was predicted."""
  grids = np.full((probs.shape[1],) + tuple(plan.grid_shape), np.nan, np.float32)
  grids[:, plan.grid[:, 0], plan.grid[:, 1]] = probs.T
  return grids


def _extent(plan):
  """imshow extent (level-0 pixels) of the tile grid: cell (r, c) centred on its tile."""
  s0 = plan.s0
  off = (plan.tile - plan.stride) * s0 / 2
  rows, cols = plan.grid_shape
  return (off, off + cols * plan.stride * s0, off + rows * plan.stride * s0, off)


def _class_map(plan, probs):
  grids = probability_grids(plan, probs)
  valid = ~np.isnan(grids[0])
  cls = np.where(valid, np.nan_to_num(grids, nan=-1).argmax(0), -1).astype(float)
  return np.where(valid, cls, np.nan)


def save_heatmaps(path, plan, probs, class_names):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  c = len(class_names)
  grids = probability_grids(plan, probs)
  fig, axes = plt.subplots(1, c + 1, figsize=(3.2 * (c + 1), 3.4), squeeze=False)
  for i, name in enumerate(class_names):
    ax = axes[0, i]
    im = ax.imshow(grids[i], vmin=0, vmax=1, cmap='magma', interpolation='nearest',
                   extent=_extent(plan))
    ax.set_title(f'P({name})')
  fig.colorbar(im, ax=axes[0, :c].tolist(), shrink=0.8)
  cmap = colors.ListedColormap(CLASS_COLOURS[:c])
  axes[0, c].imshow(_class_map(plan, probs), cmap=cmap, vmin=-0.5, vmax=c - 0.5,
                    interpolation='nearest', extent=_extent(plan))
  axes[0, c].set_title('predicted class')
  _legend(axes[0, c], class_names)
  for ax in axes[0]:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(os.path.basename(plan.path), fontsize=9)
  runs.atomic_write(path, lambda f: fig.savefig(f, dpi=100, format='png'), mode='wb')
  plt.close(fig)


def _legend(ax, class_names):
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  ax.legend(handles=[Patch(color=CLASS_COLOURS[i], label=n) for i, n in enumerate(class_names)],
            loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)


def save_overlay(path, plan, probs, class_names):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  c = len(class_names)
  w, h = plan.dimensions
  fig, ax = plt.subplots(figsize=(7, 7 * h / max(w, 1) + 0.5))
  ax.imshow(plan.thumbnail, extent=(0, w, h, 0))
  ax.imshow(_class_map(plan, probs), cmap=colors.ListedColormap(CLASS_COLOURS[:c]),
            vmin=-0.5, vmax=c - 0.5, alpha=0.45, interpolation='nearest', extent=_extent(plan))
  ax.set_xlim(0, w)
  ax.set_ylim(h, 0)
  ax.set_axis_off()
  _legend(ax, class_names)
  ax.set_title(os.path.basename(plan.path), fontsize=9)
  runs.atomic_write(path, lambda f: fig.savefig(f, dpi=100, bbox_inches='tight', format='png'),
                    mode='wb')
  plt.close(fig)
