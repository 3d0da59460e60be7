"""The peak learning rate at the study budget: does a lower rate keep every tumour region?

At 1,200 steps of 8 slices at a peak rate of 1e-3 (studies/augmentation.py:segan_long) segan's
tumour core and enhancing tumour switched off for whole modalities in 2 of 3 seeds without
augmentation and in every seed with it. Four arms of ``configs/segan.py:study`` (1,200 steps of 8
slices, the rate constant to step 300 and then decaying linearly to a tenth at step 1,200), seeds
0, 1 and 2: ``lr1e-3_*`` at S's and C's peak rate of runs before 2026-12-08 and ``lr3e-4_*`` at the
recipe's (3e-4, set here too), each without (``_off``: flips and intensity jitter) and with
(``_on``) the full recipes' augmentation (`uagan_jax.config.FULL_RECIPE_AUGMENTATIONS`). The
``lr1e-3_*`` arms are studies/augmentation.py:segan_long's ``segan_*`` arms, bit for bit. Scored on
each seed's held-out phantoms from every modality.

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax study studies/learning_rate.py --out runs/learning_rate
  python benchmarks/region_collapse.py runs/learning_rate/study.json

``:unet``: the ``lr3e-4`` arms for unet (``configs/unet.py:study``; it has no critic, so only S's
rate is set). ``:uagan``: the ``lr3e-4`` arms for uagan (``configs/uagan.py:study``; G's and D's
rate 5e-4 as they are). At the first studies' 400 steps uagan lost T1 in 2 of 3 seeds with
augmentation at 1e-3, and ET from every modality in seed 0 at 3e-4. ``:smoke``: 2 steps, one seed,
two test cases (a check that the study runs, not a result). Runs resume: the same command again
trains only what is missing.
"""

import ml_collections

from uagan_jax import study

PEAK_RATES = {"lr1e-3": study.PEAK_RATE_1E3_OVERRIDES,
              "lr3e-4": ("--config.optim.segmentor_lr=0.0003", "--config.optim.critic_lr=0.0003")}


def get_config(variant: str = ""):
  if variant not in ("", "unet", "uagan", "smoke"):
    raise ValueError(f"unknown variant {variant!r} (known: unet, uagan, smoke)")
  on = study.FULL_AUGMENTATION_OVERRIDES
  s = ml_collections.ConfigDict()
  s.data = "data_synth"
  s.seeds = (0, 1, 2)
  s.arms = {}
  for name, rate in PEAK_RATES.items():
    s.arms[f"{name}_off"] = {"recipe": "configs/segan.py:study", "overrides": rate}
    s.arms[f"{name}_on"] = {"recipe": "configs/segan.py:study", "overrides": rate + on}
  s.comparisons = (("lr3e-4_off", "lr1e-3_off"), ("lr3e-4_on", "lr1e-3_on"),
                   ("lr3e-4_on", "lr3e-4_off"), ("lr1e-3_on", "lr1e-3_off"))
  if variant == "unet":
    rate = ("--config.optim.segmentor_lr=0.0003",)
    s.arms = {"lr3e-4_off": {"recipe": "configs/unet.py:study", "overrides": rate},
              "lr3e-4_on": {"recipe": "configs/unet.py:study", "overrides": rate + on}}
    s.comparisons = (("lr3e-4_on", "lr3e-4_off"),)
  if variant == "uagan":
    rate = PEAK_RATES["lr3e-4"]
    s.arms = {"lr3e-4_off": {"recipe": "configs/uagan.py:study", "overrides": rate},
              "lr3e-4_on": {"recipe": "configs/uagan.py:study", "overrides": rate + on}}
    s.comparisons = (("lr3e-4_on", "lr3e-4_off"),)
  s.metrics = ("dice", "hd95")
  s.overrides = ("--config.eval.panels=0",)
  if variant == "smoke":
    study.smoke(s)
  return s
