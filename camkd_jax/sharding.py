"""The device mesh and how arrays are placed on it: one `data` axis, batches sharded along it,
everything else (parameters, optimiser state) replicated.

Works the same on one CPU, one GPU and many hosts: batches are given as each process's local
slice and assembled into global arrays; `to_host` gathers a global array on every process.
"""
from typing import Dict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with a `data` axis over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size'):
  """The global batch must split evenly over the devices of the data axis."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(
        f'{what}={batch_size} is not divisible by the number of devices ({n}); '
        f'choose a multiple of {n} (e.g. {max(n, batch_size // n * n)}).')


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, P())


def shard_batch(batch: Dict[str, np.ndarray], mesh: Mesh):
  """Process-local numpy batch -> global arrays sharded on the leading axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh):
  """Places a host pytree replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x):
  """Global (possibly multi-process sharded) array -> full numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_value(x) -> np.ndarray:
  """A replicated array as numpy (works on every process, multi-host included)."""
  return np.asarray(x.addressable_data(0))


def host_scalar(x) -> int:
  return int(host_value(x))


def host_tree(tree):
  """A replicated pytree as numpy arrays (process-local copy)."""
  return jax.tree_util.tree_map(host_value, tree)
