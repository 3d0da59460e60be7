"""The baseline: the segmentor alone, trained with Dice + BCE (no critic, no translation).

The same network as SegAN's S, conditioned on the modality, on the same unpaired data, so the
comparison isolates what the adversarial critic (segan) and the translation stream (uagan) add.
The rest (widths, slice size, learning rate, batch) is the base config (uagan_jax/config.py).

  uagan-jax train --config configs/unet.py --data /data/BraTS2021 --workdir runs/unet
  uagan-jax train --config configs/unet.py:demo --data data_synth --workdir runs/unet_demo
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "unet"
  c.loss.bce_weight = 1.0  # with the base's Dice
  c.optim.decay_every = 10_000
  c.train.steps = 40_000
  config_lib.apply_full_recipe_augmentations(c)  # nnU-Net-like; off in :demo
  if variant in ("demo", "study"):
    config_lib.apply_cpu_budget(c, variant)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo, study)")
  return c
