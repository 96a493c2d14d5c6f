r"""Feature matching: CE + FM on block5 (a_fm = 0.1).

  python -m camkd_jax.main --config configs/fm.py
  python -m camkd_jax.main --config configs/fm.py:magnification=1.25
"""
from configs import base


def get_config(arg=None):
  config = base.base_config(arg)
  config.method = 'fm'
  config.loss.ce = 1.0
  config.loss.fm = 0.1
  return config
