"""Data parallelism, pmap-style: one per-device program with collectives over the ``data`` axis.

The training step is written once, as the program one device runs on its shard of the global
batch. It is compiled in one of two equivalent ways:

* ``shard_map`` (default): ``jax.jit(jax.shard_map(step, mesh, ...))`` over a one-axis mesh; the
  state is replicated (``P()``), the batch split along its first axis (``P('data')``).
* ``pmap``: ``jax.pmap(step, axis_name='data')`` with the batch reshaped to [devices, per_device,
  ...] and the state broadcast (``in_axes=None``).

Gradient averaging. Inside ``shard_map`` a replicated parameter is *device-invariant*; JAX
transposes its implicit broadcast to the devices into a ``psum``, so ``jax.grad`` of a per-device
loss already returns the gradient *summed* over devices (checked on jax 0.10.2). A ``pmean`` of
that would scale every step by the device count. ``pmap`` of the same function does no such
thing. To make both modes mean the same, the step differentiates with respect to an explicitly
*per-device* copy of the parameters (`per_device`) and then averages with `mean_over_devices`: the
same code, the same numbers, in both modes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uagan_jax.errors import UserError

AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A one-axis ``data`` mesh over the first ``num_devices`` devices (0 = all).

  With several processes (`uagan_jax.distributed`) the mesh spans every process's devices,
  ordered by process, so that each process's part of a global batch is one block of rows
  (`process_rows`); ``num_devices`` must then be 0 or the global device count.
  """
  devices = jax.devices()
  if jax.process_count() > 1:
    if num_devices not in (0, len(devices)):
      raise UserError(f"config train.num_devices={num_devices}: with {jax.process_count()} "
                      f"processes every one of the {len(devices)} devices takes part; use 0")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  if num_devices > len(devices):
    raise UserError(f"config train.num_devices={num_devices}: only {len(devices)} "
                    f"{devices[0].platform} device(s) available")
  devices = devices[:num_devices] if num_devices else devices
  return Mesh(np.asarray(devices), (AXIS,))


def process_rows(mesh: Mesh, global_batch: int) -> slice:
  """The rows of a global batch of ``global_batch`` examples that this process's devices hold.

  All rows with one process; with several, one contiguous block each (the mesh is ordered by
  process), which is what this process loads and gives to `shard_batch`.
  """
  size = mesh.devices.size
  if global_batch % size:
    raise UserError(f"config train.batch_size={global_batch}: not divisible by the {size} "
                    "devices in use (over all processes); set the batch size or train.num_devices")
  indices = NamedSharding(mesh, P(AXIS)).addressable_devices_indices_map((global_batch,))
  starts = sorted(index[0].start or 0 for index in indices.values())
  per_device = global_batch // size
  if starts != list(range(starts[0], starts[0] + per_device * len(starts), per_device)):
    raise ValueError(f"this process's devices hold rows {starts} (not one block) of the batch")
  return slice(starts[0], starts[0] + per_device * len(starts))


def per_device(tree):
  """Marks replicated values as per-device so gradients taken with respect to them are not summed."""
  return jax.lax.pcast(tree, AXIS, to="varying")


def mean_over_devices(tree):
  return jax.lax.pmean(tree, AXIS)


def example_index(local_batch: int) -> jax.Array:
  """The global index of each local example, so per-example randomness ignores the device count."""
  return jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


def shard_batch(batch, mesh: Mesh):
  """Puts this process's rows of a batch on the mesh: the global batch, split along its first axis.

  With one process ``batch`` is the whole global batch; with several, each process passes its
  own rows (`process_rows`) and the global array is assembled from them
  (``jax.make_array_from_process_local_data``).
  """
  size = mesh.devices.size
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  sharding = NamedSharding(mesh, P(AXIS))
  placed = {}
  for name, value in batch.items():
    global_rows = value.shape[0] * size // local_devices
    if value.shape[0] % local_devices or global_rows % size:
      raise UserError(f"batch of {global_rows} ({name}) does not split evenly over {size} devices; "
                      "choose train.batch_size divisible by the device count")
    placed[name] = jax.make_array_from_process_local_data(
        sharding, value, (global_rows,) + value.shape[1:])
  return placed


def check_mode(mode: str) -> None:
  """Refuses ``pmap`` with several processes: its per-process device lists and host-side batch
  reshaping assume one process; ``shard_map`` computes the same numbers over every process."""
  if mode == "pmap" and jax.process_count() > 1:
    raise UserError(f"config train.parallel_mode=pmap: not supported with {jax.process_count()} "
                    "processes; use shard_map (the same numbers)")


def compile_step(step_fn: Callable, *, mesh: Mesh, mode: str = "shard_map",
                 donate: bool = True) -> Callable:
  """Compiles ``step_fn(state, batch, key) -> (state, metrics)`` for data parallelism.

  Args:
    step_fn: the per-device program; collectives use the axis name ``"data"``.
    mesh: the one-axis device mesh.
    mode: ``"shard_map"`` or ``"pmap"``.
    donate: donate the state's buffers to the output (the state is replaced every step).

  Returns:
    ``step(state, batch, key) -> (state, metrics)`` taking the *global* batch; in ``shard_map``
    mode the batch should be placed with `shard_batch`, in ``pmap`` mode a host batch is fine.
  """
  donate_argnums = (0,) if donate else ()
  if mode == "shard_map":
    mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()))
    return jax.jit(mapped, donate_argnums=donate_argnums)
  check_mode(mode)
  if mode == "pmap":
    devices = list(mesh.devices.flat)
    mapped = jax.pmap(step_fn, axis_name=AXIS, in_axes=(None, 0, None), out_axes=None,
                      devices=devices, donate_argnums=donate_argnums)

    @functools.wraps(step_fn)
    def step(state, batch, key):
      per_device_batch = jax.tree.map(
          lambda x: x.reshape((len(devices), x.shape[0] // len(devices)) + x.shape[1:]), batch)
      return mapped(state, per_device_batch, key)
    return step
  raise UserError(f"config train.parallel_mode={mode!r}: use shard_map or pmap")
