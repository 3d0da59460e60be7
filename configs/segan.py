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

`:paper` is SegAN's official PyTorch code (github.com/YuanXue1993/SegAN: train.py at aa892a6,
the version whose lr default is 2e-4, and net.py at bbcf3f3; the line of each number is cited
beside it below). That code trains S on the multi-scale L1 plus a Dice loss (train.py:157), so
Dice is on and BCE off in `:paper`. The code halves the rate every 25 epochs; here an epoch is
one pass over BraTS 2021's training split, in steps at the code's batch of 36:
  876 training cases (1251 less 250 test and 125 val) x 62 slices per case (52 with tumour and
  round(0.1 x 95) tumour-free ones, data.tumour_free_fraction 0.1, counted on the one real
  UPENN-GBM case: an estimate, not a BraTS count) / 36 = 1,508.7 -> 1,509 steps an epoch,
  so 25 epochs = 37,725 steps.
Not in the sources, so kept from the recipe above: the slice size (192x192; net.py's comments
assume 128x128 ISIC images), the training length (train.py:22 --niter 10000 epochs is a bound,
not a recipe: kept 40,000 steps) and the data's tumour-free fraction.
Departures that remain in `:paper`, not in the code unless a key is named:
  * S is this project's U-Net segmentor conditioned on the modality with three region maps, not
    net.py's NetS (one map, RGB in); C has net.py NetC's six widths and BatchNorm on blocks 2-6
    but 4x4 stride-2 convs everywhere (NetC: 7, 5, 4, 4, 4, 3);
  * Dice is 1 - (2 sum pt + 1) / (sum p + sum t + 1) (losses.soft_dice_loss), not train.py:50-67's
    unsmoothed 1 - 2 sum pt / (sum p^2 + sum t^2), which is 0/0 on a slice without tumour;
  * the official code halves the rate when epoch % 25 == 0 after the epoch, epoch 0 included
    (train.py:213-221), so its rate is 1e-4 from the second epoch on, and it makes new Adam
    optimizers then (their moments restart); here the rate halves at 25, 50, ... epochs and
    Adam's moments carry on.
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "segan"  # the base's family too; named here as it is what makes the recipe
  c.loss.bce_weight = 1.0  # the departure above, with the base's Dice
  c.optim.decay_every = 10_000
  c.train.steps = 40_000
  config_lib.apply_full_recipe_augmentations(c)  # nnU-Net-like; off in :demo

  if variant in ("demo", "study"):
    config_lib.apply_cpu_budget(c, variant)
  elif variant == "paper":
    # The papers' runs had no scanner-shift augmentation: the full recipe's is off again.
    c.data.augmentations.update(config_lib.base_config().data.augmentations)
    # SegAN's code (see the docstring): YuanXue1993/SegAN train.py:N (aa892a6), net.py (bbcf3f3).
    steps_per_epoch = 1_509  # 876 cases x 62 slices / batch 36 (the docstring's arithmetic)
    c.loss.dice_weight = 1.0  # train.py:157 loss_G_joint = L1 + dice_loss
    c.loss.bce_weight = 0.0  # train.py:157: no BCE
    c.loss.adversarial_weight = 1.0  # train.py:157: the L1 unweighted
    # C: net.py NetC's six conv blocks (ndf 64: 64, 128, 256, 512, 512, 512), and its output
    # concatenates the input and each block's features times 1, 1, 2, 2, 2, 2, 4 (net.py
    # NetC.forward, the torch.cat), the L1 being one mean over that vector (train.py:134, :156).
    c.model.critic_features = (64, 128, 256, 512, 512, 512)
    c.model.critic_norm = "batch"  # net.py NetC: BatchNorm2d on blocks 2-6
    c.loss.scale_weights = (1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 4.0)
    c.loss.scale_pooling = "concatenated"
    c.loss.critic_constraint = "clip"  # train.py:138-139 p.data.clamp_(-0.05, 0.05)
    c.loss.clip_limit = 0.05
    c.optim.segmentor_lr = 2e-4  # train.py:23 --lr 0.0002, both optimizers (train.py:96-97)
    c.optim.critic_lr = 2e-4
    c.optim.b1 = 0.5  # train.py:25 --beta1 0.5
    c.optim.b2 = 0.999  # train.py:96-97 betas=(opt.beta1, 0.999)
    c.optim.schedule = "staircase"
    c.optim.decay_rate = 0.5  # train.py:26 --decay 0.5, applied at :213-214
    c.optim.decay_every = 25 * steps_per_epoch  # train.py:213 every 25 epochs
    c.train.batch_size = 36  # train.py:21 --batchSize 36
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo, study, paper)")
  return c
