"""UAGAN (Yuan et al. 2019), the default: one network translates any modality into any other and
segments the tumour from any single modality, trained on unpaired images.

The translation stream (StarGAN's G) and the segmentation stream (SegAN's S) exchange decoder
features through attention gates in both directions (model.fuse, model.fuse_reverse); D (WGAN-GP
+ modality classifier) and C (SegAN's multi-scale L1 critic) judge them; the shape loss asks the
segmentation of the translated image to match the source's ground truth. Four departures from the
papers, each measured in README "How it works": G blends copying and drawing, G has one output
head per source-target pair, D has one real/fake map per modality, and the reverse gate reads the
segmentation stream behind a stop-gradient; the classification weight is halved.

  uagan-jax train --config configs/uagan.py --data /data/BraTS2021 --workdir runs/uagan
  uagan-jax train --config configs/uagan.py:demo --data data_synth --workdir runs/uagan_demo
  uagan-jax train --config configs/uagan.py:demo --config.model.fuse=false ...   # the ablation
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "uagan"
  c.model.segmentor_features = (64, 128, 256, 512)
  c.model.critic_features = (64, 128, 256)
  c.model.generator_features = 64
  c.model.generator_residual_blocks = 6
  c.model.discriminator_features = 64
  c.model.discriminator_layers = 6
  c.data.image_size = (192, 192)
  c.loss.dice_weight = 1.0
  c.loss.bce_weight = 1.0
  c.loss.shape_weight = 1.0
  c.loss.shape_ramp_steps = 2_000
  # G mixes, pixel by pixel, copying its input and drawing anew (models/stargan.py
  # generator_output): modalities share anatomy, but some pairs invert the contrast.
  c.model.generator_output = "blend"
  # T1 -> T1ce must copy all but the tumour, T1 -> T2 invert the contrast: each pair gets its own
  # head on the shared decoder features.
  c.model.generator_pair_heads = True
  # D's classifier cannot tell T1 from T1ce where there is no tumour; a real/fake map per modality
  # judges each image as the modality it claims to be.
  c.model.discriminator_per_modality = True
  # G sees where the segmentation stream finds the tumour (the part of T1 -> T1ce that is not a
  # copy), but the translation losses do not train the segmentation stream through that gate.
  c.model.fuse_reverse = True
  c.model.fuse_reverse_stop_gradient = True
  # The classification loss is what pulls G off its input; at 1 it also pulls T1 <-> T1ce off
  # the anatomy (README, "How it works").
  c.loss.cls_weight = 0.5
  c.optim.segmentor_lr = 2e-4
  c.optim.critic_lr = 2e-4
  c.optim.generator_lr = 1e-4
  c.optim.discriminator_lr = 1e-4
  c.train.n_critic = 1
  c.train.steps = 40_000
  c.train.batch_size = 16
  if variant == "demo":
    config_lib.apply_demo_sizes(c)
    # The shape loss asks S to segment G's images; ramp it over the whole short run, as G only
    # learns to translate during it.
    c.loss.shape_ramp_steps = 600
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo)")
  return c
