r"""Teacher only: VGG16 trained with cross-entropy at full resolution (10x, factor 1).

  python -m camkd_jax.main --config configs/teacher.py
  python -m camkd_jax.main --config configs/teacher.py:dataset=sicapv2,data_dir=/data/sicapv2

The exported teacher (workdirs/teacher/teacher) can then be shared by every student config:
  --config.teacher.checkpoint=workdirs/teacher/teacher
"""
from configs import base


def get_config(arg=None):
  config = base.base_config(arg)
  config.method = 'teacher'
  return config
