"""UAGAN (Yuan et al. 2019), the default: one network translates any modality into any other and
segments the tumour from any single modality, trained on unpaired images.

The translation stream (StarGAN's G) and the segmentation stream (SegAN's S) exchange decoder
features through attention gates in both directions (model.fuse, model.fuse_reverse); D (WGAN-GP
+ modality classifier) and C (SegAN's multi-scale L1 critic) judge them; the shape loss asks the
segmentation of the translated image to match the source's ground truth.

Five departures from the papers, set here, each one key away from the published behaviour:
  1. G blends copying its input and drawing anew (model.generator_output=blend; StarGAN's: tanh);
  2. one output head per source-target pair (model.generator_pair_heads; false: one for all);
  3. one real/fake map per modality in D (model.discriminator_per_modality; false: one map);
  4. the reverse gate (model.fuse_reverse) reads the segmentation stream behind a stop-gradient
     (model.fuse_reverse_stop_gradient; false: the translation losses train S through it);
  5. the classification weight is halved (loss.cls_weight=0.5; StarGAN's is 1).
A sixth comes from the base config: G's norms are conditioned on the target modality
(model.generator_norm=conditional_instance; `instance` is StarGAN's). S also trains on Dice and BCE,
as in configs/segan.py. Measurements of each: docs/EXPERIMENTS.md.

  uagan-jax train --config configs/uagan.py --data /data/BraTS2021 --workdir runs/uagan
  uagan-jax train --config configs/uagan.py:demo --data data_synth --workdir runs/uagan_demo
  uagan-jax train --config configs/uagan.py:demo --config.model.fuse=false ...   # the ablation
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "uagan"
  c.loss.bce_weight = 1.0  # with the base's Dice, as configs/segan.py
  c.loss.shape_ramp_steps = 2_000
  # 1. G mixes, pixel by pixel, copying its input and drawing anew (models/stargan.py
  # generator_output): modalities share anatomy, but some pairs invert the contrast.
  c.model.generator_output = "blend"
  # 2. T1 -> T1ce must copy all but the tumour, T1 -> T2 invert the contrast: each pair gets its
  # own head on the shared decoder features.
  c.model.generator_pair_heads = True
  # 3. D's classifier cannot tell T1 from T1ce where there is no tumour; a real/fake map per
  # modality judges each image as the modality it claims to be.
  c.model.discriminator_per_modality = True
  # 4. G sees where the segmentation stream finds the tumour (the part of T1 -> T1ce that is not a
  # copy), but the translation losses do not train the segmentation stream through that gate.
  c.model.fuse_reverse = True
  c.model.fuse_reverse_stop_gradient = True
  # 5. The classification loss is what pulls G off its input; at 1 it also pulls T1 <-> T1ce off
  # the anatomy.
  c.loss.cls_weight = 0.5
  c.train.steps = 40_000
  config_lib.apply_full_recipe_augmentations(c)  # nnU-Net-like; off in :demo
  if variant == "demo":
    config_lib.apply_demo_sizes(c)
    # The shape loss asks S to segment G's images; ramp it over the whole short run, as G only
    # learns to translate during it.
    c.loss.shape_ramp_steps = 600
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo)")
  return c
