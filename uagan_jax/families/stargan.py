"""stargan: StarGAN's generator G and discriminator D translate any modality into any other.

D ascends WGAN-GP (real vs G's translations) plus the classification of real modalities; G then
descends the WGAN term against the updated D, the classification of its translation as the
target modality, and the cycle L1 back to the source (Choi et al. 2018). G sees the image scaled
into tanh's [-1, 1] by the z-score clip.
"""

from __future__ import annotations

from uagan_jax.families import shared
from uagan_jax.train_state import InitSpec, Networks

TRANSLATION_ROLE = "generator"


def build_networks(config, *, bn_axis_name) -> Networks:
  del bn_axis_name  # instance norm only: nothing is averaged across devices
  return Networks(
      modules={"generator": shared.generator(config),
               "discriminator": shared.discriminator(config)},
      optimizers={"generator": shared.adam(config, config.optim.generator_lr),
                  "discriminator": shared.adam(config, config.optim.discriminator_lr)})


def init_specs(config, networks):
  return {"generator": InitSpec(args=shared.example_image(config)),
          "discriminator": shared.discriminator_init_spec(config, networks["discriminator"])}


def train_phases(state, inputs, *, networks, config):
  """D ascends, then G descends against the updated D (`shared.translation_phases`)."""
  generator = networks["generator"]

  def generate(params, batch_stats, real, source, target):
    fake = generator.apply({"params": params}, real, target)
    reconstructed = generator.apply({"params": params}, fake, source)
    outputs = {"fake": fake, "reconstructed": reconstructed}
    if config.loss.identity_weight > 0:
      outputs["same_domain"] = generator.apply({"params": params}, real, source)
    return outputs, batch_stats

  return shared.translation_phases(state, inputs, role="generator", generate=generate,
                                   networks=networks, config=config)


def translate_fn(networks, config):
  """``translate(variables, images, source, target)``: normalised slices in, normalised out."""
  module = networks[TRANSLATION_ROLE]
  clip = config.data.clip

  def translate(variables, images, source, target):
    del source  # StarGAN's G is told the target only
    return module.apply(variables, images / clip, target) * clip

  return translate
