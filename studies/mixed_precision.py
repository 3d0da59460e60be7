"""Mixed precision, measured: the segan recipe at the study budget in float32 and in bfloat16.

Both arms train ``configs/segan.py:study`` (the demo's networks and slices, 8 slices a step) at
the first study budget (`uagan_jax.study.FIRST_BUDGET_OVERRIDES`: 400 steps, S's and C's peak rate
1e-3, the budget of its table in docs/EXPERIMENTS.md) with the same data, seeds (0, 1, 2) and
steps, one with ``model.dtype=float32`` and one with ``model.dtype=bfloat16`` (bfloat16
convolutions and activations; float32 parameters, optimizer state, norm statistics and losses),
and are compared on the held-out cases; study.md's runs table gives each run's training time.
The losses of both are in each workdir's metrics.jsonl (and TensorBoard).

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax study studies/mixed_precision.py --out runs/mixed_precision
  uagan-jax study studies/mixed_precision.py:uagan --out runs/mixed_precision_uagan

``:uagan`` measures configs/uagan.py:study instead; ``:smoke``: 2 steps, one seed, two test
cases (a check that the study runs, not a result). On a CPU bfloat16 is emulated (converted to
float32 and back around each operation), so the times there say nothing about a GPU or TPU.
Runs resume: the same command again trains only what is missing.
"""

import ml_collections

from uagan_jax import study


def get_config(variant: str = ""):
  if variant not in ("", "uagan", "smoke"):
    raise ValueError(f"unknown variant {variant!r} (known: uagan, smoke)")
  recipe = f"configs/{'uagan' if variant == 'uagan' else 'segan'}.py:study"
  s = ml_collections.ConfigDict()
  s.data = "data_synth"
  s.seeds = (0, 1, 2)
  s.arms = {dtype: {"recipe": recipe, "overrides": (f"--config.model.dtype={dtype}",)}
            for dtype in ("float32", "bfloat16")}
  s.comparisons = (("bfloat16", "float32"),)
  s.metrics = ("dice", "hd95")
  s.overrides = ("--config.eval.panels=0",)  # the study reads the scores, not the pictures
  s.overrides += study.FIRST_BUDGET_OVERRIDES  # 400 steps at 1e-3: the tables in the docs
  if variant == "smoke":
    study.smoke(s)
  return s
