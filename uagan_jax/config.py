"""Configs: the documented base recipe, file loading and ``--config.a.b=value`` overrides.

A config file (``configs/segan.py``) is a runnable recipe: ``get_config(arg=None)`` returns an
``ml_collections.ConfigDict`` built on `base_config` below; ``configs/segan.py:demo`` passes
``"demo"`` as ``arg`` (the big_vision convention for size variants). The returned config is
locked, so a misspelt override is an error, never a silently ignored new key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import pathlib
from collections.abc import Sequence

import ml_collections

from uagan_jax import families
from uagan_jax.data import MODALITIES
from uagan_jax.data.dataset import PROTOCOLS
from uagan_jax.errors import UserError

# How the generator's norm layers see the target modality (uagan_jax/models/stargan.py).
GENERATOR_NORMS = ("instance", "conditional_instance")
# How the generator's last conv becomes the translated image (stargan.generator_output).
GENERATOR_OUTPUTS = ("tanh", "residual", "blend")
# How the 4x4 stride-2 convs and their transposes are computed (uagan_jax/models/strided_conv.py).
STRIDED_CONVS = ("xla", "im2col", "canonical_vjp")
# How the segmentor's bilinear x2 is computed (uagan_jax/models/segan.py, upsample2x).
RESIZES = ("jax_image", "stencil")


def base_config() -> ml_collections.ConfigDict:
  """Every key the code reads, with its default. Recipes override what differs."""
  # The comments say why a default is what it is; what the options measured is in
  # docs/EXPERIMENTS.md.
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for init, data split, modality assignment, sampling and step keys.

  c.model = ml_collections.ConfigDict()
  c.model.name = "segan"  # a model family: uagan_jax/families (unet, segan, stargan, uagan)
  c.model.segmentor_features = (64, 128, 256, 512)
  c.model.critic_features = (64, 128, 256)
  c.model.critic_norm = "batch"  # "batch" (SegAN), "layer" or "none" (use with the gradient penalty)
  c.model.generator_features = 64  # StarGAN generator stem width (stargan, uagan)
  c.model.generator_residual_blocks = 6
  # "conditional_instance": a scale and offset per target modality after every norm of G, as
  # InstanceNorm cancels the constant one-hot target planes; "instance" is StarGAN as published.
  c.model.generator_norm = "conditional_instance"
  # G's head to image: "tanh" is StarGAN as published; "residual" a change of the input; "blend" a
  # per-pixel mix of copying the input and drawing anew, as modalities share the anatomy.
  c.model.generator_output = "tanh"
  # uagan: one output head per source->target pair on shared decoder features, so that copying
  # pairs (T1 <-> T1ce) need not share G's last layer with contrast-inverting ones (T1 -> T2).
  c.model.generator_pair_heads = False
  c.model.discriminator_features = 64
  c.model.discriminator_layers = 6  # data.image_size must be divisible by 2**discriminator_layers
  # stargan, uagan: one real/fake map per modality (StarGAN v2's D), each image judged as the
  # modality it is or claims to be, as D's classifier cannot tell T1 from T1ce without tumour.
  c.model.discriminator_per_modality = False
  c.model.fuse = True  # uagan: attention fusion from the translation into the segmentation stream
  # uagan: and from the segmentation into the translation stream. Off by default, as through it the
  # translation losses (WGAN, classification, cycle) train the segmentation stream's weights.
  c.model.fuse_reverse = False
  # uagan, with fuse_reverse: the reverse gate reads the segmentation feature behind a
  # stop-gradient, so the translation still sees where the tumour is but its losses do not train
  # that stream.
  c.model.fuse_reverse_stop_gradient = False
  c.model.dtype = "float32"  # computation dtype: "float32" or "bfloat16" (params stay float32)
  # The 4x4 stride-2 convs (SegAN's S and C, StarGAN's G and D and G's transposed convs, UAGAN's
  # streams): "xla", XLA's conv and autodiff's gradients; "canonical_vjp", XLA's convs with
  # custom VJPs that keep every gradient (the penalty's second order too) a conv XLA:CPU runs on
  # Eigen rather than as a plain loop (the stargan :demo step 0.52x the time on one CPU thread,
  # uagan 0.74x, segan unchanged; configs/stargan.py and configs/uagan.py use it); "im2col" (down
  # convs only), 16 strided slices and one matmul. The same sums in another order and the same
  # parameters (a checkpoint loads under any); models/strided_conv.py, docs/EXPERIMENTS.md.
  c.model.strided_conv = "xla"
  # The segmentor's bilinear x2 (segan, uagan): "jax_image", jax.image.resize (dense weight
  # matrices), or "stencil", shifted slices and two multiply-adds a pixel. The same
  # interpolation; the gradients add the same terms in another order. models/segan.py,
  # upsample2x; docs/EXPERIMENTS.md for why the default stays.
  c.model.resize = "jax_image"

  c.data = ml_collections.ConfigDict()
  c.data.image_size = (192, 192)  # axial slices are centre-cropped or zero-padded to this
  # The voxel size (mm, X Y Z) the model is trained at: BraTS's 1 mm. prepare resamples cases of
  # another spacing to it; predict, translate and evaluate resample their inputs to it and the
  # result back (more than 1% apart, uagan_jax/data/resample.py).
  c.data.spacing = (1.0, 1.0, 1.0)
  c.data.modalities = ("t1", "t1ce", "t2", "flair")  # modalities training draws from
  # Which modalities of a training case train (uagan_jax/data/dataset.py): "unpaired", UAGAN's
  # protocol (each case contributes one, seeded round-robin; the paper's claim is about it), or
  # "all" (every modality of every case: the most from complete data, no longer unpaired).
  c.data.protocol = "unpaired"
  c.data.clip = 5.0  # z-scores are clipped to [-clip, clip]
  c.data.tumour_free_fraction = 0.1  # seeded fraction of tumour-free brain slices kept for training
  c.data.augment = True  # random in-plane flips and intensity jitter, on device, per example
  c.data.intensity_scale = 0.1
  c.data.intensity_shift = 0.1
  # stargan, uagan: what D judges as real. True: the augmented slices G translates, intensity
  # changes and all (the jitter above and the intensity transforms below), so D also learns that
  # augmented intensities are real. False: the same slices with the flips and spatial transforms
  # only (the same draws), no intensity change: D judges scans as stored, while G, its cycle
  # target and S still get the full augmentation (families/shared.py, discriminator_real).
  # Other families ignore it.
  c.data.augment_discriminator_real = True
  # After the augmentation, clip the image to [-clip, clip] again, the range preprocessing gives
  # and the generators' tanh output (x clip) can reach: the intensity transforms push z-scores
  # past it (|x| up to about 8), which stargan and uagan would ask G to reproduce and S never
  # sees at inference. False: the augmented values as they come (runs before this key).
  c.data.clip_augmented = True
  # Scanner-shift augmentation (data/augment.py), with data.augment: each transform hits an
  # example with probability *_p and draws its strength from the range beside it. All off here, so
  # the base keeps its numbers; the full recipes turn them on (configs/*.py, nnU-Net's values).
  c.data.augmentations = ml_collections.ConfigDict()
  a = c.data.augmentations
  a.rotation_p = 0.0
  a.rotation_degrees = 15.0  # in-plane angle drawn from U(-d, d)
  a.scale_p = 0.0
  a.scale_range = (0.7, 1.4)  # > 1 enlarges the content
  a.scale_per_axis = False  # True: rows and columns scaled independently (anisotropic)
  a.elastic_p = 0.0
  a.elastic_magnitude = 0.03  # largest control-point displacement, a fraction of the slice side
  a.elastic_control_points = 7  # per side; displacements are interpolated cubically between them
  # Intensity, inside the brain only (background stays 0).
  a.bias_p = 0.0
  a.bias_coefficient = 0.3  # exp of a quadratic whose coefficients are drawn from U(-c, c)
  a.noise_p = 0.0
  a.noise_variance = (0.0, 0.1)  # Gaussian noise variance, on the z-scored image
  a.blur_p = 0.0
  a.blur_sigma = (0.5, 1.0)  # Gaussian blur sigma in pixels
  a.brightness_p = 0.0
  a.brightness_range = (0.75, 1.25)  # multiplier
  a.contrast_p = 0.0
  a.contrast_range = (0.75, 1.25)  # stretch about the brain mean, clipped to the former range
  a.low_resolution_p = 0.0
  a.low_resolution_zoom = (0.5, 1.0)  # downsampling factor per side, then back up
  a.gamma_p = 0.0
  a.gamma_range = (0.7, 1.5)  # half the draws below 1, half above; mean and std kept
  c.data.val_fraction = 0.1
  c.data.test_fraction = 0.2
  # Cross-validation, nnU-Net's way (data/dataset.py, split_fold): with folds = K >= 2 the test
  # split stays the one above (same seed and test_fraction), and the other cases are shuffled by
  # the seed into K near-equal folds; the run trains fold `fold` (0..K-1): it validates on that
  # fold and trains on the others, and data.val_fraction is ignored. 0 = no folds: the plain
  # train/val/test split. `uagan-jax evaluate --cross-validation` scores the K runs together.
  c.data.folds = 0
  c.data.fold = 0
  # Threads that read training batches from the cache ahead of the step (data/input_pipeline.py);
  # they change how soon a batch is ready, never what it holds.
  c.data.loader_threads = 4

  c.loss = ml_collections.ConfigDict()
  # The multi-scale L1 term of S against the critic C: segan, and uagan's segmentation terms.
  c.loss.adversarial_weight = 1.0
  c.loss.dice_weight = 1.0
  # How S's soft Dice (and the shape loss's) is pooled (losses.soft_dice_loss): "per_example", a
  # Dice per slice, averaged; "batch", one Dice per region over the global batch (nnU-Net's batch
  # Dice); "present", per slice over the slices that hold the region; "modality_batch", a batch
  # Dice per source modality, averaged over the modalities the batch holds. Per example rewards an
  # empty output on slices without the region, yet measured with full augmentation (segan
  # :study, docs/EXPERIMENTS.md, "Training that keeps every region") batch Dice lost T1ce's
  # TC/ET and "present" lost WT, while per example with the demo's decaying learning rate kept
  # every region; uagan's recipe pools over the batch (configs/uagan.py, departure 6).
  c.loss.dice_reduction = "per_example"
  c.loss.bce_weight = 0.0
  c.loss.scale_weights = ()  # per-scale weights of the multi-scale L1 (input, then each block); () = all ones
  # How the multi-scale L1 pools its scales: "per_scale" (a mean per scale, then over scales) or
  # "concatenated" (SegAN's code: one mean over every scale's elements; losses.multiscale_l1).
  c.loss.scale_pooling = "per_scale"
  # S's class-weighted cross-entropy (UAGAN's segmentation loss; losses.class_weighted_cross_entropy)
  # and its (background, tumour) weights; 0 = off.
  c.loss.ce_weight = 0.0
  c.loss.ce_class_weights = (1.0, 1.0)
  # Weights of the regions (WT, TC, ET) in S's Dice, BCE and weighted cross-entropy and in the
  # shape loss (not in the critic's multi-scale L1); () = every region alike. (1, 0, 0) trains the
  # whole tumour only: the network still has three output maps, TC and ET untrained.
  c.loss.region_weights = ()
  c.loss.critic_constraint = "clip"  # "clip" (SegAN's weight clipping) or "gradient_penalty"
  c.loss.clip_limit = 0.05
  c.loss.gp_weight = 10.0
  # StarGAN / UAGAN translation terms (Choi et al. 2018 weights).
  c.loss.gan_weight = 1.0  # generator's WGAN term
  c.loss.cls_weight = 1.0  # modality classification (D on real, G on fake)
  c.loss.cycle_weight = 10.0
  # G(x, source) ~ x (CycleGAN's identity loss); 0 is StarGAN, which has none. One more pass of G.
  c.loss.identity_weight = 0.0
  c.loss.discriminator_gp_weight = 10.0
  # UAGAN shape loss: S(G(x, t), t) must segment like y; its weight ramps up linearly from 0.
  c.loss.shape_weight = 1.0
  c.loss.shape_ramp_steps = 1000
  # The shape loss's form: "bce_dice" (losses.shape_loss) or "weighted_ce" (UAGAN's code: the same
  # class-weighted cross-entropy as S's, with loss.ce_class_weights).
  c.loss.shape_loss = "bce_dice"

  c.optim = ml_collections.ConfigDict()
  c.optim.segmentor_lr = 2e-4
  c.optim.critic_lr = 2e-4
  c.optim.generator_lr = 1e-4  # StarGAN
  c.optim.discriminator_lr = 1e-4
  c.optim.b1 = 0.5  # SegAN / DCGAN Adam betas
  c.optim.b2 = 0.999
  # The learning-rate schedule, always on the absolute step (never on train.steps, so that
  # extending a finished run or resuming one follows the same trajectory):
  # "staircase": lr * decay_rate ** (step // decay_every) (decay_every 0 = constant);
  # "linear": lr until decay_start, then linearly to lr * decay_final_fraction at decay_end, then
  # constant (UAGAN's and StarGAN's code).
  c.optim.schedule = "staircase"
  c.optim.decay_every = 0  # 0 = constant learning rate
  c.optim.decay_rate = 0.5
  c.optim.decay_start = 0
  c.optim.decay_end = 0
  c.optim.decay_final_fraction = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 20_000
  c.train.batch_size = 16  # global batch, split evenly across devices
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.num_devices = 0  # 0 = all local devices
  c.train.parallel_mode = "shard_map"  # "shard_map" (jit + shard_map) or "pmap"
  c.train.n_critic = 1  # stargan/uagan: generators update every n_critic steps (StarGAN: 5)
  # Every N steps and at the last, Dice on the val split into validation.jsonl, and the best
  # checkpoint kept in checkpoints_best/, to pick a model without the test split; 0 = off. Changes
  # no training bits; skipped (with a note) on an empty val split; ignored by stargan.
  c.train.validate_every = 0
  # Process 0 also writes TensorBoard event files into <workdir>/tensorboard/ (uagan_jax/
  # tensorboard.py): every metrics.jsonl and validation.jsonl value, and panels at the
  # validate_every steps. They only read the run: no training number changes with it.
  c.train.tensorboard = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32  # slices per inference batch
  c.eval.split = "test"
  c.eval.max_cases = 0  # 0 = every case of the split
  c.eval.panels = 4  # cases drawn as PNG panels
  c.eval.val_max_cases = 0  # validation during training scores the first N val cases; 0 = all
  # How the three thresholded region maps are made nested (WT contains TC contains ET) before
  # anything is scored, drawn or written (uagan_jax/regions.py): "inner_wins" (a voxel any region
  # claims stays tumour, the inner region's label wins: nnU-Net's region-to-label conversion) or
  # "outer_gates" (TC only inside WT, ET only inside TC). Predict, evaluate, validation and the
  # figures all see the same nested maps, so evaluate scores the label map predict writes.
  c.eval.nesting = "inner_wins"
  return c


# The full recipes' scanner-shift augmentation (configs/*.py; data/augment.py). Probabilities and
# ranges are nnU-Net's 2D defaults (nnUNetTrainer.get_training_transforms, nnU-Net v2) where it
# has the transform, per example of one channel (its per-channel probability folded in: blur 0.2
# x 0.5, low resolution 0.25 x 0.5), with two departures: rotation +-15 degrees, not +-180, as
# BraTS-like scans are registered to an atlas; gamma never inverted (nnU-Net also inverts with
# p 0.1). nnU-Net has neither an elastic deformation (off in its defaults) nor a bias field; theirs
# follow TorchIO (RandomElasticDeformation: 7 control points; RandomBiasField), at p 0.2 and 0.3.
# Measured on the demo: docs/EXPERIMENTS.md, "Augmentation across scanners".
FULL_RECIPE_AUGMENTATIONS = dict(
    rotation_p=0.2, scale_p=0.2, elastic_p=0.2, bias_p=0.3, noise_p=0.1, blur_p=0.1,
    brightness_p=0.15, contrast_p=0.15, low_resolution_p=0.125, gamma_p=0.3)


def apply_full_recipe_augmentations(c: ml_collections.ConfigDict) -> None:
  """Turns on the scanner-shift augmentation at `FULL_RECIPE_AUGMENTATIONS`' probabilities."""
  c.data.augmentations.update(FULL_RECIPE_AUGMENTATIONS)


