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

from uagan_jax.config import GENERATOR_NORMS, GENERATOR_OUTPUTS
from uagan_jax.models.segan import modality_planes
from uagan_jax.models.strided_conv import down_conv
from uagan_jax.models.strided_conv import up_conv

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
    # Normalised, scaled and shifted in float32 and only then cast to the computation dtype, as
    # Flax's own norms do with their affine parameters (a no-op in float32).
    x = nn.InstanceNorm(epsilon=self.epsilon, use_scale=False, use_bias=False, dtype=jnp.float32,
                        name="norm")(x)
    shape = (self.num_modalities, x.shape[-1])
    scale = self.param("scale", nn.initializers.ones, shape)[modality][:, None, None, :]
    offset = self.param("bias", nn.initializers.zeros, shape)[modality][:, None, None, :]
    return (x * scale.astype(x.dtype) + offset.astype(x.dtype)).astype(self.dtype)


# Inputs are clipped this far inside (-1, 1) before arctanh, so the residual output stays finite.
_SKIP_LIMIT = 0.98


def own_channels(outputs: jax.Array, index: jax.Array, *, channels: int) -> jax.Array:
  """Each example's own block of channels: [B, H, W, K * channels], [B] ids -> [B, H, W, channels].

  The heads of a multi-head conv lie side by side on the last axis; example b keeps block
  ``index[b]``, so a head receives gradients only from its own examples.
  """
  outputs = outputs.reshape(outputs.shape[:-1] + (outputs.shape[-1] // channels, channels))
  return jnp.take_along_axis(outputs, index[:, None, None, None, None], axis=3)[:, :, :, 0]


def generator_output(features: jax.Array, image: jax.Array, *, kind: str, out_channels: int,
                     name: str, dtype, head_index: jax.Array | None = None,
                     num_heads: int = 1) -> jax.Array:
  """The generator's 7x7 head and how it turns into the translated image, in [-1, 1].

  Call inside a compact module: the convs become that module's children ``name`` (and
  ``name + "_mask"``), so the ``"tanh"`` parameters are StarGAN's.

  Args:
    features: [B, H, W, C] last decoder features.
    image: [B, H, W, out_channels] the generator's input, in [-1, 1].
    kind: one of GENERATOR_OUTPUTS:
      ``"tanh"``: ``tanh(head)``, StarGAN as published: every pixel drawn anew.
      ``"residual"``: ``tanh(head + arctanh(image))``, a change of the input, the head starting
      at zero, so G starts as the identity (input clipped to +-0.98). MRI modalities share
      anatomy, and some pairs (T1 and T1ce) differ only inside the tumour.
      ``"blend"``: ``m * image + (1 - m) * tanh(head)`` with a per-pixel mask
      ``m = sigmoid(mask_head)`` (GANimation, Pumarola et al. 2018; AttentionGAN, Tang et al.
      2019): G chooses, pixel by pixel and per target, between copying its input (T1 -> T1ce
      outside the tumour) and drawing anew (T1 -> T2, whose contrast is inverted, which a
      residual start holds back). The mask head starts at zero, m = 0.5.
    out_channels: channels of the translated image.
    name: the head conv's name.
    dtype: computation dtype.
    head_index: [B] ids in [0, num_heads): each example's own head (and mask head), e.g. its
      source-target pair; None with ``num_heads=1``: one head for all.
    num_heads: heads side by side in the convs (``num_heads * out_channels`` outputs each), of
      which every example uses one: a head receives gradients only from its own examples.

  Returns:
    [B, H, W, out_channels] float32 in [-1, 1].
  """
  if kind not in GENERATOR_OUTPUTS:
    raise ValueError(f"unknown generator output {kind!r} (known: {', '.join(GENERATOR_OUTPUTS)})")
  if kind != "tanh" and image.shape[-1] != out_channels:
    raise ValueError(f"generator output {kind!r} needs as many input channels "
                     f"({image.shape[-1]}) as output channels ({out_channels})")
  if (head_index is None) != (num_heads == 1):
    raise ValueError(f"head_index must be given exactly when num_heads > 1 (got {num_heads})")

  def own_head(outputs: jax.Array) -> jax.Array:
    if head_index is None:
      return outputs
    return own_channels(outputs, head_index, channels=out_channels)

  # Bias-free like every StarGAN generator conv, so the "tanh" parameters match the reference.
  head = own_head(nn.Conv(num_heads * out_channels, (7, 7), padding=((3, 3), (3, 3)),
                          use_bias=False, dtype=dtype,
                          kernel_init=nn.initializers.zeros if kind == "residual"
                          else nn.linear.default_kernel_init, name=name)(features)
                  ).astype(jnp.float32)
  image = image.astype(jnp.float32)
  if kind == "tanh":
    return jnp.tanh(head)
  if kind == "residual":
    return jnp.tanh(head + jnp.arctanh(jnp.clip(image, -_SKIP_LIMIT, _SKIP_LIMIT)))
  # The mask's logits in float32 before the sigmoid, as the head's before the tanh.
  mask = nn.sigmoid(own_head(nn.Conv(num_heads * out_channels, (7, 7), padding=((3, 3), (3, 3)),
                                     dtype=dtype, kernel_init=nn.initializers.zeros,
                                     name=name + "_mask")(features)).astype(jnp.float32))
  return mask * image + (1.0 - mask) * jnp.tanh(head)


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
  raise ValueError(f"unknown generator norm {kind!r} (known: {', '.join(GENERATOR_NORMS)})")


def generator_encoder(image: jax.Array, target_modality: jax.Array, norm, *, base_features: int,
                      num_residual: int, num_modalities: int, prefix: str,
                      dtype, strided_conv: str = "xla") -> tuple[jax.Array, int]:
  """StarGAN's encoder and bottleneck, for `Generator` and `uagan.UnifiedNet`.

  The image with the target's one-hot planes through the 7x7 stem, two 4x4 stride-2 downs and
  ``num_residual`` residual blocks, every conv bias-free and followed by ``norm`` (a
  `generator_norm` factory) and ReLU. Call inside a compact module: the layers become its children
  ``"stem"``, ``"stem_norm"``, ``"down<l>"``, ``"down<l>_norm"``, ``"res<b>_conv<i>"`` and
  ``"res<b>_norm<i>"``, each name preceded by ``prefix``. The downs are computed as
  ``strided_conv`` says (`strided_conv.down_conv`).

  Returns:
    The bottleneck features [B, H/4, W/4, 4 * base_features] and their width.
  """
  # A bias before InstanceNorm is redundant (the norm subtracts each channel's mean), as in
  # StarGAN, which builds these convs with bias=False.
  _, height, width, _ = image.shape
  x = jnp.concatenate(
      [image.astype(dtype),
       modality_planes(target_modality, num_modalities=num_modalities, height=height,
                       width=width, dtype=dtype)], axis=-1)
  x = nn.Conv(base_features, (7, 7), padding=((3, 3), (3, 3)), use_bias=False, dtype=dtype,
              name=f"{prefix}stem")(x)
  x = nn.relu(norm(f"{prefix}stem_norm")(x))
  features = base_features
  for level in range(2):
    features *= 2
    x = down_conv(features, use_bias=False, dtype=dtype, name=f"{prefix}down{level}",
                  implementation=strided_conv)(x)
    x = nn.relu(norm(f"{prefix}down{level}_norm")(x))
  for block in range(num_residual):
    # StarGAN's residual block: no activation after the sum.
    y = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                name=f"{prefix}res{block}_conv0")(x)
    y = nn.relu(norm(f"{prefix}res{block}_norm0")(y))
    y = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                name=f"{prefix}res{block}_conv1")(y)
    x = x + norm(f"{prefix}res{block}_norm1")(y)
  return x, features


