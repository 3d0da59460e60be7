"""The UAGAN paper's claim, measured: one unified model against one SegAN per modality.

Trains, with the same number of steps, batch and network sizes (the ``:demo`` recipes):
  * ``uagan``: ONE model for all four modalities, on unpaired data (each training patient
    contributes one modality);
  * ``segan_<m>``: one SegAN per modality m, trained on modality m of *every* training patient
    (so each single-modality model sees four times as many images of its modality).
Then segments every held-out case from each modality and prints Dice per region and modality for
both, side by side. Runs resume: a finished run is only re-evaluated.

  python benchmarks/unified_vs_single.py --data data_synth --out runs/unified_vs_single
  python benchmarks/unified_vs_single.py --data data_synth --out runs/uvs --steps 300
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", type=pathlib.Path, required=True)
  parser.add_argument("--out", type=pathlib.Path, required=True)
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
  runs = {"uagan": (root / "configs" / "uagan.py", [])}
  for modality in MODALITIES:
    runs[f"segan_{modality}"] = (root / "configs" / "segan.py",
                                 [f"--config.data.modalities=('{modality}',)"])
  log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
  results = {}
  try:
    for name, (path, overrides) in runs.items():
      config = config_lib.load_config(f"{path}:demo", overrides + steps)
      workdir = args.out / name
      log(f"=== {name}: {config.train.steps} steps into {workdir}")
      state = train.train_and_evaluate(config, workdir=workdir, data_dir=args.data,
                                       log=lambda m: None, evaluate_after=False)
      results[name] = evaluate.evaluate_split(config, workdir=workdir, data_dir=args.data,
                                              state=state, log=log)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  def mean(rows, modality, region):
    return float(np.mean([r[f"dice_{region}"] for r in rows if r["modality"] == modality]))

  cases = len({r["case"] for r in results["uagan"]["rows"]})
  lines = [f"Held-out Dice ({cases} test cases), same steps and sizes; "
           "uagan = one model for all modalities, segan = one model per modality",
           f"{'modality':<9}{'region':<7}{'uagan':>8}{'segan':>8}"]
  table = {}
  for modality in MODALITIES:
    for region in REGIONS:
      unified = mean(results["uagan"]["rows"], modality, region)
      single = mean(results[f"segan_{modality}"]["rows"], modality, region)
      table[f"{modality}/{region}"] = {"uagan": unified, "segan": single}
      lines.append(f"{modality:<9}{region:<7}{unified:>8.3f}{single:>8.3f}")
  averages = {k: float(np.mean([v[k] for v in table.values()])) for k in ("uagan", "segan")}
  lines.append(f"{'mean':<16}{averages['uagan']:>8.3f}{averages['segan']:>8.3f}")
  print("\n".join(lines))
  (args.out / "unified_vs_single.json").write_text(json.dumps(
      {"dice": table, "mean": averages, "cases": cases}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
