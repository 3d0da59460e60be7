"""The encoders' 4x4 stride-2 down-sampling convolution, as XLA's conv or as an im2col matmul.

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


class Im2colDownConv(nn.Module):
  """nn.Conv(features, **DOWN) computed by `im2col_down`; its parameters are nn.Conv's.

  Attributes:
    features: output channels.
    use_bias: add a bias (``"bias"`` [features], zeros at init, as nn.Conv).
    dtype: computation dtype; inputs, kernel and bias are cast to it as nn.Conv does.
    param_dtype: parameter dtype.
    kernel_init: nn.Conv's default, so the same key draws the same kernel.
    bias_init: nn.Conv's default.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, KERNEL_SIZE + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = im2col_down(inputs, kernel)
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
    implementation: ``"xla"``, nn.Conv itself (XLA's conv and its gradients), or ``"im2col"``,
      `Im2colDownConv` (the same parameters; slices and a matmul, and so are its gradients).

  Raises:
    ValueError: for another implementation.
  """
  if implementation == "xla":
    return nn.Conv(features, **DOWN, use_bias=use_bias, dtype=dtype, name=name)
  if implementation == "im2col":
    return Im2colDownConv(features, use_bias=use_bias, dtype=dtype, name=name)
  raise ValueError(f"unknown strided conv {implementation!r}: use one of {STRIDED_CONVS}")
