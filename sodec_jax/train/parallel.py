"""Many devices and hosts: multi-host start-up, the device Mesh ('data', optionally 'fsdp'),
the shardings of the batch, the parameters and the optimizer state, and placing host values
as global arrays on them.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sodec_jax.errors import SodecError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
_DISTRIBUTED = []  # set once jax.distributed is initialized (a pipeline calls train() per stage)


def init_distributed(config) -> bool:
  """Multi-host: jax.distributed.initialize() from config.distributed, else the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); neither set: one process.
  Must run before anything touches a JAX device; returns whether this is a multi-process run."""
  if _DISTRIBUTED:
    return True
  d = config.get("distributed") or ml_collections.ConfigDict()
  addr = d.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not addr:
    return False
  n = int(d.get("num_processes", 0) or os.environ.get("JAX_NUM_PROCESSES", 0))
  pid = int(d.get("process_id", -1))
  pid = pid if pid >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
  if n < 1 or not 0 <= pid < n:
    raise SodecError(
      f"multi-host training at {addr} needs the process count and this process's "
      "id: --config.distributed.num_processes=N --config.distributed.process_id=I "
      "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
    )
  jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
  _DISTRIBUTED.append((addr, n, pid))
  return True


def place(tree, sharding):
  """Host values -> global arrays with `sharding` (one, or a tree of them like `tree`), on every
  device of every process."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, sh: _from_host(np.asarray(x), sh), tree, sharding)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """A Mesh over all devices: axis 'data', or ('data', 'fsdp') when config.train.fsdp > 1
  (parameters and optimizer state sharded over 'fsdp', see param_sharding). The batch is split
  over every device either way: config.data.batch_size is the global batch and each device
  gets batch_size / device count of it (a SodecError when that does not divide)."""
  devices = jax.devices() if devices is None else list(devices)
  n, b = len(devices), int(config.data.batch_size)
  f = int(config.train.get("fsdp", 1))
  if f < 1 or n % f:
    raise SodecError(f"config.train.fsdp={f} must be >= 1 and divide the {n} devices")
  if b % n:
    raise SodecError(
      f"config.data.batch_size={b} is the global batch and must divide over the {n} devices "
      f"(per-device batch = global batch / device count): use a multiple of {n}, e.g. "
      f"--config.data.batch_size={max(n, b // n * n)}"
    )
  if f == 1:
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))
  return jax.sharding.Mesh(np.asarray(devices).reshape(n // f, f), (DATA_AXIS, FSDP_AXIS))


def shardings(mesh: jax.sharding.Mesh):
  """(replicated, batch) NamedShardings: the step (and, without 'fsdp', params, optimizer state
  and constants) replicated on every device; a batch split over all devices on its leading axis."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P(tuple(mesh.axis_names)))


def param_sharding(mesh: jax.sharding.Mesh, tree):
  """A tree of NamedShardings like `tree`: with an 'fsdp' axis each array is split over it along
  its largest dimension that divides evenly (arrays with none stay replicated); else replicated."""
  f = dict(mesh.shape).get(FSDP_AXIS, 1)

  def one(x):
    shape = np.shape(x)
    dims = [i for i in np.argsort(shape)[::-1] if shape[i] >= f and shape[i] % f == 0]
    if f == 1 or not dims:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[int(dims[0])] = FSDP_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(one, tree)


def _from_host(v: np.ndarray, sharding):
  """A global array with `sharding` whose every shard is read from the host value `v`."""
  return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])