def apply_demo_sizes(c: ml_collections.ConfigDict) -> None:
  """The CPU demo's sizes, shared by every recipe's ``:demo`` variant so they compare fairly:
  96x96 slices, narrow networks, 600 steps of 16 slices (a few minutes on 2 cores for segan),
  at 2 mm voxels: the spacing ``uagan-jax synth`` writes its phantoms at, where their brain has a
  real head's size (about 144 x 178 mm), so the demo model segments real 1 mm scans (resampled)."""
  c.model.segmentor_features = (16, 32, 64, 128)
  c.model.critic_features = (16, 32, 64)
  c.model.generator_features = 8  # the generator runs at full resolution twice (cycle): keep it lean
  c.model.generator_residual_blocks = 2
  c.model.discriminator_features = 16
  c.model.discriminator_layers = 5  # 96 / 2**5 = 3: a 3x3 patch map
  c.data.image_size = (96, 96)
  c.data.spacing = (2.0, 2.0, 2.0)  # = synthetic.DEMO_SPACING
  c.data.tumour_free_fraction = 0.2
  # S's and C's peak rate: at 1e-3 (the rate of runs before 2026-12-08: add
  # --config.optim.segmentor_lr=0.001 --config.optim.critic_lr=0.001) their TC/ET outputs switched
  # off for whole modalities in 5 of 6 segan runs of 1,200 steps; at 3e-4 in none of 6 for segan,
  # unet or uagan, with or without augmentation (docs/EXPERIMENTS.md, "A lower peak learning rate
  # at the longer budget").
  c.optim.segmentor_lr = 3e-4
  c.optim.critic_lr = 3e-4
  c.optim.generator_lr = 5e-4
  c.optim.discriminator_lr = 5e-4
  # Constant for the first third, then linearly down to a tenth at the last step: at a constant
  # 1e-3 the TC/ET outputs switched off and on every 50-100 steps, so where a run stopped decided
  # them (docs/EXPERIMENTS.md, "Training that keeps every region"). optim.schedule=staircase
  # (with decay_every 0) is the constant rate of runs before.
  c.optim.decay_every = 0
  c.optim.schedule = "linear"
  c.optim.decay_start = 200
  c.optim.decay_end = 600
  c.optim.decay_final_fraction = 0.1
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.train.validate_every = 200
  c.eval.batch_size = 64
  c.eval.val_max_cases = 4
  # The demo keeps the base's augmentation (flips and jitter only), whatever the full recipe
  # turned on: docs/EXPERIMENTS.md, "Augmentation across scanners", measured both.
  c.data.augmentations = base_config().data.augmentations


