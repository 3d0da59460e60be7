"""The baseline: the segmentor alone, trained with Dice + BCE (no critic, no translation).

The same network as SegAN's S, conditioned on the modality, on the same unpaired data, so the
comparison isolates what the adversarial critic (segan) and the translation stream (uagan) add.

  uagan-jax train --config configs/unet.py --data /data/BraTS2021 --workdir runs/unet
  uagan-jax train --config configs/unet.py:demo --data data_synth --workdir runs/unet_demo
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "unet"
  c.model.segmentor_features = (64, 128, 256, 512)
  c.data.image_size = (192, 192)
  c.loss.dice_weight = 1.0
  c.loss.bce_weight = 1.0
  c.optim.segmentor_lr = 2e-4
  c.optim.decay_every = 10_000
  c.train.steps = 40_000
  c.train.batch_size = 16
  if variant == "demo":
    config_lib.apply_demo_sizes(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo)")
  return c
