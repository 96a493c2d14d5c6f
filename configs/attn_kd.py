r"""The paper's method: CE + FM (a_fm = 0.1) + AT+ Grad-CAM matching (a_at = 10) at 2.5x.

  python -m camkd_jax.main --config configs/attn_kd.py
  python -m camkd_jax.main --config configs/attn_kd.py:magnification=1.25,seeds=22,32,43
  python -m camkd_jax.main --config configs/attn_kd.py:dataset=sicapv2,data_dir=/data/sicapv2
  python -m camkd_jax.main --config configs/attn_kd.py:smoke=1      # seconds, for a quick check

Default workdir: workdirs/attn_kd_m<magnification> (override with --workdir).
"""
from configs import base


def get_config(arg=None):
  config = base.base_config(arg)
  config.method = 'attn_kd'
  config.loss.ce = 1.0
  config.loss.fm = 0.1
  config.loss.at = 10.0
  return config
