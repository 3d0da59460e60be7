"""UAGAN's two-stream network (Yuan et al. 2019): translation and segmentation, fused by attention.

One module holds both streams so that they can exchange features level by level:

* the translation stream is StarGAN's generator (7x7 stem, two 4x4 stride-2 downs, residual
  blocks, two 4x4 stride-2 transposed-conv ups, 7x7 head, tanh; instance norm), conditioned on
  the *target* modality;
* the segmentation stream is SegAN's segmentor (4x4 stride-2 encoder, bilinear-resize + 3x3
  decoder with skips), conditioned on the *source* modality, one logit map per region.

Both decoders pass through the resolutions H/2 and H. There the segmentation stream receives the
translation stream's feature through an attention gate, ``W_o (f * sigmoid(W_g f))`` added to its
own feature, and, when ``fuse_reverse`` is set, the translation stream receives the segmentation
stream's feature the same way. With ``fuse=False`` the two streams are independent (the ablation).
The layers are those of `segan.Segmentor` and `stargan.Generator`, built by the same helpers
(``segan.segmentor_encoder``, ``segmentor_up``, ``stargan.generator_encoder``, ``generator_up``)
under names prefixed ``seg_`` and ``gen_``; the two decoders are interleaved here so that the
gates can exchange their features. With ``fuse=False`` the two streams compute exactly what
Generator and Segmentor do (tests/test_models_uagan.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uagan_jax.models import segan, stargan


class AttentionGate(nn.Module):
  """``W_o (f * sigmoid(W_g f))``: what one stream lets through to the other, at its width.

  ``W_o`` starts at zero, so at initialisation each stream is exactly its single-task network and
  a stream only lets the other's features in as far as training finds them useful, instead of
  adding an untrained stream's features at full scale from the first step. The gradient of
  ``W_o`` is not zero at zero, so the gate still learns.
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, other: jax.Array) -> jax.Array:
    gate = nn.sigmoid(nn.Conv(other.shape[-1], (1, 1), dtype=self.dtype, name="gate")(other))
    return nn.Conv(self.features, (1, 1), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                   name="out")(other * gate)


class UnifiedNet(nn.Module):
  """Translation and segmentation streams with attention fusion between their decoders.

  Attributes:
    seg_features: SegAN encoder widths.
    gen_features: StarGAN stem width (downs double it twice).
    num_residual: StarGAN residual blocks.
    num_regions: segmentation maps.
    num_modalities: size of the modality one-hots.
    fuse: attention fusion from the translation into the segmentation stream.
    fuse_reverse: also from the segmentation into the translation stream.
    fuse_reverse_stop_gradient: the reverse gate reads the segmentation stream's feature without
      passing gradients back into it, so the translation losses train the gate but not the
      segmentation stream.
    gen_norm: the translation stream's normalisation (`stargan.generator_norm`).
    gen_output: how the translation stream's head becomes the image (`stargan.generator_output`).
    gen_pair_heads: one output head (and mask head) per source-target pair instead of one shared
      head, see ``model.generator_pair_heads`` in config.py.
    bn_axis_name: axis for the segmentation stream's BatchNorm statistics (see `Segmentor`).
    dtype: computation dtype.
    strided_conv: how both streams' 4x4 stride-2 convs and the translation stream's transposed
      convs are computed (`strided_conv.down_conv`, `strided_conv.up_conv`; the same parameters
      whichever).
    resize: how the segmentation stream's bilinear x2 is computed (`segan.upsample2x`).
  """
  seg_features: Sequence[int] = (64, 128, 256, 512)
  gen_features: int = 64
  num_residual: int = 6
  num_regions: int = 3
  num_modalities: int = 4
  fuse: bool = True
  fuse_reverse: bool = True
  fuse_reverse_stop_gradient: bool = False
  gen_norm: str = "instance"
  gen_output: str = "tanh"
  gen_pair_heads: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  strided_conv: str = "xla"
  resize: str = "jax_image"

  @nn.compact
  def __call__(self, image: jax.Array, source_modality: jax.Array, target_modality: jax.Array, *,
               train: bool, translation_input: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Translates ``image`` into ``target_modality`` and segments it.

    Args:
      image: [B, H, W, 1] normalised image of ``source_modality`` (the segmentation input).
      source_modality: [B] ids conditioning the segmentation stream.
      target_modality: [B] ids conditioning the translation stream.
      train: BatchNorm mode of the segmentation stream.
      translation_input: the translation stream's input, default ``image``; the step passes the
        image scaled into tanh's [-1, 1].

    Returns:
      ``(translated [B, H, W, 1] in [-1, 1], segmentation logits [B, H, W, num_regions])``.
    """
    dt = self.dtype
    batch_norm = segan.segmentor_batch_norm(train=train, axis_name=self.bn_axis_name, dtype=dt)
    instance_norm = stargan.generator_norm(self.gen_norm, target_modality,
                                           num_modalities=self.num_modalities, dtype=dt)
    translation_input = image if translation_input is None else translation_input

    # Translation stream: encoder and bottleneck.
    g, width_g = stargan.generator_encoder(
        translation_input, target_modality, instance_norm, base_features=self.gen_features,
        num_residual=self.num_residual, num_modalities=self.num_modalities, prefix="gen_",
        dtype=dt, strided_conv=self.strided_conv)

    # Segmentation stream: encoder, then decoder down to H/4.
    s, skips = segan.segmentor_encoder(image, source_modality, batch_norm,
                                       features=self.seg_features,
                                       num_modalities=self.num_modalities, prefix="seg_", dtype=dt,
                                       strided_conv=self.strided_conv)
    for level in reversed(range(1, len(self.seg_features) - 1)):
      s = segan.segmentor_up(s, self.seg_features[level], batch_norm, name=f"seg_up{level}",
                             dtype=dt, resize=self.resize)
      s = jnp.concatenate([s, skips[level]], axis=-1)

    # The two decoders side by side at H/2 and H, exchanging features.
    for level, seg_width in ((0, self.seg_features[0]), (1, self.seg_features[0])):
      width_g //= 2
      g = stargan.generator_up(g, width_g, instance_norm, name=f"gen_up{level}", dtype=dt,
                               strided_conv=self.strided_conv)
      s = segan.segmentor_up(s, seg_width, batch_norm,
                             name="seg_up0" if level == 0 else "seg_head_conv", dtype=dt,
                             resize=self.resize)
      if self.fuse:
        fused_s = s + AttentionGate(seg_width, dtype=dt, name=f"fuse_gen_to_seg{level}")(g)
        if self.fuse_reverse:
          seg_view = jax.lax.stop_gradient(s) if self.fuse_reverse_stop_gradient else s
          g = g + AttentionGate(width_g, dtype=dt, name=f"fuse_seg_to_gen{level}")(seg_view)
        s = fused_s
      if level == 0 and len(skips) > 0:
        s = jnp.concatenate([s, skips[0]], axis=-1)

    pair = source_modality * self.num_modalities + target_modality if self.gen_pair_heads else None
    translated = stargan.generator_output(
        g, translation_input, kind=self.gen_output, out_channels=1, name="gen_head", dtype=dt,
        head_index=pair, num_heads=self.num_modalities ** 2 if self.gen_pair_heads else 1)
    logits = nn.Conv(self.num_regions, (3, 3), dtype=dt, name="seg_logits")(s).astype(jnp.float32)
    return translated, logits
