"""uagan: one network translates any modality into any other and segments from any single one.

`models.uagan.UnifiedNet` holds StarGAN's translation stream and SegAN's segmentation stream,
exchanging decoder features through attention gates; StarGAN's D judges the translations, SegAN's
C the segmentations (Yuan et al. 2019). A step: D and C ascend, then the unified network descends
the translation terms, the segmentation terms and the shape loss (the translated image,
segmented as its target modality, must match the source's ground truth), all from one forward
pass whose VJP is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from uagan_jax import losses, parallel
from uagan_jax.data import MODALITIES
from uagan_jax.families import shared
from uagan_jax.models import uagan as uagan_models
from uagan_jax.train_state import InitSpec, Networks

SEGMENTATION_ROLE = TRANSLATION_ROLE = "unified"
# Top-level parameter names of the translation stream (and of the gate that feeds it); the rest
# is the segmentation stream.
TRANSLATION_PREFIXES = ("gen_", "fuse_seg_to_gen")


def param_stream(top_level_name: str) -> str:
  """"generator" or "segmentor": whose learning rate a top-level parameter of UnifiedNet follows."""
  return "generator" if top_level_name.startswith(TRANSLATION_PREFIXES) else "segmentor"


def param_streams(params: dict) -> dict:
  """The unified optimizer's partition: every leaf of ``params`` labelled with its stream."""
  return {name: jax.tree.map(lambda _, n=name: param_stream(n), subtree)
          for name, subtree in params.items()}


def build_networks(config, *, bn_axis_name) -> Networks:
  m = config.model
  unified = uagan_models.UnifiedNet(
      seg_features=tuple(m.segmentor_features), gen_features=m.generator_features,
      num_residual=m.generator_residual_blocks, num_modalities=len(MODALITIES), fuse=m.fuse,
      fuse_reverse=m.fuse_reverse, fuse_reverse_stop_gradient=m.fuse_reverse_stop_gradient,
      gen_norm=m.generator_norm, gen_output=m.generator_output,
      gen_pair_heads=m.generator_pair_heads, bn_axis_name=bn_axis_name, dtype=jnp.dtype(m.dtype),
      strided_conv=m.strided_conv, resize=m.resize)
  # One module, two learning rates: the translation stream's parameters (and the gates that feed
  # it) follow the generator's, the rest the segmentor's.
  unified_optimizer = optax.multi_transform(
      {"generator": shared.adam(config, config.optim.generator_lr),
       "segmentor": shared.adam(config, config.optim.segmentor_lr)}, param_streams)
  return Networks(
      modules={"unified": unified, "critic": shared.critic(config, bn_axis_name=bn_axis_name),
               "discriminator": shared.discriminator(config)},
      optimizers={"unified": unified_optimizer,
                  "critic": shared.adam(config, config.optim.critic_lr),
                  "discriminator": shared.adam(config, config.optim.discriminator_lr)})


def init_specs(config, networks):
  image, modality = shared.example_image(config)
  return {"unified": InitSpec(args=(image, modality, modality), kwargs={"train": False}),
          "critic": shared.critic_init_spec(config),
          "discriminator": shared.discriminator_init_spec(config, networks["discriminator"])}


