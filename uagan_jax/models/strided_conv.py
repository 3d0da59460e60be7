"""The 4x4 stride-2 convolutions (down and transposed up), as XLA's conv, as an im2col matmul, or
with gradients written as canonical convolutions.

SegAN's encoder and critic and StarGAN's generator and discriminator halve H and W with 4x4
stride-2 convs padded by one pixel. XLA:CPU computes the kernel gradient of such a conv as a
convolution whose window is the whole feature map with the output gradient dilated by 2, at 1-2
GFLOP/s, two thirds of the stargan :demo step (docs/EXPERIMENTS.md, "Where the step's time goes").

`down_conv(..., implementation="im2col")` computes the same sum as the conv by gathering the 16
taps with strided slices and contracting them with one matmul. Autodiff then gives the kernel
gradient as a matmul (patches^T @ output gradient) and the input gradient as a matmul followed by
16 pads-and-adds; both stay plain JAX operations, so they differentiate again (the WGAN-GP
penalty's second-order pass), vmap, shard and run in bfloat16 like any other layer. The parameters
are nn.Conv's, same names, shapes, initialisers and init values, so a checkpoint loads under
either implementation. The result differs from XLA's conv only in the order of each sum.

`down_conv(..., implementation="canonical_vjp")` and `up_conv(...)` keep XLA's convolutions but
say themselves what their gradients are. Autodiff of `lax.conv_transpose` (StarGAN's up layers)
and the WGAN-GP penalty's second-order pass through D produce kernel gradients with the kernel
reversed and batch and feature swapped (``rhs_reversal``, ``dim_labels=01fb_o01i->f01b`` in the
compiled HLO). XLA:CPU hands a convolution to its Eigen kernel only in the canonical layout
(NHWC input, HWIO kernel, no reversal); the others are emitted as plain loops at 1-2 GFLOP/s,
two thirds of the stargan :demo step. The three bilinear maps here, the down conv
``down(x, k)``, its transpose in ``x`` ``up(g, k)`` and its transpose in ``k``
``kernel_grad(x, g)``, are each other's derivatives:

  d<down(x, k), h>  = <dx, up(h, k)>    + <dk, kernel_grad(x, h)>
  d<up(g, k), h>    = <dg, down(h, k)>  + <dk, kernel_grad(h, g)>
  d<kernel_grad(x, g), h> = <dx, up(g, h)> + <dg, down(x, h)>

so a `jax.custom_vjp` on each, whose backward pass calls the other two, gives gradients of every
order (the penalty needs the second) built only of the three forward convolutions, which XLA
keeps canonical. The sums are the same as autodiff's; the kernels that compute them differ, so
the bits do too (float32 rounding).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uagan_jax.config import STRIDED_CONVS

KERNEL_SIZE = (4, 4)
# 4x4 kernels with stride 2 and one pixel of padding halve H and W exactly, as in SegAN and StarGAN.
DOWN = dict(kernel_size=KERNEL_SIZE, strides=(2, 2), padding=((1, 1), (1, 1)))
# PyTorch's ConvTranspose2d(kernel_size=4, stride=2, padding=1), which doubles H and W exactly.
# `lax.conv_transpose` pads the stride-dilated input instead of cropping the output, so PyTorch's
# padding p becomes k - 1 - p = 2 here; with ``transpose_kernel=True`` the layer is then exactly the
# gradient of the matching `DOWN` conv, i.e. the same operator as StarGAN's (tested).
UP = dict(kernel_size=KERNEL_SIZE, strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True)
_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _down(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's 4x4 stride-2 pad-1 conv, NHWC input and HWIO kernel (what nn.Conv(**DOWN) computes)."""
  return jax.lax.conv_general_dilated(x, kernel, DOWN["strides"], DOWN["padding"],
                                      dimension_numbers=_NHWC_HWIO)


