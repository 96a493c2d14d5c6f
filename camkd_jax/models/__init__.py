"""Model registry: `get_model(name, num_classes, width, dtype)`."""
import jax.numpy as jnp

from camkd_jax.models import vgg

_REGISTRY = {
    'vgg16': lambda num_classes, width, dtype: vgg.VGG(num_classes, width=width, dtype=dtype),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def register_model(name, factory):
  """Adds `factory(num_classes, width, dtype) -> flax Module` under `name`."""
  _REGISTRY[name] = factory


def get_model(name, num_classes, width=1.0, dtype='float32'):
  """Builds a registered model; unknown names and dtypes fail listing the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown model {name!r}; known: {sorted(_REGISTRY)}')
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f'unknown dtype {dtype!r}; known: {sorted(DTYPES)}')
    dtype = DTYPES[dtype]
  return _REGISTRY[name](num_classes, width, dtype)


def from_config(model_cfg, num_classes):
  """Model from a `config.model` ConfigDict."""
  return get_model(model_cfg.name, num_classes, model_cfg.width, model_cfg.dtype)
