"""UAGAN (Yuan et al. 2019): one network translates any modality into any other and
segments the tumour from any single modality, trained on unpaired images.

The translation stream (StarGAN's G) and the segmentation stream (SegAN's S) exchange decoder
features through attention gates in both directions (model.fuse, model.fuse_reverse); D (WGAN-GP
+ modality classifier) and C (SegAN's multi-scale L1 critic) judge them; the shape loss asks the
segmentation of the translated image to match the source's ground truth.

Six departures from the papers, set here, each one key away from the published behaviour:
  1. G blends copying its input and drawing anew (model.generator_output=blend; StarGAN's: tanh);
  2. one output head per source-target pair (model.generator_pair_heads; false: one for all);
  3. one real/fake map per modality in D (model.discriminator_per_modality; false: one map);
  4. the reverse gate (model.fuse_reverse) reads the segmentation stream behind a stop-gradient
     (model.fuse_reverse_stop_gradient; false: the translation losses train S through it);
  5. the classification weight is halved (loss.cls_weight=0.5; StarGAN's is 1);
  6. S's Dice and the shape loss's are pooled over the batch (loss.dice_reduction=batch,
     nnU-Net's batch Dice; per_example, a Dice per slice, is the base's and SegAN's).
A seventh comes from the base config: G's norms are conditioned on the target modality
(model.generator_norm=conditional_instance; `instance` is StarGAN's). S also trains on Dice and BCE,
as in configs/segan.py. Measurements of each: docs/EXPERIMENTS.md.

  uagan-jax train --config configs/uagan.py --data /data/BraTS2021 --workdir runs/uagan
  uagan-jax train --config configs/uagan.py:demo --data data_synth --workdir runs/demo_uagan
  uagan-jax train --config configs/uagan.py:demo --config.model.fuse=false ...   # the ablation

`:paper` is the official UAGAN run as its launch script sets it (github.com/mangoyuan/UAGAN at
8f9a5ef: uagan.sh lines 8-13 over the defaults of train_uagan.py lines 347-383; the line of each
number is cited beside it below). An epoch of the official code is one pass over its training
slices; here it is one pass over BraTS 2021's training split, in steps at batch 8:
  876 training cases (1251 cases less 250 test and 125 val: data.test_fraction 0.2,
  data.val_fraction 0.1) x 147 brain slices per case (every brain slice, as the official
  process/split.py keeps every slice with >= 1600 non-zero pixels; 147 is what the one real
  UPENN-GBM case has, an estimate, not a BraTS count) / 8 = 16,096.5 -> 16,097 steps an epoch.
So 100 epochs = 1,609,700 steps, the shape ramp (60 epochs) 965,820 and the linear decay runs
from 965,820 to 1,609,700. (The official split trained on 50 MSD patients, process/split.py
n_max 100 x train_rate 5/10, so its epochs were ~17x shorter.)
Departures that remain in `:paper`, each one key away or, where marked, not in the code at all:
  * whole tumour only by loss.region_weights=(1, 0, 0): the network still has three output maps,
    TC and ET are untrained and not to be reported (the official S has two classes,
    train_uagan.py:354 out_channels 2, the label being tumour != 0, utils/tsfm.py:98);
  * C, SegAN's critic, is still built and updated, but its term is off
    (loss.adversarial_weight=0: the official code has no C); Dice and BCE are off
    (loss.dice_weight=0, loss.bce_weight=0);
  * G's head is StarGAN's tanh (model.generator_output=tanh); the official head is a plain 1x1
    conv (net/uagan.py Decoder.score) -- not in the code;
  * S is conditioned on the modality and the target is another modality than the source; the
    official S sees the image only and the target is the batch's modalities permuted
    (train_uagan.py:194-195), so a source may be its own target -- not in the code;
  * slices are centre-cropped to 128x128 at 1 mm; the official ones are cropped to 200 and
    resized to 128 (readme.md, process/to_png.py) -- not in the code;
  * the linear decay lowers the rate every step; the official one lowers it once an epoch
    (train_uagan.py:297-303, lr_update_epoch 1);
  * the weighted cross-entropy is normalised per device (losses.class_weighted_cross_entropy):
    exact on one device.
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
  # 6. A Dice per slice scores an empty TC/ET output 0.95-0.99 on the slices without them: at
  # :study uagan switched TC/ET off (held-out Dice < 0.05) in most modalities in 5 of 6 runs with
  # it; pooled over the batch it kept every region in 3 of 3 runs without augmentation, but lost
  # T1 in 2 of 3 with the full augmentation (docs/EXPERIMENTS.md, "Training that keeps every
  # region"). `:paper` has no Dice term, so the key does not reach it.
  c.loss.dice_reduction = "batch"
  # 7. Gradients as canonical convs XLA:CPU runs on Eigen: the :demo step 0.74x the time on one
  # CPU thread, held-out Dice and PSNR within the run-to-run spread; the same sums in another
  # order ("xla" for the previous numbers bit for bit; docs/EXPERIMENTS.md, "Convolution
  # gradients on XLA:CPU's fast path").
  c.model.strided_conv = "canonical_vjp"
  c.train.steps = 40_000
  config_lib.apply_full_recipe_augmentations(c)  # nnU-Net-like; off in :demo
  # D judges the intensity-augmented slices G translates as real too (the base's
  # data.augment_discriminator_real=True; false shows D the slices with no intensity change).
  if variant in ("demo", "study"):
    config_lib.apply_cpu_budget(c, variant)
    # The shape loss asks S to segment G's images; ramp it over the demo's whole run, as G only
    # learns to translate during it, and over the study budget's first 400 steps (what every
    # uagan study measured, the 400-step budget's runs and the 1,200-step ones).
    c.loss.shape_ramp_steps = c.train.steps if variant == "demo" else 400
  elif variant == "paper":
    # The papers' runs had no scanner-shift augmentation: the full recipe's is off again.
    c.data.augmentations.update(config_lib.base_config().data.augmentations)
    # The official run (see the docstring): mangoyuan/UAGAN uagan.sh:N and train_uagan.py:N.
    steps_per_epoch = 16_097  # 876 cases x 147 slices / batch 8 (the docstring's arithmetic)
    c.data.image_size = (128, 128)  # train_uagan.py:349 --image_size 128
    c.data.modalities = ("t1ce", "t2", "flair")  # uagan.sh:13 --selected_attr FLAIR T1c T2
    c.data.tumour_free_fraction = 1.0  # process/split.py keeps every brain slice (>= 1600 pixels)
    c.train.batch_size = 8  # train_uagan.py:350 --batch_size 8
    c.train.n_critic = 1  # train_uagan.py:383 --n_critic 1
    c.train.steps = 100 * steps_per_epoch  # uagan.sh:12 --max_epoch 100
    # Segmentation: class-weighted cross-entropy only, weight 100, whole tumour.
    c.loss.ce_weight = 100.0  # uagan.sh:11 --lambda_seg 100
    c.loss.ce_class_weights = (0.02, 0.98)  # train_uagan.py:179 (--use_weight 1 at :382)
    c.loss.dice_weight = 0.0  # train_uagan.py:158-167: seg_loss is the cross-entropy alone
    c.loss.bce_weight = 0.0
    c.loss.adversarial_weight = 0.0  # train_uagan.py:101-102: G and D alone, no SegAN critic
    c.loss.region_weights = (1.0, 0.0, 0.0)  # utils/tsfm.py:98: label != 0, the whole tumour
    # Shape: the same weighted cross-entropy on the translation, ramped from 0 to 100.
    c.loss.shape_loss = "weighted_ce"  # train_uagan.py:264 g_loss_shape = seg_loss(y_rec, ...)
    c.loss.shape_weight = 100.0  # uagan.sh:11 --lambda_shape 100
    c.loss.shape_ramp_steps = 60 * steps_per_epoch  # uagan.sh:12 --shape_epoch 60; :243-245
    # Translation: StarGAN's terms.
    c.loss.gan_weight = 1.0  # train_uagan.py:268 g_loss_fake unweighted
    c.loss.cls_weight = 1.0  # train_uagan.py:363 --lambda_cls 1
    c.loss.cycle_weight = 10.0  # train_uagan.py:364 --lambda_rec 10
    c.loss.discriminator_gp_weight = 10.0  # train_uagan.py:365 --lambda_gp 10
    # One Adam for the whole network (G) and one for D, lr 1e-4, betas (0, 0.999).
    c.optim.generator_lr = 1e-4  # train_uagan.py:373 --g_lr 1e-4
    c.optim.segmentor_lr = 1e-4  # the same optimizer (train_uagan.py:101)
    c.optim.discriminator_lr = 1e-4  # train_uagan.py:375 --d_lr 1e-4
    c.optim.b1 = 0.0  # uagan.sh:9 --beta1 0.
    c.optim.b2 = 0.999  # train_uagan.py:378 --beta2 0.999
    # Linear decay over the last 40 epochs to min_lr 1e-6 = 0.01 x 1e-4.
    c.optim.schedule = "linear"  # train_uagan.py:297-303
    c.optim.decay_start = 60 * steps_per_epoch  # uagan.sh:12 --decay_epoch 40 of --max_epoch 100
    c.optim.decay_end = 100 * steps_per_epoch
    c.optim.decay_final_fraction = 0.01  # train_uagan.py:374, :376 --min_g_lr, --min_d_lr 1e-6
    # The network: attention both ways, StarGAN's G and D as published.
    c.model.fuse = True  # net/uagan.py UAGAN.forward: each decoder takes the other's encoder
    c.model.fuse_reverse = True
    c.model.fuse_reverse_stop_gradient = False
    c.model.generator_output = "tanh"  # a departure: net/uagan.py has a plain 1x1 conv
    c.model.generator_pair_heads = False  # net/uagan.py: one score conv
    c.model.generator_norm = "instance"  # train_uagan.py:357 --norm_type instance
    c.model.generator_features = 64  # train_uagan.py:355 --feature_maps 64
    c.model.segmentor_features = (64, 128, 256, 512)  # train_uagan.py:355-356 64 maps, 4 levels, doubling
    c.model.discriminator_features = 64  # train_uagan.py:359 --d_conv_dim 64
    c.model.discriminator_layers = 6  # train_uagan.py:360 --d_repeat_num 6
    c.model.discriminator_per_modality = False  # net/uagan.py Discriminator: one out_src map
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo, study, paper)")
  return c
