"""StarGAN (Choi et al. 2018) for MRI: any-to-any modality translation, no segmentation.

G translates an image into a target modality (one-hot planes); D scores real/fake patches and
classifies the modality; WGAN-GP, classification and cycle losses; D updates every step, G every
n_critic-th. Training data are unpaired: each patient contributes one modality. The networks'
widths, slice size, loss weights and learning rates are the base config's (uagan_jax/config.py).

One departure from StarGAN, from the base config and one key away: G's norms take a scale and offset
per target modality (model.generator_norm=conditional_instance; `instance` is StarGAN's).
Measurements: docs/EXPERIMENTS.md.

  uagan-jax train --config configs/stargan.py --data /data/BraTS2021 --workdir runs/stargan
  uagan-jax train --config configs/stargan.py:demo --data data_synth --workdir runs/stargan_demo
  uagan-jax translate --workdir runs/stargan_demo --input CASE_t1.nii.gz --source t1 --target flair --output flair.nii.gz
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "stargan"
  c.data.tumour_free_fraction = 0.5  # translation learns from every brain slice
  c.train.n_critic = 5  # StarGAN's
  c.train.steps = 40_000
  # Gradients as canonical convs XLA:CPU runs on Eigen: the :demo step 0.52x the time on one CPU
  # thread, the same sums in another order ("xla" for the previous numbers bit for bit;
  # docs/EXPERIMENTS.md, "Convolution gradients on XLA:CPU's fast path").
  c.model.strided_conv = "canonical_vjp"
  config_lib.apply_full_recipe_augmentations(c)  # nnU-Net-like; off in :demo
  # D judges the intensity-augmented slices G translates as real too (the base's
  # data.augment_discriminator_real=True; false shows D the slices with no intensity change).
  if variant in ("demo", "study"):
    config_lib.apply_cpu_budget(c, variant)
    c.train.n_critic = 1  # within a CPU demo's budget G must learn every step
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo, study)")
  return c
