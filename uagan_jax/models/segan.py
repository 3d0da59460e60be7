"""SegAN's segmentor S and multi-scale critic C (Xue et al. 2018) as Flax Linen modules.

Both are plain functions of their parameters: `Segmentor.apply` maps (image, modality) to one
logit map per region, `Critic.apply` maps a masked image to its features at every scale. The
training step owns the optimizers and the min-max game; nothing here knows about it.

Layout is NHWC. Spatial sizes must be divisible by ``2 ** len(features)`` (checked by the config).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uagan_jax.config import RESIZES
from uagan_jax.models import bilinear
from uagan_jax.models.strided_conv import down_conv


def modality_planes(modality: jax.Array, *, num_modalities: int, height: int,
                    width: int, dtype=jnp.float32) -> jax.Array:
  """The modality one-hot replicated over space: [B] ids -> [B, H, W, num_modalities]."""
  one_hot = jax.nn.one_hot(modality, num_modalities, dtype=dtype)
  return jnp.broadcast_to(one_hot[:, None, None, :], (modality.shape[0], height, width, num_modalities))


def upsample2x(x: jax.Array, *, method: str = "jax_image") -> jax.Array:
  """Bilinear resize by 2 (the SegAN decoder's upsampling, which avoids checkerboard artefacts).

  ``method`` (``model.resize``): ``"jax_image"``, `jax.image.resize`, which contracts each axis
  with a dense [2n, n] weight matrix (two non-zeros a row) and transposes around it, a quarter
  of the segan :demo step on a CPU; or ``"stencil"`` (`bilinear.upsample2x`), the same
  interpolation as two multiply-adds a pixel, with its adjoint as its gradient. Their outputs
  agree to float32 rounding; their gradients add the same terms in another order.
  """
  if method == "stencil":
    return bilinear.upsample2x(x)
  if method != "jax_image":
    raise ValueError(f"unknown resize {method!r}: use one of {RESIZES}")
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear")


def segmentor_batch_norm(*, train: bool, axis_name: str | None, dtype):
  """A factory ``() -> BatchNorm`` for the segmentor's norms (auto-named ``BatchNorm_<k>`` in the
  order they are created): batch statistics in training (averaged over ``axis_name``), the
  running averages otherwise."""
  return lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                              axis_name=axis_name if train else None, dtype=dtype)


def segmentor_encoder(image: jax.Array, modality: jax.Array, batch_norm, *,
                      features: Sequence[int], num_modalities: int, prefix: str,
                      dtype, strided_conv: str = "xla") -> tuple[jax.Array, list[jax.Array]]:
  """SegAN's encoder, for `Segmentor` and `uagan.UnifiedNet`: the image with its modality planes
  through one 4x4 stride-2 conv per width, BatchNorm (but on the first) and LeakyReLU(0.2).

  Call inside a compact module: the convs become its children ``prefix + "down<level>"``, computed
  as ``strided_conv`` says (`strided_conv.down_conv`).

  Returns:
    ``(bottleneck, skips)``: the last level's output, and every other level's, fine to coarse.
  """
  _, height, width, _ = image.shape
  x = jnp.concatenate(
      [image.astype(dtype),
       modality_planes(modality, num_modalities=num_modalities, height=height, width=width,
                       dtype=dtype)], axis=-1)
  skips = []
  for level, width_ in enumerate(features):
    # A bias before BatchNorm is redundant (BN subtracts the mean): its true gradient is zero and
    # Adam would turn the rounding noise in it into full-size steps, so it is left out.
    x = down_conv(width_, use_bias=level == 0, dtype=dtype, name=f"{prefix}down{level}",
                  implementation=strided_conv)(x)
    if level > 0:  # SegAN: no normalisation on the first layer.
      x = batch_norm()(x)
    x = nn.leaky_relu(x, 0.2)
    skips.append(x)
  skips.pop()  # the bottleneck is x itself
  return x, skips


def segmentor_up(x: jax.Array, features: int, batch_norm, *, name: str, dtype,
                 resize: str = "jax_image") -> jax.Array:
  """One level of SegAN's decoder: bilinear resize x2 (`upsample2x` by ``resize``), 3x3 conv
  ``name``, BatchNorm, ReLU."""
  x = upsample2x(x, method=resize)
  x = nn.Conv(features, (3, 3), use_bias=False, dtype=dtype, name=name)(x)
  return nn.relu(batch_norm()(x))


class Segmentor(nn.Module):
  """SegAN segmentor: 4x4 stride-2 conv encoder, resize-x2 + 3x3 conv decoder, U-Net skips.

  The input image is concatenated with its modality one-hot planes, so one network segments every
  modality. The output is one logit map per region (sigmoid gives WT, TC, ET probabilities); the
  regions are nested in reality, but each gets an independent sigmoid, as in SegAN's multi-label
  BraTS model.

  Attributes:
    features: encoder widths, one stride-2 level each (the decoder mirrors them).
    num_regions: output maps (3: WT, TC, ET).
    num_modalities: size of the modality one-hot.
    bn_axis_name: mesh axis over which BatchNorm statistics are averaged in training (``"data"``
      inside the data-parallel step, so the model does not depend on how many devices share the
      batch); ``None`` outside it.
    dtype: computation dtype (parameters stay float32).
    strided_conv: how the 4x4 stride-2 convs are computed (`strided_conv.down_conv`; the same
      parameters whichever).
    resize: how the decoder's bilinear x2 is computed (`upsample2x`).
  """
  features: Sequence[int] = (64, 128, 256, 512)
  num_regions: int = 3
  num_modalities: int = 4
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  strided_conv: str = "xla"
  resize: str = "jax_image"

  @nn.compact
  def __call__(self, image: jax.Array, modality: jax.Array, *, train: bool) -> jax.Array:
    batch_norm = segmentor_batch_norm(train=train, axis_name=self.bn_axis_name, dtype=self.dtype)
    x, skips = segmentor_encoder(image, modality, batch_norm, features=self.features,
                                 num_modalities=self.num_modalities, prefix="", dtype=self.dtype,
                                 strided_conv=self.strided_conv)
    for level in reversed(range(len(self.features) - 1)):
      x = segmentor_up(x, self.features[level], batch_norm, name=f"up{level}", dtype=self.dtype,
                       resize=self.resize)
      x = jnp.concatenate([x, skips[level]], axis=-1)
    x = segmentor_up(x, self.features[0], batch_norm, name="head_conv", dtype=self.dtype,
                     resize=self.resize)
    logits = nn.Conv(self.num_regions, (3, 3), dtype=self.dtype, name="logits")(x)
    return logits.astype(jnp.float32)


class Critic(nn.Module):
  """SegAN critic: 4x4 stride-2 conv blocks; returns its features at every scale.

  The input is the image masked by each region map (``masked_image``); the first returned
  "feature" is that input itself, so the multi-scale L1 loss also compares pixels.

  Attributes:
    features: widths of the conv blocks (one stride-2 level each).
    norm: ``"batch"`` (as in SegAN; statistics of the current batch only, the critic is never run
      in inference mode), ``"layer"`` or ``"none"``. The gradient penalty needs examples to be
      independent, so use ``"layer"`` or ``"none"`` with it.
    bn_axis_name: mesh axis for batch statistics (see `Segmentor`).
    dtype: computation dtype.
    strided_conv: how the 4x4 stride-2 convs are computed (`strided_conv.down_conv`; the same
      parameters whichever).
  """
  features: Sequence[int] = (64, 128, 256)
  norm: str = "batch"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  strided_conv: str = "xla"

  @nn.compact
  def __call__(self, masked_image: jax.Array) -> list[jax.Array]:
    x = masked_image.astype(self.dtype)
    features = [masked_image.astype(jnp.float32)]
    for level, width in enumerate(self.features):
      normalised = level > 0 and self.norm != "none"
      x = down_conv(width, use_bias=not normalised, dtype=self.dtype, name=f"down{level}",
                    implementation=self.strided_conv)(x)
      if level > 0:
        if self.norm == "batch":
          x = nn.BatchNorm(use_running_average=False, axis_name=self.bn_axis_name,
                           dtype=self.dtype)(x)
        elif self.norm == "layer":
          x = nn.LayerNorm(dtype=self.dtype)(x)
        elif self.norm != "none":
          raise ValueError(f"unknown critic norm {self.norm!r}")
      x = nn.leaky_relu(x, 0.2)
      features.append(x.astype(jnp.float32))
    return features


def mask_image(image: jax.Array, region_maps: jax.Array) -> jax.Array:
  """The critic's input: each image channel times each region map, [B,H,W,C] x [B,H,W,R] -> C*R."""
  masked = image[..., :, None] * region_maps[..., None, :]
  return masked.reshape(masked.shape[:-2] + (-1,))
