"""SegAN (Xue et al. 2018): segmentor S + multi-scale L1 critic C, one model for every modality.

The unpaired protocol: each training patient contributes one modality (seeded round-robin); S is
conditioned on the modality, so one network segments WT/TC/ET from any single modality.

One departure from SegAN, two keys away: S also trains on Dice (loss.dice_weight, on in the base
config) and BCE (loss.bce_weight), as the multi-scale L1 alone trains slowly; SegAN's loss alone is
`--config.loss.dice_weight=0 --config.loss.bce_weight=0`. Measurements: docs/EXPERIMENTS.md. The
widths, slice size, critic (weight clipping) and learning rates are the base config's
(uagan_jax/config.py).

Full recipe (BraTS-sized slices, SegAN widths; a GPU run):
  uagan-jax train --config configs/segan.py --data /data/BraTS2021 --workdir runs/segan

CPU demo (what `bash launch/demo.sh` runs: small slices and widths, a few minutes on 2 cores):
  uagan-jax synth --out data_synth --cases 80 --shape 96 96 64
  uagan-jax train --config configs/segan.py:demo --data data_synth --workdir runs/demo
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "segan"  # the base's family too; named here as it is what makes the recipe
  c.loss.bce_weight = 1.0  # the departure above, with the base's Dice
  c.optim.decay_every = 10_000
  c.train.steps = 40_000
  config_lib.apply_full_recipe_augmentations(c)  # nnU-Net-like; off in :demo

  if variant == "demo":
    config_lib.apply_demo_sizes(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo)")
  return c