def train_phases(state, inputs, *, networks, config):
  """D and C ascend, then the unified network descends translation + segmentation + shape.

  The unified network translates the source image (scaled into tanh's [-1, 1] by the z-score
  clip) into a random other modality while segmenting it (conditioned on its modality); on the
  second pass it translates back (cycle) and segments the translation as the target modality
  (shape loss). The phases are StarGAN's (`shared.translation_phases`) plus C's update and the
  segmentation and shape terms.
  """
  clip = config.data.clip
  unified = networks["unified"]

  def generate(params, batch_stats, real, source, target):
    variables = {"params": params, "batch_stats": batch_stats}
    (fake, logits), new_vars = unified.apply(
        variables, inputs.image, source, target, train=True, translation_input=real,
        mutable=["batch_stats"])
    # Second pass: back to the source modality (cycle), and the translated image segmented as
    # the target modality (shape loss). Its batch statistics (of generated images) are not kept.
    (reconstructed, fake_logits), _ = unified.apply(
        variables, fake * clip, target, source, train=True, translation_input=fake,
        mutable=["batch_stats"])
    outputs = {"fake": fake, "reconstructed": reconstructed, "logits": logits,
               "fake_logits": fake_logits}
    if config.loss.identity_weight > 0:
      # Asked for its own modality, G should copy. Only the translation is used, so XLA drops
      # this pass's segmentation stream (without fuse_reverse the translation does not need it).
      (outputs["same_domain"], _), _ = unified.apply(
          variables, inputs.image, source, source, train=True, translation_input=real,
          mutable=["batch_stats"])
    return outputs, new_vars["batch_stats"]

  def update_critic(new_nets, outputs):
    new_nets["critic"], metrics, grads = shared.update_critic(
        state.nets["critic"], inputs, jax.nn.sigmoid(outputs["logits"]), networks=networks,
        config=config)
    return metrics, {"critic": grads}

  def segmentation_and_shape(outputs, total, terms, new_nets):
    seg_total, seg_terms = shared.segmentation_terms(
        outputs["logits"], inputs, new_nets["critic"].params, networks=networks, config=config)
    terms.update(seg_terms)
    region_weights = tuple(config.loss.region_weights) or None
    if config.loss.shape_loss == "weighted_ce":  # UAGAN's code: S's own loss on the translation
      terms["seg/shape"] = losses.class_weighted_cross_entropy(
          logits=outputs["fake_logits"], targets=inputs.regions,
          class_weights=tuple(config.loss.ce_class_weights), region_weights=region_weights)
    else:
      terms["seg/shape"] = losses.shape_loss(
          logits_translated=outputs["fake_logits"], targets=inputs.regions,
          region_weights=region_weights, dice_reduction=config.loss.dice_reduction,
          axis_name=parallel.AXIS, groups=inputs.modality, num_groups=len(MODALITIES))
    terms["seg/shape_weight"] = losses.ramp_weight(
        state.step, max_weight=config.loss.shape_weight, ramp_steps=config.loss.shape_ramp_steps)
    return total + seg_total + terms["seg/shape_weight"] * terms["seg/shape"]

  return shared.translation_phases(state, inputs, role="unified", generate=generate,
                                   networks=networks, config=config,
                                   update_other_critics=update_critic,
                                   extend_objective=segmentation_and_shape)


def segment_fn(networks, config):
  """``probs(variables, images, modality)``: the segmentation stream's region probabilities.

  The segmentation stream takes the translation stream's features through the fusion gates, and
  in training that stream always translates into *another* modality. So the prediction is the
  mean over every other trained modality as the target (with a single trained modality, the
  target is the source itself).
  """
  module = networks[SEGMENTATION_ROLE]
  clip = config.data.clip
  allowed = [MODALITIES.index(m) for m in config.data.modalities]

  def probs(variables, images, modality):
    total = 0.0
    for offset in range(1, max(len(allowed), 2)):
      position = jnp.argmax(jnp.asarray(allowed) == modality[:, None], axis=-1)
      target = jnp.asarray(allowed)[(position + offset) % len(allowed)]
      _, logits = module.apply(variables, images, modality, target, train=False,
                               translation_input=images / clip)
      total = total + jax.nn.sigmoid(logits)
    return total / max(len(allowed) - 1, 1)

  return probs


def translate_fn(networks, config):
  """``translate(variables, images, source, target)``: normalised slices in, normalised out."""
  module = networks[TRANSLATION_ROLE]
  clip = config.data.clip

  def translate(variables, images, source, target):
    translated, _ = module.apply(variables, images, source, target, train=False,
                                 translation_input=images / clip)
    return translated * clip

  return translate