def _up(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """The transpose of ``_down(., kernel)`` applied to ``g`` [B, H/2, W/2, O]: [B, H, W, C].

  A stride-1 conv of ``g`` dilated by 2 and padded by 4 - 1 - 1 = 2, with the kernel flipped in
  space and its in/out features swapped, as a tensor of its own (a 4x4xCxO copy) rather than
  reversal flags on the conv, which would keep it off XLA:CPU's Eigen path.
  """
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  pad = KERNEL_SIZE[0] - 1 - DOWN["padding"][0][0]
  if g.shape[1] * g.shape[2] < KERNEL_SIZE[0] * KERNEL_SIZE[1]:
    # XLA swaps the operands of a conv whose input has fewer pixels than its window (a 3x3 map
    # under a 4x4 kernel, D's last level), which takes it off the Eigen path again; dilating the
    # input as a tensor of its own (zeros between pixels, 4x this conv's FLOPs on a map this
    # small) keeps the input the larger operand. Interleaving by stack and reshape, because XLA
    # folds an interior-padding `lax.pad` back into the conv as a dilation.
    batch, height, width, channels = g.shape
    zeros = jnp.zeros_like(g)
    dilated = jnp.stack([g, zeros], axis=2).reshape(batch, 2 * height, width, channels)
    dilated = jnp.stack([dilated, jnp.zeros_like(dilated)], axis=3).reshape(
        batch, 2 * height, 2 * width, channels)
    # The interleaving leaves one zero after the last pixel: pad - 1 more there.
    dilated = jnp.pad(dilated, ((0, 0), (pad, pad - 1), (pad, pad - 1), (0, 0)))
    return jax.lax.conv_general_dilated(dilated, flipped, (1, 1), "VALID",
                                        dimension_numbers=_NHWC_HWIO)
  return jax.lax.conv_general_dilated(g, flipped, (1, 1), ((pad, pad), (pad, pad)),
                                      lhs_dilation=DOWN["strides"], dimension_numbers=_NHWC_HWIO)


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The transpose of ``_down(x, .)`` applied to ``g`` [B, H/2, W/2, O]: [4, 4, C, O] (JAX's own
  transpose rule, which XLA canonicalises with two layout copies).

  Inside shard_map the kernel it transposes at is marked varying like ``x`` and ``g``: a
  replicated one would be cast to varying inside, and the transpose of that cast is a sum over
  devices, which the caller's own transpose adds again.
  """
  varying = tuple(sorted(jax.typeof(x).manual_axis_type.varying
                         | jax.typeof(g).manual_axis_type.varying))
  kernel = jnp.zeros(KERNEL_SIZE + (x.shape[-1], g.shape[-1]), x.dtype)
  if varying:
    kernel = jax.lax.pcast(kernel, varying, to="varying")
  return jax.vjp(lambda k: _down(x, k), kernel)[1](g)[0]


@jax.custom_vjp
def canonical_down(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``_down`` whose gradients are `canonical_up` and `canonical_kernel_grad`."""
  return _down(x, kernel)


@jax.custom_vjp
def canonical_up(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """``_up`` (StarGAN's 4x4 stride-2 transposed conv) whose gradients are `canonical_down` and
  `canonical_kernel_grad`."""
  return _up(g, kernel)


@jax.custom_vjp
def canonical_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """``_kernel_grad`` whose gradients are `canonical_up` and `canonical_down`."""
  return _kernel_grad(x, g)


def _typed_like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """``cotangent`` given its primal's shard_map type, as a custom VJP's backward pass must.

  Inside shard_map a value is replicated or varying over the mesh axes. A replicated kernel that
  meets a per-device batch inside these functions is cast to varying there, and the transpose of
  that cast is a sum over the devices: its cotangent is psum'd over the axes it varies over and
  the primal does not. The converse (a varying primal whose cotangent came out replicated) is
  one value on every device, cast to varying.
  """
  primal_axes = jax.typeof(primal).manual_axis_type.varying
  cotangent_axes = jax.typeof(cotangent).manual_axis_type.varying
  extra, missing = cotangent_axes - primal_axes, primal_axes - cotangent_axes
  if extra:
    cotangent = jax.lax.psum(cotangent, tuple(sorted(extra)))
  if missing:
    cotangent = jax.lax.pcast(cotangent, tuple(sorted(missing)), to="varying")
  return cotangent


def _keeping_operands(bilinear):
  """The forward pass of a custom VJP on ``bilinear(a, b)``: its value, and both operands as the
  residuals (each backward pass is the other two maps applied to them)."""
  return lambda a, b: (bilinear(a, b), (a, b))


def _down_bwd(residuals, h):
  x, kernel = residuals
  return (_typed_like(canonical_up(h, kernel), x),
          _typed_like(canonical_kernel_grad(x, h), kernel))


def _up_bwd(residuals, h):
  g, kernel = residuals
  return (_typed_like(canonical_down(h, kernel), g),
          _typed_like(canonical_kernel_grad(h, g), kernel))


def _kernel_grad_bwd(residuals, h):
  x, g = residuals
  return _typed_like(canonical_up(g, h), x), _typed_like(canonical_down(x, h), g)


canonical_down.defvjp(_keeping_operands(_down), _down_bwd)
canonical_up.defvjp(_keeping_operands(_up), _up_bwd)
canonical_kernel_grad.defvjp(_keeping_operands(_kernel_grad), _kernel_grad_bwd)


def im2col_down(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 4x4 stride-2 pad-1 conv of ``x`` [B, H, W, C] with ``kernel`` [4, 4, C, O] (HWIO) as 16
  strided slices and one matmul: [B, H/2, W/2, O], H and W even."""
  _, height, width, channels = x.shape
  if height % 2 or width % 2:
    raise ValueError(f"im2col_down needs an even height and width, got {height}x{width}")
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [padded[:, dy:dy + height:2, dx:dx + width:2, :]
          for dy in range(KERNEL_SIZE[0]) for dx in range(KERNEL_SIZE[1])]
  patches = jnp.concatenate(taps, axis=-1)  # [B, H/2, W/2, 16 C] in (dy, dx, c) order, as HWIO
  return jnp.dot(patches, kernel.reshape(-1, kernel.shape[-1]))


class _KernelConv(nn.Module):
  """A 4x4 conv layer whose output is ``compute(inputs, kernel)`` (+ bias); its parameters are
  nn.Conv's (``transpose=False``: kernel [4, 4, in, features]) or nn.ConvTranspose's with
  ``transpose_kernel=True`` (``transpose=True``: kernel [4, 4, features, in]), same names,
  shapes, initialisers, so the same key draws the same values.

  Attributes:
    features: output channels.
    compute: ``(inputs, kernel) -> outputs``.
    transpose: the kernel's layout, as above.
    use_bias: add a bias (``"bias"`` [features], zeros at init, as nn.Conv).
    dtype: computation dtype; inputs, kernel and bias are cast to it as nn.Conv does.
    param_dtype: parameter dtype.
    kernel_init: nn.Conv's default, so the same key draws the same kernel.
    bias_init: nn.Conv's default.
  """
  features: int
  compute: Any
  transpose: bool = False
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    io = ((self.features, inputs.shape[-1]) if self.transpose
          else (inputs.shape[-1], self.features))
    kernel = self.param("kernel", self.kernel_init, KERNEL_SIZE + io, self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = self.compute(inputs, kernel)
    if bias is not None:
      y = y + bias
    return y


def down_conv(features: int, *, use_bias: bool = True, dtype=None, name: str,
              implementation: str = "xla") -> nn.Module:
  """The 4x4 stride-2 pad-1 conv module named ``name`` (``model.strided_conv``).

  Args:
    features: output channels.
    use_bias: whether the layer has a bias.
    dtype: computation dtype.
    name: the module's name (its parameters' key).
    implementation: ``"xla"``, nn.Conv itself (XLA's conv and its gradients); ``"im2col"``,
      `im2col_down` (slices and a matmul, and so are its gradients); ``"canonical_vjp"``,
      `canonical_down` (XLA's conv, gradients as canonical convs). The same parameters throughout.

  Raises:
    ValueError: for another implementation.
  """
  if implementation == "xla":
    return nn.Conv(features, **DOWN, use_bias=use_bias, dtype=dtype, name=name)
  if implementation == "im2col":
    return _KernelConv(features, im2col_down, use_bias=use_bias, dtype=dtype, name=name)
  if implementation == "canonical_vjp":
    return _KernelConv(features, canonical_down, use_bias=use_bias, dtype=dtype, name=name)
  raise ValueError(f"unknown strided conv {implementation!r}: use one of {STRIDED_CONVS}")


def up_conv(features: int, *, use_bias: bool = True, dtype=None, name: str,
            implementation: str = "xla") -> nn.Module:
  """StarGAN's 4x4 stride-2 transposed conv module named ``name``, doubling H and W.

  Args:
    features: output channels.
    use_bias: whether the layer has a bias.
    dtype: computation dtype.
    name: the module's name (its parameters' key).
    implementation: ``"canonical_vjp"``, `canonical_up` (the same conv, gradients as canonical
      convs); any other known value, nn.ConvTranspose(**UP) itself (``"im2col"`` rewrites only
      the down convs). The same parameters either way.

  Raises:
    ValueError: for an unknown implementation.
  """
  if implementation == "canonical_vjp":
    return _KernelConv(features, canonical_up, transpose=True, use_bias=use_bias, dtype=dtype,
                       name=name)
  if implementation in STRIDED_CONVS:
    return nn.ConvTranspose(features, **UP, use_bias=use_bias, dtype=dtype, name=name)
  raise ValueError(f"unknown strided conv {implementation!r}: use one of {STRIDED_CONVS}")
