"""The README's results table: every segmenting family (unet, segan, uagan) on held-out synthetic
cases, on phantoms from another "scanner", and (optionally) on a real case.

Each family's ``:study`` recipe (the demo's networks and slices, 8 slices a step; one model for
all modalities, unpaired) at the first study budget (`uagan_jax.study.FIRST_BUDGET_OVERRIDES`: 400
steps, S's and C's peak rate 1e-3), trained with seeds 0, 1 and 2: the runs of the ``*_off`` arms
of studies/augmentation.py, bit for bit (that study makes these comparisons too). Every model segments the held-out test cases of its
seed's split and every case of the external folders from each modality, scored as
``uagan-jax evaluate`` scores them; uagan is compared with unet and with segan, and segan with
unet. The data (synthetic phantoms; the shifted set never trained on):

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax synth --out data_shifted --cases 12 --seed 1 --shape 96 96 64 \
      --contrast-jitter 0.2 --noise 3 --bias 2.5
  uagan-jax study studies/results_table.py --out runs/results_table \
      [--external UPENN_CASE_DIR]   # a folder holding UPENN-GBM case 00003_11

``:smoke`` runs the same arms for 2 steps with one seed and no external set (a check that the
study runs end to end, not a result). Runs resume: the same command again trains only what is
missing.
"""

import ml_collections

from uagan_jax import study

FAMILIES = ("unet", "segan", "uagan")


def get_config(variant: str = ""):
  s = ml_collections.ConfigDict()
  s.data = "data_synth"
  s.external = ("data_shifted",)
  s.seeds = (0, 1, 2)
  s.arms = {family: {"recipe": f"configs/{family}.py:study"} for family in FAMILIES}
  s.comparisons = (("uagan", "unet"), ("uagan", "segan"), ("segan", "unet"))
  s.metrics = ("dice", "hd95")
  s.overrides = ("--config.eval.panels=0",)  # the study reads the scores, not the pictures
  s.overrides += study.FIRST_BUDGET_OVERRIDES  # 400 steps at 1e-3: the tables in the docs
  if variant == "smoke":
    study.smoke(s)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: smoke)")
  return s
