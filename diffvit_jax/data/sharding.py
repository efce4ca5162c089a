"""Host batches -> globally sharded jax Arrays on a 1-D 'data' mesh (the one place it happens).

The mesh's axis type is `Auto`: jit propagates shardings itself (GSPMD), as
with pmap-era code, so model code needs no sharding annotations. jax >= 0.7's
`jax.make_mesh` defaults to `Explicit` axes, under which einsums and reshapes
of sharded arrays may demand `out_sharding=`; naming `Auto` keeps jax.jit +
NamedSharding working unchanged on jax 0.10 to 0.12.
"""

import collections
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffvit_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over all devices (of all processes), process by process.

  In that order `shard_batch` places process p's host batch at rows
  [p * b, (p + 1) * b) of the global batch, the block the input pipeline gives it.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def check_batch_split(config, num_devices: int, *, mode: str = "train") -> None:
  """ConfigError unless the global batches (and the train microbatches) split over the devices."""
  train = config.train
  for field in ("batch_size", "eval_batch_size"):
    if train[field] % num_devices:
      raise ConfigError(f"config.train.{field}: the global batch {train[field]} is not "
                        f"divisible by the {num_devices} devices; batch sizes in configs are "
                        "global.")
  per_device = train.batch_size // num_devices
  count = None if str(train.microbatches).strip() == "auto" else int(train.microbatches)
  if mode == "train" and count and per_device % count:
    raise ConfigError(f"config.train.microbatches: {count} does not divide the {per_device} "
                      f"examples each of the {num_devices} device(s) gets of "
                      f"train.batch_size={train.batch_size}.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(host_batch: Any, mesh: Mesh) -> Any:
  """This host's numpy batch -> global arrays of process_count x the host batch, split on 'data'."""
  sharding = batch_sharding(mesh)
  local_devices = len(mesh.local_devices)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % local_devices:
      raise ConfigError(f"A host batch of {x.shape[0]} examples cannot be split over this "
                        f"process's {local_devices} devices; make the global batch size a "
                        "multiple of the device count.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(put, host_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Values equal on every process -> global arrays replicated over the whole mesh."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


def prefetch_to_device(iterator: Iterator, mesh: Mesh, size: int = 2) -> "DevicePrefetchIterator":
  """Keeps `size` sharded batches in flight (transfers are asynchronous) ahead of the step."""
  return DevicePrefetchIterator(iterator, mesh, size)


class DevicePrefetchIterator(grain.DatasetIterator):
  """Sharded batches of a host iterator, read `size` ahead.

  Its state is the host iterator's state *before the next batch it will
  yield* (not the read-ahead position), so checkpointing this iterator (it is
  a grain DatasetIterator, usable with grain.checkpoint.CheckpointSave)
  resumes exactly at the first batch the step has not consumed.
  """

  def __init__(self, iterator: Iterator, mesh: Mesh, size: int = 2):
    is_grain = isinstance(iterator, grain.DatasetIterator)
    super().__init__(iterator if is_grain else ())
    self._host = iterator
    self._stateful = is_grain
    self._mesh = mesh
    self._size = max(1, size)
    self._queue = collections.deque()  # (host state before the batch, sharded batch)

  def _fill(self) -> None:
    while len(self._queue) < self._size:
      state = self._host.get_state() if self._stateful else None
      try:
        batch = next(self._host)
      except StopIteration:
        return
      self._queue.append((state, shard_batch(batch, self._mesh)))

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()[1]

  def get_state(self) -> dict:
    if not self._stateful:
      raise TypeError("The wrapped iterator has no grain state to save.")
    return self._queue[0][0] if self._queue else self._host.get_state()

  def set_state(self, state: dict) -> None:
    self._queue.clear()
    self._host.set_state(state)
