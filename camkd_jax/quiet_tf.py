"""Quiet TensorFlow start-up; imported (first) by every module of ours that imports TensorFlow.

TensorFlow prints its oneDNN notice ("oneDNN custom operations are on ...") and CPU-feature lines
when it is imported. Both variables must be set before that import: TF_CPP_MIN_LOG_LEVEL=1 drops
its INFO lines (warnings and errors stay), TF_ENABLE_ONEDNN_OPTS=0 turns the oneDNN custom
operations off (TensorFlow only decodes and resizes images here; the models run in JAX).
Values the user set in the environment are kept.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
