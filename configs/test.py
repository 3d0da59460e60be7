"""Tiny models for the tests: 32x32 slices, 4-8 channel networks, a handful of steps (seconds on
a CPU). Not a recipe for results. Variants: unet, stargan, uagan (default: segan).

  uagan-jax train --config configs/test.py --data DIR --workdir /tmp/w
  uagan-jax train --config configs/test.py:uagan --data DIR --workdir /tmp/w
"""

from uagan_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.model.name = "segan"
  c.model.segmentor_features = (4, 8)
  c.model.critic_features = (4, 8)
  c.model.generator_features = 4
  c.model.generator_residual_blocks = 1
  c.model.discriminator_features = 4
  c.model.discriminator_layers = 3
  c.data.image_size = (32, 32)
  c.data.tumour_free_fraction = 0.5
  c.data.val_fraction = 0.0
  c.data.test_fraction = 0.25
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 2
  c.eval.batch_size = 16
  c.eval.panels = 1
  if variant == "unet":
    c.model.name = "unet"
    c.loss.bce_weight = 1.0
  elif variant in ("stargan", "uagan"):
    c.model.name = variant
    c.loss.shape_ramp_steps = 2
    # The recipe's options too (configs/uagan.py), so the tests (4 devices, resume) cover them.
    c.model.fuse_reverse = True
    c.model.generator_output = "blend"
    c.model.discriminator_per_modality = True
    c.model.strided_conv = "canonical_vjp"
    if variant == "uagan":
      c.model.generator_pair_heads = True
      c.model.fuse_reverse_stop_gradient = True
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: unet, stargan, uagan)")
  return c
