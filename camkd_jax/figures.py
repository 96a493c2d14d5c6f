"""The run's figure: validation images with each model's input view and Grad-CAM map.

  save_figure(path, columns, data, num_images, base_magnification)   figures/gradcam.png
"""
from typing import Tuple

import jax.numpy as jnp
import numpy as np

from camkd_jax import distill
from camkd_jax import ops
from camkd_jax import reporting
from camkd_jax import sharding


def figure_examples(data, num_images: int) -> Tuple[np.ndarray, np.ndarray]:
  """(images, labels) of up to `num_images` validation examples, one class after another (round
  robin over the classes, first examples first); reads batches only until every class has its
  share or the split ends."""
  per_class = -(-num_images // max(data.num_classes, 1))
  picked = {c: [] for c in range(data.num_classes)}
  for batch in data.eval_batches('validation'):
    for i in np.flatnonzero(batch['mask']):
      c = int(batch['label'][i])
      if len(picked[c]) < per_class:
        picked[c].append(np.asarray(batch['image'][i]))
    if all(len(v) >= per_class for v in picked.values()):
      break
  order = [(c, picked[c][k]) for k in range(per_class) for c in picked if k < len(picked[c])]
  order = order[:num_images]
  return (np.stack([im for _, im in order]),
          np.asarray([c for c, _ in order], np.int32))


def save_figure(path, columns, data, num_images, base_magnification):
  """Validation images across the classes with each model's input view and Grad-CAM map of the
  true class; a column of factor f > 1 is titled with its magnification, base_magnification / f,
  and shows its map over the image it saw as well as over the full-resolution image."""
  images, labels = figure_examples(data, num_images)
  cols = []
  for title, model, params, factor, view_name in columns:
    cam = distill.make_cam_step(model, factor, view=view_name)
    maps, probs = cam(sharding.host_tree(params), images, labels)
    view = ops.student_view(jnp.asarray(images, jnp.float32) / 255.0, factor, view_name)
    cols.append({'title': f'{title} ({base_magnification / factor:g}x)' if factor > 1 else title,
                 'view': np.asarray(view), 'maps': np.asarray(maps), 'probs': np.asarray(probs),
                 'on_view': factor > 1})
  reporting.save_gradcam_figure(path, images, labels, data.class_names, cols)
