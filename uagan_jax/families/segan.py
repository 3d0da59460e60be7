"""segan: SegAN's segmentor S and multi-scale L1 critic C in a min-max game (Xue et al. 2018).

C ascends the multi-scale L1 between the image masked by S's prediction and by the truth; S then
descends it (with optional Dice and BCE terms) against the updated C, in the same step. Inference
is S alone, as in `unet`.
"""

from __future__ import annotations

from uagan_jax.families import shared, unet
from uagan_jax.train_state import Networks

SEGMENTATION_ROLE = unet.SEGMENTATION_ROLE
segment_fn = unet.segment_fn


def build_networks(config, *, bn_axis_name) -> Networks:
  return Networks(
      modules={"segmentor": shared.segmentor(config, bn_axis_name=bn_axis_name),
               "critic": shared.critic(config, bn_axis_name=bn_axis_name)},
      optimizers={"segmentor": shared.adam(config, config.optim.segmentor_lr),
                  "critic": shared.adam(config, config.optim.critic_lr)})


def init_specs(config, networks):
  return {**unet.init_specs(config, networks), "critic": shared.critic_init_spec(config)}


def train_phases(state, inputs, *, networks, config):
  return shared.segmentation_phases(state, inputs, networks=networks, config=config,
                                     with_critic=True)
