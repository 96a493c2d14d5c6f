"""Model registry: `get_model(name, num_classes, width, dtype)`."""
import jax.numpy as jnp

from camkd_jax.models import vgg

_REGISTRY = {
    'vgg16': lambda num_classes, width, dtype, **kw: vgg.VGG(num_classes, width=width,
                                                            dtype=dtype, **kw),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def register_model(name, factory):
  """Adds `factory(num_classes, width, dtype, input_mean=None, input_std=None) -> Module`."""
  _REGISTRY[name] = factory


def get_model(name, num_classes, width=1.0, dtype='float32', input_mean=None, input_std=None):
  """Builds a registered model; unknown names and dtypes fail listing the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown model {name!r}; known: {sorted(_REGISTRY)}')
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f'unknown dtype {dtype!r}; known: {sorted(DTYPES)}')
    dtype = DTYPES[dtype]
  if (input_mean is None) != (input_std is None) or (
      input_mean is not None and not len(input_mean) == len(input_std) == 3):
    raise ValueError(f'input_mean {input_mean} and input_std {input_std} must both be given, '
                     'with 3 values each (RGB), or both be empty')
  norm = {} if input_mean is None else dict(input_mean=tuple(map(float, input_mean)),
                                            input_std=tuple(map(float, input_std)))
  return _REGISTRY[name](num_classes, width, dtype, **norm)


def from_config(model_cfg, num_classes):
  """Model from a `config.model` ConfigDict."""
  mean = tuple(model_cfg.get('input_mean', ())) or None
  std = tuple(model_cfg.get('input_std', ())) or None
  return get_model(model_cfg.name, num_classes, model_cfg.width, model_cfg.dtype, mean, std)
