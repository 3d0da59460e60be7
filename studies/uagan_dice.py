"""How uagan's Dice is pooled, measured: over the batch against a batch Dice per modality.

uagan trains all four modalities in one batch. ``batch`` (the recipe's ``loss.dice_reduction``)
pools each region's Dice over the whole batch, so one modality's misses can hide behind the
others' hits; ``modality_batch`` takes a batch Dice per source modality and averages them. Four
arms of ``configs/uagan.py:study`` at the first study budget
(`uagan_jax.study.FIRST_BUDGET_OVERRIDES`: 400 steps, S's and C's peak rate 1e-3), seeds 0, 1, 2:
each pooling without (``_off``: flips and intensity jitter) and with (``_on``) the full recipes'
augmentation (`uagan_jax.config.FULL_RECIPE_AUGMENTATIONS`). The ``batch_*`` arms are
studies/augmentation.py's ``uagan_*`` arms, bit for bit. Scored on each seed's held-out phantoms
from every modality.

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax study studies/uagan_dice.py --out runs/uagan_dice

``:on`` keeps the two arms with augmentation (where ``batch`` lost a modality);
``:smoke``: 2 steps, one seed, two test cases (a check that the study runs, not a result). Runs
resume: the same command again trains only what is missing.
"""

import ml_collections

from uagan_jax import study


def get_config(variant: str = ""):
  if variant not in ("", "on", "smoke"):
    raise ValueError(f"unknown variant {variant!r} (known: on, smoke)")
  on = study.FULL_AUGMENTATION_OVERRIDES
  s = ml_collections.ConfigDict()
  s.data = "data_synth"
  s.seeds = (0, 1, 2)
  s.arms = {}
  for pooling in ("batch", "modality_batch"):
    name = "modality" if pooling == "modality_batch" else pooling
    pooled = (f"--config.loss.dice_reduction={pooling}",)
    s.arms[f"{name}_off"] = {"recipe": "configs/uagan.py:study", "overrides": pooled}
    s.arms[f"{name}_on"] = {"recipe": "configs/uagan.py:study", "overrides": pooled + on}
  s.comparisons = (("modality_off", "batch_off"), ("modality_on", "batch_on"),
                   ("modality_on", "modality_off"), ("batch_on", "batch_off"))
  if variant == "on":
    s.arms = {name: arm for name, arm in s.arms.items() if name.endswith("_on")}
    s.comparisons = (("modality_on", "batch_on"),)
  s.metrics = ("dice", "hd95")
  s.overrides = ("--config.eval.panels=0",)  # the study reads the scores, not the pictures
  s.overrides += study.FIRST_BUDGET_OVERRIDES  # 400 steps at 1e-3: the tables in the docs
  if variant == "smoke":
    study.smoke(s)
  return s