def generator_up(x: jax.Array, features: int, norm, *, name: str, dtype,
                 strided_conv: str = "xla") -> jax.Array:
  """One StarGAN up block: 4x4 stride-2 transposed conv ``name`` (bias-free, computed as
  ``strided_conv`` says, `strided_conv.up_conv`), ``norm`` (``name + "_norm"``), ReLU."""
  x = up_conv(features, use_bias=False, dtype=dtype, name=name, implementation=strided_conv)(x)
  return nn.relu(norm(f"{name}_norm")(x))


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
    output: one of GENERATOR_OUTPUTS (see `generator_output`); ``"tanh"`` is StarGAN.
    dtype: computation dtype (parameters stay float32).
    strided_conv: how the 4x4 stride-2 convs are computed, ``"xla"`` or ``"im2col"``
      (`strided_conv.down_conv`; the same parameters either way).
  """
  base_features: int = 64
  num_residual: int = 6
  num_modalities: int = 4
  out_channels: int = 1
  norm: str = "instance"
  output: str = "tanh"
  dtype: jnp.dtype = jnp.float32
  strided_conv: str = "xla"

  @nn.compact
  def __call__(self, image: jax.Array, target_modality: jax.Array) -> jax.Array:
    """Translates ``image`` into ``target_modality``.

    Args:
      image: [B, H, W, C] source images, H and W divisible by 4.
      target_modality: [B] integer modality ids to translate into.

    Returns:
      The translated images [B, H, W, out_channels] in [-1, 1] (float32).
    """
    instance_norm = generator_norm(self.norm, target_modality, num_modalities=self.num_modalities,
                                   dtype=self.dtype)
    x, features = generator_encoder(image, target_modality, instance_norm,
                                    base_features=self.base_features,
                                    num_residual=self.num_residual,
                                    num_modalities=self.num_modalities, prefix="", dtype=self.dtype,
                                    strided_conv=self.strided_conv)
    for level in range(2):
      features //= 2
      x = generator_up(x, features, instance_norm, name=f"up{level}", dtype=self.dtype,
                       strided_conv=self.strided_conv)
    return generator_output(x, image, kind=self.output, out_channels=self.out_channels,
                            name="head", dtype=self.dtype)


class Discriminator(nn.Module):
  """StarGAN PatchGAN discriminator with an auxiliary modality classifier.

  ``num_layers`` 4x4 stride-2 convs with LeakyReLU(0.01) and no normalisation: the WGAN-GP penalty
  takes the gradient of each example's score with respect to that example only, which batch
  statistics would break. Two heads share the trunk: ``src``, a 3x3 conv to one channel (a
  real/fake score per patch), and ``cls``, a conv whose kernel covers the whole remaining feature
  map (``VALID`` padding), so it collapses to one logit per modality.

  With ``per_modality_scores`` the ``src`` head has one real/fake channel per modality and each
  image is scored by its modality's (StarGAN v2's multi-task discriminator, Choi et al. 2020): is
  this a real T1ce, rather than is this real and, separately, which modality is it. Synthetic T1
  and T1ce differ only in the tumour, as real ones mostly do; on a slice without tumour the
  classifier cannot tell them apart, and its loss then rewards G for any change that makes the
  logits confident, rather than for a T1ce that looks real.

  Attributes:
    base_features: width of the first conv; each further level doubles it.
    num_layers: stride-2 levels; H and W must be divisible by ``2 ** num_layers`` (6 for 128x128
      images in StarGAN, leaving a 2x2 map).
    num_modalities: classifier outputs (and ``src`` channels with ``per_modality_scores``).
    per_modality_scores: one real/fake score map per modality, chosen by ``modality``.
    dtype: computation dtype (parameters stay float32).
    strided_conv: how the 4x4 stride-2 convs are computed, ``"xla"`` or ``"im2col"``
      (`strided_conv.down_conv`; the same parameters either way).
  """
  base_features: int = 64
  num_layers: int = 6
  num_modalities: int = 4
  per_modality_scores: bool = False
  dtype: jnp.dtype = jnp.float32
  strided_conv: str = "xla"

  @nn.compact
  def __call__(self, image: jax.Array,
               modality: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Scores ``image`` as real or fake and classifies its modality.

    Args:
      image: [B, H, W, C] images, H and W divisible by ``2 ** num_layers``.
      modality: [B] modality ids whose score map each image gets; given exactly when
        ``per_modality_scores``.

    Returns:
      ``(src, cls_logits)``: the real/fake map [B, H / 2**L, W / 2**L, 1] and the modality
      logits [B, num_modalities], both float32.

    Raises:
      ValueError: if H or W is not divisible by ``2 ** num_layers``, or ``modality`` is given
        without ``per_modality_scores`` or missing with it.
    """
    if (modality is None) == self.per_modality_scores:
      raise ValueError("modality must be given exactly when per_modality_scores is set")
    _, height, width, _ = image.shape
    factor = 2 ** self.num_layers
    if height % factor or width % factor:
      raise ValueError(f"image size {height}x{width} is not divisible by 2**num_layers = {factor}")
    x = image.astype(self.dtype)
    for level in range(self.num_layers):
      x = down_conv(self.base_features * 2 ** level, dtype=self.dtype, name=f"down{level}",
                    implementation=self.strided_conv)(x)
      x = nn.leaky_relu(x, 0.01)
    # Both heads are bias-free in StarGAN; a bias on the WGAN score cancels in the critic loss.
    src = nn.Conv(self.num_modalities if self.per_modality_scores else 1, (3, 3),
                  padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype, name="src")(x)
    if self.per_modality_scores:
      src = own_channels(src, modality, channels=1)
    cls_logits = nn.Conv(self.num_modalities, (height // factor, width // factor), padding="VALID",
                         use_bias=False, dtype=self.dtype, name="cls")(x)
    return src.astype(jnp.float32), cls_logits.reshape(cls_logits.shape[0], -1).astype(jnp.float32)