def apply_study_budget(c: ml_collections.ConfigDict) -> None:
  """The seeded studies' budget (studies/*.py), shared by every recipe's ``:study`` variant: the
  demo's networks, slices and learning rates, with 8 slices a step and 1,200 steps, the rate
  constant to step 300 and then falling linearly to a tenth (about 1.5 min a run for unet, 2 for
  segan and 7 for uagan on 2 quiet CPU cores; docs/EXPERIMENTS.md says what so short a budget can
  and cannot tell). At the 400 steps the first studies trained
  (`uagan_jax.study.FIRST_BUDGET_OVERRIDES`) uagan lost T1 in 2 of 3 seeds with augmentation at
  1e-3, and ET from every modality (one seed) at 3e-4. No validation during training: a study
  scores each run's final checkpoint."""
  apply_demo_sizes(c)
  c.train.batch_size = 8
  c.train.steps = 1200
  c.optim.decay_start = 300  # the demo's schedule, over these steps
  c.optim.decay_end = 1200
  c.train.checkpoint_every = 1200
  c.train.validate_every = 0


def apply_cpu_budget(c: ml_collections.ConfigDict, variant: str) -> None:
  """A recipe's CPU variant: `apply_demo_sizes` for ``"demo"``, `apply_study_budget` for
  ``"study"`` (the one place a recipe turns its variant into sizes)."""
  if variant not in ("demo", "study"):
    raise ValueError(f"the CPU budgets are demo and study, not {variant!r}")
  (apply_demo_sizes if variant == "demo" else apply_study_budget)(c)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks that cross several keys; raises UserError naming the key.

  The generic checks are here; those that belong to a model family come from its entry in
  `uagan_jax.families` (the table imports no JAX, so neither does validation).
  """
  family = families.get(config.model.name)
  if config.model.generator_output not in GENERATOR_OUTPUTS:
    raise UserError(f"config model.generator_output={config.model.generator_output!r}: unknown "
                    f"(known: {', '.join(GENERATOR_OUTPUTS)})")
  families.check_options_of_other_families(config)
  if config.model.generator_norm not in GENERATOR_NORMS:
    raise UserError(f"config model.generator_norm={config.model.generator_norm!r}: unknown "
                    f"(known: {', '.join(GENERATOR_NORMS)})")
  for check in family.checks:
    check(config)
  levels = len(config.model.segmentor_features)
  divisors = {"len(model.segmentor_features)": levels}
  if "discriminator" in family.roles:
    divisors["model.discriminator_layers"] = config.model.discriminator_layers
  for what, depth in divisors.items():
    for size in config.data.image_size:
      if size % (2 ** depth):
        raise UserError(f"config data.image_size={tuple(config.data.image_size)}: each side must "
                        f"be divisible by 2**{what} = {2 ** depth}")
  spacing = tuple(config.data.spacing)
  if len(spacing) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in spacing):
    raise UserError(f"config data.spacing={spacing}: must be three positive numbers (mm, X Y Z)")
  unknown = [m for m in config.data.modalities if m not in MODALITIES]
  if unknown or not config.data.modalities:
    raise UserError(f"config data.modalities={tuple(config.data.modalities)}: "
                    f"choose from {', '.join(MODALITIES)}")
  if config.data.protocol not in PROTOCOLS:
    raise UserError(f"config data.protocol={config.data.protocol!r}: use "
                    f"{' or '.join(PROTOCOLS)}")
  if config.loss.critic_constraint not in ("clip", "gradient_penalty"):
    raise UserError(f"config loss.critic_constraint={config.loss.critic_constraint!r}: "
                    "use 'clip' or 'gradient_penalty'")
  if config.model.critic_norm not in ("batch", "layer", "none"):
    raise UserError(f"config model.critic_norm={config.model.critic_norm!r}: use batch, layer or none")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise UserError(f"config model.dtype={config.model.dtype!r}: use float32 or bfloat16")
  if config.model.strided_conv not in STRIDED_CONVS:
    raise UserError(f"config model.strided_conv={config.model.strided_conv!r}: use "
                    f"{' or '.join(STRIDED_CONVS)}")
  if config.model.resize not in RESIZES:
    raise UserError(f"config model.resize={config.model.resize!r}: use {' or '.join(RESIZES)}")
  if config.eval.nesting not in ("inner_wins", "outer_gates"):
    raise UserError(f"config eval.nesting={config.eval.nesting!r}: use inner_wins or outer_gates")
  if config.train.parallel_mode not in ("shard_map", "pmap"):
    raise UserError(f"config train.parallel_mode={config.train.parallel_mode!r}: use shard_map or pmap")
  _validate_recipe_keys(config)
  for key in ("train.steps", "train.batch_size", "train.log_every", "train.checkpoint_every",
              "train.keep_checkpoints", "train.n_critic", "data.loader_threads"):
    group, name = key.split(".")
    if config[group][name] < 1:
      raise UserError(f"config {key}={config[group][name]}: must be >= 1")
  _validate_augmentations(config.data.augmentations)
  for key in ("train.validate_every", "eval.val_max_cases", "eval.max_cases", "eval.panels",
              "loss.identity_weight"):
    group, name = key.split(".")
    if config[group][name] < 0:
      raise UserError(f"config {key}={config[group][name]}: must be >= 0")
  _check_numbers(config)


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Rejects numbers no run can use: a NaN or non-positive learning rate trains nothing (or
  diverges at once), a negative loss weight turns a loss into a reward, a fraction of 1 leaves no
  training data."""
  def value(key):
    group, name = key.split(".")
    return config[group][name]

  def check(key, ok, requirement, number=None):
    number = value(key) if number is None else number
    if not (math.isfinite(number) and ok(number)):
      raise UserError(f"config {key}={number}: must be {requirement}")

  for key in ("optim.segmentor_lr", "optim.critic_lr", "optim.generator_lr",
              "optim.discriminator_lr", "optim.decay_rate", "loss.clip_limit", "data.clip"):
    check(key, lambda x: x > 0, "finite and > 0")
  for key in ("loss.adversarial_weight", "loss.dice_weight", "loss.bce_weight", "loss.gp_weight",
              "loss.gan_weight", "loss.cls_weight", "loss.cycle_weight",
              "loss.identity_weight", "loss.discriminator_gp_weight", "loss.shape_weight",
              "data.intensity_scale", "data.intensity_shift", "loss.shape_ramp_steps",
              "optim.decay_every"):
    check(key, lambda x: x >= 0, "finite and >= 0")
  for weight in config.loss.scale_weights:
    check("loss.scale_weights", lambda x: x >= 0, "finite and >= 0 each", number=weight)
  for key in ("optim.b1", "optim.b2", "data.val_fraction", "data.test_fraction"):
    check(key, lambda x: 0 <= x < 1, "in [0, 1)")
  check("data.tumour_free_fraction", lambda x: 0 <= x <= 1, "in [0, 1]")
  if config.data.val_fraction + config.data.test_fraction >= 1:
    raise UserError(f"config data.val_fraction={config.data.val_fraction} + data.test_fraction="
                    f"{config.data.test_fraction}: must be < 1, to leave cases to train on")
  folds, fold = config.data.folds, config.data.fold
  if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
    raise UserError(f"config data.folds={folds!r}: must be 0 (no cross-validation) or an "
                    "integer >= 2")
  if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < max(folds, 1):
    raise UserError(f"config data.fold={fold!r}: must be an integer in 0..{max(folds, 1) - 1}"
                    + (f" (data.folds={folds})" if folds else " (data.folds=0: no folds)"))


