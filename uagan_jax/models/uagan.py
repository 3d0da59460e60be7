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
The layers are the same as in `segan.Segmentor` and `stargan.Generator`; they are written out
here because the fusion interleaves the two decoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uagan_jax.models import stargan
from uagan_jax.models.segan import _DOWN, modality_planes, upsample2x


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
    _, height, width, _ = image.shape
    planes = lambda m: modality_planes(m, num_modalities=self.num_modalities, height=height,
                                       width=width, dtype=dt)
    batch_norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                      axis_name=self.bn_axis_name if train else None, dtype=dt)
    instance_norm = stargan.generator_norm(self.gen_norm, target_modality,
                                           num_modalities=self.num_modalities, dtype=dt)
    translation_input = image if translation_input is None else translation_input

    # Translation stream: encoder and bottleneck.
    g = jnp.concatenate([translation_input.astype(dt), planes(target_modality)], axis=-1)
    g = nn.relu(instance_norm("gen_stem_norm")(
        nn.Conv(self.gen_features, (7, 7), padding=((3, 3), (3, 3)), use_bias=False, dtype=dt,
                name="gen_stem")(g)))
    width_g = self.gen_features
    for level in range(2):
      width_g *= 2
      g = nn.Conv(width_g, **_DOWN, use_bias=False, dtype=dt, name=f"gen_down{level}")(g)
      g = nn.relu(instance_norm(f"gen_down{level}_norm")(g))
    for block in range(self.num_residual):
      y = nn.Conv(width_g, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt,
                  name=f"gen_res{block}_conv0")(g)
      y = nn.relu(instance_norm(f"gen_res{block}_norm0")(y))
      y = nn.Conv(width_g, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt,
                  name=f"gen_res{block}_conv1")(y)
      g = g + instance_norm(f"gen_res{block}_norm1")(y)

    # Segmentation stream: encoder, then decoder down to H/4.
    s = jnp.concatenate([image.astype(dt), planes(source_modality)], axis=-1)
    skips = []
    for level, width_s in enumerate(self.seg_features):
      s = nn.Conv(width_s, **_DOWN, use_bias=level == 0, dtype=dt, name=f"seg_down{level}")(s)
      if level > 0:
        s = batch_norm()(s)
      s = nn.leaky_relu(s, 0.2)
      skips.append(s)
    skips.pop()
    for level in reversed(range(1, len(self.seg_features) - 1)):
      s = upsample2x(s)
      s = nn.Conv(self.seg_features[level], (3, 3), use_bias=False, dtype=dt, name=f"seg_up{level}")(s)
      s = nn.relu(batch_norm()(s))
      s = jnp.concatenate([s, skips[level]], axis=-1)

    # The two decoders side by side at H/2 and H, exchanging features.
    for level, seg_width in ((0, self.seg_features[0]), (1, self.seg_features[0])):
      width_g //= 2
      g = nn.ConvTranspose(width_g, **stargan._UP, use_bias=False, dtype=dt,  # pylint: disable=protected-access
                           name=f"gen_up{level}")(g)
      g = nn.relu(instance_norm(f"gen_up{level}_norm")(g))
      s = upsample2x(s)
      name = "seg_up0" if level == 0 else "seg_head_conv"
      s = nn.relu(batch_norm()(nn.Conv(seg_width, (3, 3), use_bias=False, dtype=dt, name=name)(s)))
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
