"""The README's results table: every segmenting family (unet, segan, uagan) on held-out synthetic
cases, and the real case.

Trains each family's ``:demo`` recipe (same sizes, steps and data; one model for all modalities,
unpaired), scores the held-out test cases from every modality with the BraTS metrics of
``uagan-jax evaluate``, and prints Dice and HD95 per region (mean over cases and modalities), then
per modality. With ``--shifted DIR`` (phantoms from another "scanner") and ``--real CASE_DIR``
the same models, trained on the phantoms only, also segment those cases from every modality, as
``uagan-jax evaluate --data DIR`` scores an external test set, and are scored against their
labels.

  uagan-jax synth --out data_synth --cases 80 --seed 0 --shape 96 96 64
  uagan-jax synth --out data_shifted --cases 12 --seed 1 --shape 96 96 64 \
      --contrast-jitter 0.2 --noise 3 --bias 2.5
  python benchmarks/results_table.py --data data_synth --out runs/results \
      --shifted data_shifted --real ../shared/data/upenn_gbm_00003_11

Runs resume: a finished run is only evaluated again. ``--out`` may be shared with
``benchmarks/unified_vs_single.py``, whose ``uagan`` run is the same.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np

from uagan_jax import families

# The families that segment, each by its configs/<family>.py:demo recipe.
FAMILIES = families.with_capability(segments=True)


def _mean(rows, key) -> float:
  return float(np.mean([row[key] for row in rows]))


def score_external(config, state, workdir: pathlib.Path, data_dir: pathlib.Path, log) -> list[dict]:
  """Rows (one per case and modality) of the BraTS metrics of ``state`` on every case of
  ``data_dir``, scored as ``uagan-jax evaluate --data DIR`` scores an external test set: the
  whole brain of each slice, resampled to the recipe's spacing and back."""
  from uagan_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.evaluate_split(config, workdir=workdir, data_dir=data_dir, split="all",
                                 state=state, curves=False, log=log)["rows"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", type=pathlib.Path, required=True)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--real", type=pathlib.Path, default=None,
                      help="a labelled case folder scored by the synthetic-trained models")
  parser.add_argument("--shifted", type=pathlib.Path, default=None,
                      help="a phantom set from another 'scanner' (synth --contrast-jitter, "
                           "--noise, --bias, another seed), scored by the same models")
  parser.add_argument("--steps", type=int, default=0, help="default: the demo recipes' steps")
  args = parser.parse_args(argv)

  # pylint: disable=g-import-not-at-top
  from uagan_jax import config as config_lib
  from uagan_jax import evaluate, train
  from uagan_jax.data import MODALITIES, REGIONS
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  steps = [f"--config.train.steps={args.steps}"] if args.steps else []
  log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
  held_out, real, shifted = {}, {}, {}
  try:
    for family in FAMILIES:
      config = config_lib.load_config(f"{root / 'configs' / family}.py:demo", steps)
      workdir = args.out / family
      log(f"=== {family}: {config.train.steps} steps into {workdir}")
      state = train.train_and_evaluate(config, workdir=workdir, data_dir=args.data,
                                       log=lambda m: None, evaluate_after=False)
      held_out[family] = evaluate.evaluate_split(config, workdir=workdir, data_dir=args.data,
                                                 state=state, log=log)["rows"]
      if args.shifted is not None:
        shifted[family] = score_external(config, state, workdir, args.shifted, log)
      if args.real is not None:
        real[family] = score_external(config, state, workdir, args.real, log)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  cases = len({row["case"] for row in held_out[FAMILIES[0]]})
  header = ("| model | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | "
            + " | ".join(f"HD95 {r} (mm)" for r in REGIONS) + " |")
  rule = "|---" * (1 + 2 * len(REGIONS)) + "|"

  def line(name, rows):
    return (f"| {name} | " + " | ".join(f"{_mean(rows, f'dice_{r}'):.3f}" for r in REGIONS) + " | "
            + " | ".join(f"{_mean(rows, f'hd95_{r}'):.1f}" for r in REGIONS) + " |")

  out = [f"Held-out synthetic cases ({cases} test cases x {len(MODALITIES)} modalities, mean):",
         header, rule] + [line(f, held_out[f]) for f in FAMILIES]
  out += ["", "Per modality (Dice WT/TC/ET):", "| model | " + " | ".join(MODALITIES) + " |",
          "|---" * (1 + len(MODALITIES)) + "|"]
  for family in FAMILIES:
    cells = []
    for modality in MODALITIES:
      rows = [row for row in held_out[family] if row["modality"] == modality]
      cells.append("/".join(f"{_mean(rows, f'dice_{r}'):.2f}" for r in REGIONS))
    out.append(f"| {family} | " + " | ".join(cells) + " |")
  if shifted:
    out += ["", f"Shifted phantoms ({len({r['case'] for r in shifted[FAMILIES[0]]})} cases of "
            f"{args.shifted.name}, another scanner; never trained on; mean over cases and "
            "modalities):", header, rule] + [line(f, shifted[f]) for f in FAMILIES]
  if real:
    case_id = real[FAMILIES[0]][0]["case"]
    out += ["", f"Real case {case_id} (trained on synthetic data only; mean over modalities):",
            header, rule] + [line(f, real[f]) for f in FAMILIES]
  print("\n".join(out))
  report = {"held_out": held_out, "shifted": shifted, "real": real, "cases": cases}
  (args.out / "results_table.json").write_text(json.dumps(
      report, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
  (args.out / "results_table.md").write_text("\n".join(out) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