def _validate_recipe_keys(config: ml_collections.ConfigDict) -> None:
  """The loss and schedule keys the papers' recipes set (configs/*.py:paper)."""
  loss, optim = config.loss, config.optim
  choices = {"loss.scale_pooling": ("per_scale", "concatenated"),
             "loss.shape_loss": ("bce_dice", "weighted_ce"),
             "loss.dice_reduction": ("per_example", "batch", "present", "modality_batch"),
             "optim.schedule": ("staircase", "linear")}
  for key, known in choices.items():
    group, name = key.split(".")
    if config[group][name] not in known:
      raise UserError(f"config {key}={config[group][name]!r}: use {' or '.join(known)}")
  scales = len(config.model.critic_features) + 1  # the critic's input, then each block
  if loss.scale_weights and len(loss.scale_weights) != scales:
    raise UserError(f"config loss.scale_weights={tuple(loss.scale_weights)}: give {scales} "
                    f"weights (the critic's input and each of its {scales - 1} blocks) or ()")
  if len(loss.ce_class_weights) != 2 or min(loss.ce_class_weights) < 0 or \
      sum(loss.ce_class_weights) <= 0:
    raise UserError(f"config loss.ce_class_weights={tuple(loss.ce_class_weights)}: give two "
                    "non-negative weights (background, tumour), not both 0")
  if loss.region_weights and (len(loss.region_weights) != 3 or min(loss.region_weights) < 0
                              or sum(loss.region_weights) <= 0):
    raise UserError(f"config loss.region_weights={tuple(loss.region_weights)}: give three "
                    "non-negative weights (WT, TC, ET), not all 0, or ()")
  if loss.ce_weight < 0:
    raise UserError(f"config loss.ce_weight={loss.ce_weight}: must be >= 0")
  if optim.schedule == "linear":
    if not 0 <= optim.decay_start < optim.decay_end:
      raise UserError(f"config optim.decay_start={optim.decay_start}, optim.decay_end="
                      f"{optim.decay_end}: the linear schedule needs 0 <= decay_start < decay_end")
    if not 0 <= optim.decay_final_fraction <= 1:
      raise UserError(f"config optim.decay_final_fraction={optim.decay_final_fraction}: must be "
                      "in [0, 1]")


