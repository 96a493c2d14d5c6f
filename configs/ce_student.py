r"""Student without distillation (lower bound): cross-entropy only at the student magnification.

  python -m camkd_jax.main --config configs/ce_student.py
  python -m camkd_jax.main --config configs/ce_student.py:magnification=1.25

A teacher is still trained (or loaded) first, so the run reports both rows of the table.
"""
from configs import base


def get_config(arg=None):
  config = base.base_config(arg)
  config.method = 'ce'
  config.loss.ce = 1.0
  return config
