"""Bilinear x2 upsampling as stencils, with its adjoint as its gradient (``model.resize="stencil"``).

Bilinear x2 with half-pixel centres (what `jax.image.resize` computes for an exact doubling) is, along
one axis, out[2i] = .25 x[i-1] + .75 x[i] and out[2i+1] = .75 x[i] + .25 x[i+1], the edges clamped.
XLA:CPU runs `jax.image.resize` as a dense [2n, n] matrix product per axis with transposes around
it, and autodiff of a stencil written with slices and an interleaving stack gives pads, adds and
concatenations that its loop emitter runs slowly. Here each axis's map and its adjoint are written
as elementwise expressions of their input, which XLA fuses into one loop each:

* ``up_along``: the two phases from shifted copies of the input, each repeated twice by a broadcast
  and picked by the output index's parity (no concatenation of the large output);
* ``down_along`` (its adjoint): the even and odd entries by strided slices, the neighbour terms from
  the half-size grid.

Each is the other's VJP (a `jax.custom_vjp` on both), so gradients of every order stay in this form.
Values equal `jax.image.resize` to float32 rounding (the same two products and one sum an output;
a gradient adds the same terms in another order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


SCOPE = "resize_stencil"  # the name scope of every operation here, in the HLO's op_name


def _repeat_pairs(v: jax.Array, axis: int) -> jax.Array:
  """Every entry twice along ``axis`` ([.., n, ..] -> [.., 2n, ..]): a broadcast and a reshape,
  fused by XLA as index arithmetic."""
  n = v.shape[axis]
  doubled = v.shape[:axis + 1] + (2,) + v.shape[axis + 1:]
  return jnp.broadcast_to(jnp.expand_dims(v, axis + 1), doubled).reshape(
      v.shape[:axis] + (2 * n,) + v.shape[axis + 1:])


def _slice(v: jax.Array, start: int, stop: int, axis: int) -> jax.Array:
  return lax.slice_in_dim(v, start, stop, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def up_along(v: jax.Array, axis: int) -> jax.Array:
  """Bilinear x2 along ``axis`` (half-pixel centres, edges clamped)."""
  with jax.named_scope(SCOPE):  # so that profiles (benchmarks/profile_step.py) can name it
    n = v.shape[axis]
    before = jnp.concatenate([_slice(v, 0, 1, axis), _slice(v, 0, n - 1, axis)], axis=axis)
    after = jnp.concatenate([_slice(v, 1, n, axis), _slice(v, n - 1, n, axis)], axis=axis)
    even, odd = 0.25 * before + 0.75 * v, 0.75 * v + 0.25 * after
    parity = [1] * v.ndim
    parity[axis] = 2 * n
    is_even = lax.broadcasted_iota(jnp.int32, parity, axis) % 2 == 0
    return jnp.where(is_even, _repeat_pairs(even, axis), _repeat_pairs(odd, axis))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def down_along(g: jax.Array, axis: int) -> jax.Array:
  """The adjoint of `up_along` ([.., 2n, ..] -> [.., n, ..]): x[j] collects .75 from outputs 2j and
  2j+1, .25 from outputs 2j+2 and 2j-1, and the clamped edges' second .25."""
  with jax.named_scope(SCOPE):
    n = g.shape[axis] // 2
    even = lax.slice_in_dim(g, 0, 2 * n, stride=2, axis=axis)
    odd = lax.slice_in_dim(g, 1, 2 * n, stride=2, axis=axis)
    # From out[2j+2] (x[j] is its left neighbour) and, at the last j, the clamped out[2n-1].
    right = jnp.concatenate([_slice(even, 1, n, axis), _slice(odd, n - 1, n, axis)], axis=axis)
    # From out[2j-1] (x[j] is its right neighbour) and, at j = 0, the clamped out[0].
    left = jnp.concatenate([_slice(even, 0, 1, axis), _slice(odd, 0, n - 1, axis)], axis=axis)
    return 0.75 * (even + odd) + 0.25 * (right + left)


# Both maps are linear: nothing to keep for the backward pass, which is the other map.
up_along.defvjp(lambda v, axis: (up_along(v, axis), None),
                lambda axis, _, cotangent: (down_along(cotangent, axis),))
down_along.defvjp(lambda g, axis: (down_along(g, axis), None),
                  lambda axis, _, cotangent: (up_along(cotangent, axis),))


def upsample2x(x: jax.Array) -> jax.Array:
  """Bilinear x2 of an NHWC batch: along H, then W."""
  return up_along(up_along(x, 1), 2)