def _validate_augmentations(augmentations: ml_collections.ConfigDict) -> None:
  """Probabilities in [0, 1], ranges (low, high) with low <= high, sizes in their domains."""
  for key, value in augmentations.items():
    where = f"config data.augmentations.{key}={value!r}"
    if key.endswith("_p") and not 0.0 <= value <= 1.0:
      raise UserError(f"{where}: a probability must be in [0, 1]")
    if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1]):
      raise UserError(f"{where}: must be a range (low, high) with low <= high")
  lowest = {"scale_range": 1e-3, "noise_variance": 0.0, "blur_sigma": 1e-3,
            "brightness_range": 0.0, "contrast_range": 0.0, "low_resolution_zoom": 1e-3,
            "gamma_range": 1e-3}
  for key, low in lowest.items():
    if augmentations[key][0] < low:
      raise UserError(f"config data.augmentations.{key}={augmentations[key]!r}: values must be "
                      f">= {low:g}")
  if augmentations.low_resolution_zoom[1] > 1.0:
    raise UserError(f"config data.augmentations.low_resolution_zoom="
                    f"{augmentations.low_resolution_zoom!r}: a downsampling factor is at most 1")
  if augmentations.elastic_control_points < 2:
    raise UserError(f"config data.augmentations.elastic_control_points="
                    f"{augmentations.elastic_control_points}: must be >= 2")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``path.py[:arg]``, applies ``--config.a.b=value`` overrides, validates, locks.

  Args:
    spec: a config file path, optionally followed by ``:arg`` passed to its ``get_config``.
    overrides: command-line items ``--config.a.b=value`` (or ``--config.a.b`` ``value`` pairs).

  Returns:
    The locked, validated config.

  Raises:
    UserError: unknown file or key, or a value of the wrong type.
  """
  path_str, _, arg = spec.partition(":")
  config = call_get_config(pathlib.Path(path_str), arg, kind="config")
  apply_overrides(config, overrides)
  validate(config)
  config.lock()
  return config


def call_get_config(path: pathlib.Path, arg: str, *, kind: str):
  """``get_config(arg)`` (``get_config()`` for an empty ``arg``) of the Python file ``path``: a
  recipe (``kind`` "config") or a study file ("study"); every problem is a one-line UserError."""
  if not path.is_file():
    raise UserError(f"{path}: {kind} file not found")
  module_spec = importlib.util.spec_from_file_location(f"_uagan_{kind}_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"{path}: syntax error in {kind} file (line {e.lineno}: {e.msg})") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"{path}: {kind} file defines no get_config()")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # e.g. an unknown variant after the ':'
    raise UserError(f"{path}: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ``--config.a.b=value`` items in place; unknown keys and bad values are UserErrors."""
  items = list(overrides)
  pairs = []
  while items:
    item = items.pop(0)
    if not item.startswith("--config."):
      raise UserError(f"unexpected argument {item!r}")
    key, eq, value = item[len("--config."):].partition("=")
    if not eq:
      if not items:
        raise UserError(f"--config.{key}: missing value")
      value = items.pop(0)
    pairs.append((key, value))
  for key, value in pairs:
    _set(config, key, value)


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def _set(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents + [leaf]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(dotted, _all_keys(config), n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise UserError(f"unknown config key '{dotted}'{hint}")
    if part != leaf:
      node = node[part]
  current = node[leaf]
  try:
    value = _parse_like(text, current)
  except (ValueError, SyntaxError) as e:
    raise UserError(f"config key '{dotted}': cannot use {text!r} for a value like "
                    f"{current!r} ({e})") from None
  with node.unlocked():
    node[leaf] = value


def _parse_like(text: str, current):
  """Parses ``text`` to the type of the current value (the config's type is the schema)."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError("expected true or false")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    stripped = text.strip()
    if stripped in ("", "()", "[]"):
      return ()
    parsed = ast.literal_eval(stripped if stripped[0] in "([" else f"({stripped},)")
    if not isinstance(parsed, (tuple, list)):
      parsed = (parsed,)
    return tuple(parsed)
  # None or anything else: a Python literal, falling back to the raw string.
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


# Keys whose default changed when they were added: a config.json written before has none, and its
# run trained with the value here (resuming it must go on the same way), not with today's default.
KEYS_BEFORE_THEY_EXISTED = {"data.clip_augmented": False}


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json_file(path: pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to its workdir, with lists turned back to tuples."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise UserError(f"{path}: not found; is this a training workdir?") from None
  return from_json_text(text, name=str(path))


def from_json_text(text: str, *, name: str) -> ml_collections.ConfigDict:
  """`from_json_file` of a config.json already read (e.g. from a model file); ``name`` says
  where it came from in the message on invalid JSON."""
  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{name}: not valid JSON ({e})") from None
  config = base_config()
  for dotted, value in KEYS_BEFORE_THEY_EXISTED.items():
    group, name = dotted.split(".")
    if name not in raw.get(group, {name: None}):
      config[group][name] = value
  config.update(tuples(raw))
  config.lock()
  return config
