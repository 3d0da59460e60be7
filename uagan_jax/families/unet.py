"""unet: the segmentor alone, trained with Dice + BCE (the baseline every paper compares with).

The family protocol (docs/ARCHITECTURE.md): `build_networks`, `init_specs`, `train_phases`, and,
as it segments, `SEGMENTATION_ROLE` and `segment_fn`.
"""

from __future__ import annotations

import jax

from uagan_jax.families import shared
from uagan_jax.train_state import InitSpec, Networks

SEGMENTATION_ROLE = "segmentor"


def build_networks(config, *, bn_axis_name) -> Networks:
  return Networks(modules={"segmentor": shared.segmentor(config, bn_axis_name=bn_axis_name)},
                  optimizers={"segmentor": shared.adam(config, config.optim.segmentor_lr)})


def init_specs(config, networks) -> dict[str, InitSpec]:
  del networks
  return {"segmentor": InitSpec(args=shared.example_image(config), kwargs={"train": False})}


def train_phases(state, inputs, *, networks, config):
  return shared.segmentation_phases(state, inputs, networks=networks, config=config,
                                     with_critic=False)


def segment_fn(networks, config):
  """``probs(variables, images [B,H,W,1], modality [B]) -> [B,H,W,3]`` region probabilities."""
  del config
  module = networks[SEGMENTATION_ROLE]

  def probs(variables, images, modality):
    return jax.nn.sigmoid(module.apply(variables, images, modality, train=False))

  return probs
