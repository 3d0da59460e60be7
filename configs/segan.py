"""SegAN (Xue et al. 2018): segmentor S + multi-scale L1 critic C, one model for every modality.

The unpaired protocol: each training patient contributes one modality (seeded round-robin); S is
conditioned on the modality, so one network segments WT/TC/ET from any single modality.

Full recipe (BraTS-sized slices, SegAN widths; a GPU run):
  uagan-jax train --config configs/segan.py --data /data/BraTS2021 --workdir runs/segan

CPU demo (what `bash launch/demo.sh` runs: small slices and widths, a few minutes on 2 cores):
  uagan-jax synth --out data_synth --cases 80 --shape 96 96 64
  uagan-jax train --config configs/segan.py:demo --data data_synth --workdir runs/demo
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "segan"
  c.model.segmentor_features = (64, 128, 256, 512)
  c.model.critic_features = (64, 128, 256)
  c.data.image_size = (192, 192)
  c.loss.adversarial_weight = 1.0
  # SegAN's multi-scale L1 alone trains slowly; the Dice and BCE terms are the optional extras.
  c.loss.dice_weight = 1.0
  c.loss.bce_weight = 1.0
  c.loss.critic_constraint = "clip"
  c.optim.segmentor_lr = 2e-4
  c.optim.critic_lr = 2e-4
  c.optim.decay_every = 10_000
  c.train.steps = 40_000
  c.train.batch_size = 16

  if variant == "demo":
    config_lib.apply_demo_sizes(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo)")
  return c
