"""Scanner-shift augmentation on against off, and the three families against each other, at
the first study budget (``:study``'s networks and slices, 8 slices a step, with
`uagan_jax.study.FIRST_BUDGET_OVERRIDES`: 400 steps, S's and C's peak rate 1e-3, the budget its
tables in docs/EXPERIMENTS.md were measured at; ``:segan_long``: the recipe's 1,200 steps, at 1e-3).

For unet, segan and uagan, ``<family>_off`` is the ``:study`` recipe as it is (flips and intensity
jitter only) and ``<family>_on`` adds the ``data.augmentations`` of the full recipes
(`uagan_jax.config.FULL_RECIPE_AUGMENTATIONS`, nnU-Net-like); same data, seeds 0, 1 and 2, and
steps. Each model segments its seed's held-out phantoms and every case of ``data_shifted``,
phantoms with other contrasts, noise and bias (never trained on), from every modality. The
comparisons: on against off per family; then, without augmentation, uagan against unet and
segan, and segan against unet (the same arms as studies/results_table.py, bit for bit).

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax synth --out data_shifted --cases 12 --seed 1 --shape 96 96 64 \
      --contrast-jitter 0.2 --noise 3 --bias 2.5
  uagan-jax study studies/augmentation.py --out runs/augmentation \
      [--external UPENN_CASE_DIR]   # a folder holding UPENN-GBM case 00003_11

``:segan`` keeps segan's two arms only; ``:segan_long`` trains them three times as long (1,200
steps, the learning rate decaying from step 300 to 1,200; issue 25's longer budget: does the
answer change with the steps?); ``:recipes``: the six arms at the recipes' own ``:study`` (1,200
steps at a peak rate of 3e-4 since 2026-12-08, where no run lost a region in
studies/learning_rate.py; its uagan arms are that file's ``:uagan`` arms, bit for bit), scored on
the held-out phantoms only; ``:smoke``: 2 steps, one seed, two test cases, no external set (a check
that the study runs, not a result). Runs resume: the same command again
trains only what is missing.
"""

import ml_collections

from uagan_jax import study

FAMILIES = ("unet", "segan", "uagan")


def get_config(variant: str = ""):
  if variant not in ("", "segan", "segan_long", "recipes", "smoke"):
    raise ValueError(f"unknown variant {variant!r} (known: segan, segan_long, recipes, smoke)")
  on = study.FULL_AUGMENTATION_OVERRIDES
  families = ("segan",) if variant.startswith("segan") else FAMILIES
  s = ml_collections.ConfigDict()
  s.data = "data_synth"
  s.external = () if variant == "recipes" else ("data_shifted",)
  s.seeds = (0, 1, 2)
  s.arms = {}
  for family in families:
    s.arms[f"{family}_off"] = {"recipe": f"configs/{family}.py:study"}
    s.arms[f"{family}_on"] = {"recipe": f"configs/{family}.py:study", "overrides": on}
  s.comparisons = tuple((f"{family}_on", f"{family}_off") for family in families)
  if not variant.startswith("segan"):
    s.comparisons += (("uagan_off", "unet_off"), ("uagan_off", "segan_off"),
                      ("segan_off", "unet_off"))
  s.metrics = ("dice", "hd95")
  s.overrides = ("--config.eval.panels=0",)  # the study reads the scores, not the pictures
  # The first budget (400 steps at 1e-3); segan_long: the recipe's 1,200 steps, at 1e-3 too;
  # recipes: the recipes' own :study.
  if variant == "segan_long":
    s.overrides += study.PEAK_RATE_1E3_OVERRIDES
  elif variant != "recipes":
    s.overrides += study.FIRST_BUDGET_OVERRIDES
  if variant == "smoke":
    study.smoke(s)
  return s
