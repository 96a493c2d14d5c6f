"""camkd_jax: attention-guided inter-resolution knowledge distillation in JAX/Flax."""

__version__ = '0.1.0'
