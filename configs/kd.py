r"""Soft-label distillation: CE + KD (a_kd = 1, T = 1, the reference's form).

  python -m camkd_jax.main --config configs/kd.py
  python -m camkd_jax.main --config configs/kd.py:magnification=1.25 --config.loss.kd_form=hinton
"""
from configs import base


def get_config(arg=None):
  config = base.base_config(arg)
  config.method = 'kd'
  config.loss.ce = 1.0
  config.loss.kd = 1.0
  return config
