"""The UAGAN paper's claim, measured: one unified model against one SegAN per modality.

Both arms train the ``:study`` recipes (the demo's networks and slices, 8 slices a step) at the
first study budget (`uagan_jax.study.FIRST_BUDGET_OVERRIDES`: 400 steps, the rate decaying from
step 100, S's and C's peak 1e-3: the budget of the tables in docs/EXPERIMENTS.md) with seeds 0, 1
and 2:
  * ``unified``: ONE uagan model for all four modalities, under ``data.protocol`` ``unpaired``
    (the paper's claim: each training patient contributes one modality); ``:all`` trains it on
    every modality of every training patient instead;
  * ``single``: one SegAN per modality m (``per_modality``: ``data.modalities=('m',)``),
    trained on modality m of every training patient (so under ``unpaired`` each single-modality
    model sees four times as many images of its modality; under ``all`` both see the same),
    and scored on modality m only.
Every held-out case is segmented from each modality by both arms and compared per modality
(``single``'s number for m is its model for m) and over the four.

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax study studies/unified_vs_single.py --out runs/unified_vs_single
  uagan-jax study studies/unified_vs_single.py:all --out runs/unified_vs_single_all

``:smoke`` (and ``:all_smoke``): 2 steps, one seed, two test cases; a check that the study runs,
not a result. Runs resume: the same command again trains only what is missing.
"""

import ml_collections

from uagan_jax import study


def get_config(variant: str = ""):
  protocol, _, smoke = variant.partition("_") if variant != "smoke" else ("", "", "smoke")
  if protocol not in ("", "all") or smoke not in ("", "smoke"):
    raise ValueError(f"unknown variant {variant!r} (known: all, smoke, all_smoke)")
  s = ml_collections.ConfigDict()
  s.data = "data_synth"
  s.seeds = (0, 1, 2)
  s.arms = {
      "unified": {"recipe": "configs/uagan.py:study",
                  "overrides": (f"--config.data.protocol={protocol or 'unpaired'}",)},
      "single": {"recipe": "configs/segan.py:study", "per_modality": True},
  }
  s.comparisons = (("unified", "single"),)
  s.metrics = ("dice", "hd95")
  s.overrides = ("--config.eval.panels=0",)  # the study reads the scores, not the pictures
  s.overrides += study.FIRST_BUDGET_OVERRIDES  # 400 steps at 1e-3: the tables in the docs
  if smoke:
    study.smoke(s)
  return s
