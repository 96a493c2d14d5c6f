"""Evaluation of a model on the validation and test splits, gathered from every process.

  evaluate(eval_step, params, data, mesh)     {'val': metrics, 'test': metrics}
  evaluate_model(model, params, factor, ...)  the same with the model's eval step built here
  predict(eval_step, params, data, split, mesh)  (labels, predicted classes) of one split

Metrics: balanced accuracy, quadratic kappa, accuracy and the confusion matrix
(camkd_jax.metrics), plus slide-level grades when the data has slide labels (reported, not
selected on).
"""
from typing import Dict, Tuple

import numpy as np

from camkd_jax import distill
from camkd_jax import metrics as metrics_lib
from camkd_jax import sharding


def predict(eval_step, params, data, split, mesh) -> Tuple[np.ndarray, np.ndarray]:
  """(labels, predicted classes) of every example of `split`, gathered from all processes."""
  logits, labels, masks = [], [], []
  for batch in data.eval_batches(split):
    g = sharding.shard_batch(batch, mesh)
    logits.append(eval_step(params, g['image']))
    labels.append(g['label'])
    masks.append(g['mask'])
  mask = np.concatenate([sharding.to_host(m) for m in masks]).astype(bool)
  preds = np.concatenate([np.argmax(sharding.to_host(x), axis=-1) for x in logits])
  labels = np.concatenate([sharding.to_host(y) for y in labels])
  return labels[mask], preds[mask]


def evaluate(eval_step, params, data, mesh) -> Dict[str, Dict]:
  """{'val': metrics, 'test': metrics} (balanced accuracy, kappa, accuracy, confusion)."""
  out = {}
  for key, split in (('val', 'validation'), ('test', 'test')):
    labels, preds = predict(eval_step, params, data, split, mesh)
    out[key] = metrics_lib.classification_metrics(labels, preds, data.num_classes)
    if getattr(data, 'slide_level', None) is not None:  # reported, not selected on
      out[key]['slide_level'] = data.slide_level.evaluate(split, preds, labels)
  return out


def evaluate_model(model, params, factor, data, mesh, view='upsampled'):
  return evaluate(distill.make_eval_step(model, factor, mesh, view), params, data, mesh)
