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
  """A one-axis ``data`` mesh over the first ``num_devices`` local devices (0 = all)."""
  devices = jax.devices()
  if num_devices > len(devices):
    raise UserError(f"config train.num_devices={num_devices}: only {len(devices)} "
                    f"{devices[0].platform} device(s) available")
  devices = devices[:num_devices] if num_devices else devices
  return Mesh(np.asarray(devices), (AXIS,))


def per_device(tree):
  """Marks replicated values as per-device so gradients taken with respect to them are not summed."""
  return jax.lax.pcast(tree, AXIS, to="varying")


def mean_over_devices(tree):
  return jax.lax.pmean(tree, AXIS)


def example_index(local_batch: int) -> jax.Array:
  """The global index of each local example, so per-example randomness ignores the device count."""
  return jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


def shard_batch(batch, mesh: Mesh):
  """Puts a host batch on the mesh, split along its first axis."""
  size = mesh.devices.size
  for name, value in batch.items():
    if value.shape[0] % size:
      raise UserError(f"batch of {value.shape[0]} ({name}) does not split evenly over {size} devices; "
                      "choose train.batch_size divisible by the device count")
  return jax.device_put(batch, NamedSharding(mesh, P(AXIS)))


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
