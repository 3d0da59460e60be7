"""Cross-validation, nnU-Net's way: one run per fold, and the recipe without folds beside them.

Arms ``fold0`` .. ``fold<K-1>``: segan's ``:demo`` recipe with ``--config.data.folds=K
--config.data.fold=k``: the test split of the plain split (the same seed and
data.test_fraction), the other cases in K folds, fold k validating on its part and training on
the rest (data.val_fraction ignored). Arm ``single``: the recipe as it is (train/val/test). One
seed: the folds are what varies. The runner trains them all (a stopped study resumes: the same
command again trains only what is missing) and scores each arm on the held-out test split and
``data_shifted`` as it scores any arm; its comparisons set each fold's model against the single
model, paired per test case. What the runner does not do is score the folds together: after it,

  uagan-jax evaluate --cross-validation --workdir OUT/runs/fold0/seed0 ... \
      --workdir OUT/runs/fold<K-1>/seed0 --data data_synth --out OUT/cv
  uagan-jax evaluate --workdir OUT/runs/fold0/seed0 ... --workdir OUT/runs/fold<K-1>/seed0 \
      --data data_synth --out OUT/ensemble  (the ensemble of the folds on the test split)
  uagan-jax evaluate --workdir OUT/runs/single/seed0 --data data_synth

scores each case of the non-test cases by the fold that held it out, the ensemble of the K
fold models, and the single model (docs/EVALUATION.md, "Cross-validation and ensembles").

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax synth --out data_shifted --cases 12 --seed 1 --shape 96 96 64 \
      --contrast-jitter 0.2 --noise 3 --bias 2.5
  uagan-jax study studies/cross_validation.py --out runs/cross_validation

The argument is ``[K][_smoke]``: ``studies/cross_validation.py:3`` for 3 folds (default 5);
``:smoke`` (or ``:3_smoke``): 2 steps, two test cases, no external set (a check that the study
runs, not a result).
"""

import ml_collections

from uagan_jax import study

DEFAULT_FOLDS = 5
RECIPE = "configs/segan.py:demo"


def get_config(variant: str = ""):
  folds_text, _, rest = variant.partition("_") if variant != "smoke" else ("", "", "smoke")
  if rest not in ("", "smoke") or (folds_text and not folds_text.isdigit()):
    raise ValueError(f"unknown variant {variant!r} (known: smoke, K, K_smoke: K folds, an "
                     "integer >= 2)")
  folds = int(folds_text) if folds_text else DEFAULT_FOLDS
  if folds < 2:
    raise ValueError(f"variant {variant!r}: give K >= 2 folds")
  s = ml_collections.ConfigDict()
  s.data = "data_synth"
  s.external = ("data_shifted",)
  s.seeds = (0,)
  s.arms = {"single": {"recipe": RECIPE}}
  for fold in range(folds):
    s.arms[f"fold{fold}"] = {"recipe": RECIPE, "overrides": (f"--config.data.folds={folds}",
                                                             f"--config.data.fold={fold}")}
  s.comparisons = tuple((f"fold{fold}", "single") for fold in range(folds))
  s.metrics = ("dice", "hd95")
  if rest == "smoke":
    study.smoke(s)
  return s
