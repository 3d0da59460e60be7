"""StarGAN's generator G and discriminator D (Choi et al. 2018) for MRI modality translation.

A "domain" is one MRI modality (T1, T1ce, T2, FLAIR). `Generator.apply` maps (image, target
modality) to the image as that modality would show it; `Discriminator.apply` maps an image to a
PatchGAN real/fake map and one logit per modality. As in `segan`, these are plain functions of
their parameters; the training step owns the optimizers and the losses (``uagan_jax.losses``).

Layout is NHWC. The generator needs H and W divisible by 4; the discriminator needs them divisible
by ``2 ** num_layers`` (checked at call time).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from uagan_jax.models.segan import modality_planes

# 4x4 kernels with stride 2 and one pixel of padding halve H and W exactly (StarGAN's down convs).
_DOWN = dict(kernel_size=(4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))
# PyTorch's ConvTranspose2d(kernel_size=4, stride=2, padding=1), which doubles H and W exactly.
# `lax.conv_transpose` pads the stride-dilated input instead of cropping the output, so PyTorch's
# padding p becomes k - 1 - p = 2 here; with ``transpose_kernel=True`` the layer is then exactly the
# gradient of the matching `_DOWN` conv, i.e. the same operator as StarGAN's (tested).
_UP = dict(kernel_size=(4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True)
# PyTorch's InstanceNorm2d epsilon (flax defaults to 1e-6).
_IN_EPSILON = 1e-5


class ConditionalInstanceNorm(nn.Module):
  """InstanceNorm whose scale and offset are looked up per target modality (Dumoulin et al. 2017).

  StarGAN conditions G only through one-hot planes concatenated to the input. Those planes are
  spatially constant, so the stem conv turns them into a constant per channel, and the InstanceNorm
  right after it subtracts each channel's spatial mean: the target survives only where the zero
  padding makes the planes' contribution non-constant, near the image border. With a scale and an
  offset per target modality after every normalisation, each layer knows the target everywhere.
  Initialised to the identity (scale 1, offset 0) for every modality, i.e. to plain InstanceNorm.

  Attributes:
    num_modalities: rows of the scale and offset tables.
    epsilon: added to the variance.
    dtype: computation dtype.
  """
  num_modalities: int
  epsilon: float = _IN_EPSILON
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, modality: jax.Array) -> jax.Array:
    """[B, H, W, C] features and [B] modality ids -> normalised, scaled and shifted features."""
    x = nn.InstanceNorm(epsilon=self.epsilon, use_scale=False, use_bias=False, dtype=self.dtype,
                        name="norm")(x)
    shape = (self.num_modalities, x.shape[-1])
    scale = self.param("scale", nn.initializers.ones, shape)[modality][:, None, None, :]
    offset = self.param("bias", nn.initializers.zeros, shape)[modality][:, None, None, :]
    return x * scale.astype(x.dtype) + offset.astype(x.dtype)


# Inputs are clipped this far inside (-1, 1) before arctanh, so the skip stays finite.
_SKIP_LIMIT = 0.98


def input_skip(image: jax.Array, out_channels: int) -> jax.Array:
  """The pre-tanh value that reproduces ``image`` (clipped to +-0.98): added to the head's output,
  the generator predicts a change of its input rather than a new image, so it starts as the
  identity. MRI modalities share anatomy, and some pairs (T1 and T1ce) differ only inside the
  tumour, where a generator drawing every pixel anew loses to simply copying its input."""
  if image.shape[-1] != out_channels:
    raise ValueError(f"input skip needs as many input channels ({image.shape[-1]}) as output "
                     f"channels ({out_channels})")
  return jnp.arctanh(jnp.clip(image, -_SKIP_LIMIT, _SKIP_LIMIT))


def generator_norm(kind: str, modality: jax.Array, *, num_modalities: int, dtype):
  """A factory ``name -> (features -> normalised features)`` for the generator's norm layers.

  Args:
    kind: one of GENERATOR_NORMS: ``"instance"`` (StarGAN as published: affine InstanceNorm, the
      target seen only through the input planes) or ``"conditional_instance"`` (scale and offset
      per target modality, see `ConditionalInstanceNorm`).
    modality: [B] target modality ids.
    num_modalities: size of the one-hot.
    dtype: computation dtype.
  """
  if kind == "instance":
    return lambda name: nn.InstanceNorm(epsilon=_IN_EPSILON, dtype=dtype, name=name)
  if kind == "conditional_instance":
    return lambda name: functools.partial(
        ConditionalInstanceNorm(num_modalities, dtype=dtype, name=name), modality=modality)
  raise ValueError(f"unknown generator norm {kind!r} (known: instance, conditional_instance)")


class Generator(nn.Module):
  """StarGAN generator: 7x7 stem, two stride-2 downs, residual blocks, two stride-2 ups, 7x7 head.

  The input image is concatenated with the *target* modality's one-hot planes, so one network
  translates into every modality. Every hidden conv is followed by InstanceNorm with affine
  parameters (StarGAN's ``affine=True``) and ReLU; InstanceNorm normalises each example on its own,
  so the output does not depend on the rest of the batch.

  Upsampling uses 4x4 stride-2 transposed convs, as StarGAN does, rather than SegAN's bilinear
  resize + conv: this keeps the published architecture (and its parameter count) so results can
  be compared with the reference, at the known risk of checkerboard artefacts early in training.

  Attributes:
    base_features: width of the stem; the downs double it twice, the ups halve it back.
    num_residual: residual blocks at the bottleneck (6 for 128x128 images in StarGAN).
    num_modalities: size of the target-modality one-hot.
    out_channels: channels of the translated image.
    norm: ``"instance"`` (as published) or ``"conditional_instance"`` (see `generator_norm`).
    input_skip: add the input to the head's output before tanh (see `input_skip`); off in
      StarGAN as published.
    dtype: computation dtype (parameters stay float32).
  """
  base_features: int = 64
  num_residual: int = 6
  num_modalities: int = 4
  out_channels: int = 1
  norm: str = "instance"
  input_skip: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, target_modality: jax.Array, *,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """Translates ``image`` into ``target_modality``.

    Args:
      image: [B, H, W, C] source images, H and W divisible by 4.
      target_modality: [B] integer modality ids to translate into.
      return_features: also return the decoder features.

    Returns:
      The translated images [B, H, W, out_channels] in [-1, 1] (float32). With
      ``return_features``, a pair of that and the list of the two up blocks' outputs, coarse to
      fine: [B, H/2, W/2, 2 * base_features] and [B, H, W, base_features] (float32), where UAGAN
      attaches its fusion attention.
    """
    # A bias before InstanceNorm is redundant (the norm subtracts each channel's mean), as in
    # StarGAN, which builds these convs with bias=False.
    instance_norm = generator_norm(self.norm, target_modality, num_modalities=self.num_modalities,
                                   dtype=self.dtype)
    _, height, width, _ = image.shape
    x = jnp.concatenate(
        [image.astype(self.dtype),
         modality_planes(target_modality, num_modalities=self.num_modalities, height=height,
                         width=width, dtype=self.dtype)], axis=-1)
    x = nn.Conv(self.base_features, (7, 7), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, name="stem")(x)
    x = nn.relu(instance_norm("stem_norm")(x))
    features = self.base_features
    for level in range(2):
      features *= 2
      x = nn.Conv(features, **_DOWN, use_bias=False, dtype=self.dtype, name=f"down{level}")(x)
      x = nn.relu(instance_norm(f"down{level}_norm")(x))
    for block in range(self.num_residual):
      # StarGAN's residual block: no activation after the sum.
      y = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  name=f"res{block}_conv0")(x)
      y = nn.relu(instance_norm(f"res{block}_norm0")(y))
      y = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  name=f"res{block}_conv1")(y)
      x = x + instance_norm(f"res{block}_norm1")(y)
    decoder_features = []
    for level in range(2):
      features //= 2
      x = nn.ConvTranspose(features, **_UP, use_bias=False, dtype=self.dtype, name=f"up{level}")(x)
      x = nn.relu(instance_norm(f"up{level}_norm")(x))
      decoder_features.append(x.astype(jnp.float32))
    # Bias-free like every StarGAN generator conv, so the parameter count matches the reference.
    x = nn.Conv(self.out_channels, (7, 7), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, name="head")(x)
    if self.input_skip:
      x = x + input_skip(image, self.out_channels).astype(x.dtype)
    translated = jnp.tanh(x).astype(jnp.float32)
    if return_features:
      return translated, decoder_features
    return translated


class Discriminator(nn.Module):
  """StarGAN PatchGAN discriminator with an auxiliary modality classifier.

  ``num_layers`` 4x4 stride-2 convs with LeakyReLU(0.01) and no normalisation: the WGAN-GP penalty
  takes the gradient of each example's score with respect to that example only, which batch
  statistics would break. Two heads share the trunk: ``src``, a 3x3 conv to one channel (a
  real/fake score per patch), and ``cls``, a conv whose kernel covers the whole remaining feature
  map (``VALID`` padding), so it collapses to one logit per modality.

  Attributes:
    base_features: width of the first conv; each further level doubles it.
    num_layers: stride-2 levels; H and W must be divisible by ``2 ** num_layers`` (6 for 128x128
      images in StarGAN, leaving a 2x2 map).
    num_modalities: classifier outputs.
    dtype: computation dtype (parameters stay float32).
  """
  base_features: int = 64
  num_layers: int = 6
  num_modalities: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores ``image`` as real or fake and classifies its modality.

    Args:
      image: [B, H, W, C] images, H and W divisible by ``2 ** num_layers``.

    Returns:
      ``(src, cls_logits)``: the real/fake map [B, H / 2**L, W / 2**L, 1] and the modality
      logits [B, num_modalities], both float32.

    Raises:
      ValueError: if H or W is not divisible by ``2 ** num_layers``.
    """
    _, height, width, _ = image.shape
    factor = 2 ** self.num_layers
    if height % factor or width % factor:
      raise ValueError(f"image size {height}x{width} is not divisible by 2**num_layers = {factor}")
    x = image.astype(self.dtype)
    for level in range(self.num_layers):
      x = nn.Conv(self.base_features * 2 ** level, **_DOWN, dtype=self.dtype,
                  name=f"down{level}")(x)
      x = nn.leaky_relu(x, 0.01)
    # Both heads are bias-free in StarGAN; a bias on the WGAN score cancels in the critic loss.
    src = nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  name="src")(x)
    cls_logits = nn.Conv(self.num_modalities, (height // factor, width // factor), padding="VALID",
                         use_bias=False, dtype=self.dtype, name="cls")(x)
    return src.astype(jnp.float32), cls_logits.reshape(cls_logits.shape[0], -1).astype(jnp.float32)
