"""The UAGAN paper's claim, measured: one unified model against one SegAN per modality.

Trains, with the same number of steps, batch and network sizes (the ``:demo`` recipes):
  * ``uagan``: ONE model for all four modalities, under ``--protocol`` (``data.protocol``):
    ``unpaired`` (the default, the paper's claim: each training patient contributes one
    modality) or ``all`` (every modality of every training patient);
  * ``segan_<m>``: one SegAN per modality m, trained on modality m of *every* training patient
    (so under ``unpaired`` each single-modality model sees four times as many images of its
    modality; under ``all`` both see the same images of it).
Then segments every held-out case from each modality and prints Dice per region and modality for
both, side by side, with the protocol the unified model ran (also in the JSON). Runs resume: a
finished run is only re-evaluated; each protocol has its own ``uagan`` workdir.

  python benchmarks/unified_vs_single.py --data data_synth --out runs/unified_vs_single
  python benchmarks/unified_vs_single.py --data data_synth --out runs/uvs --steps 300
  python benchmarks/unified_vs_single.py --data data_synth --out runs/uvs --protocol all
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
  parser.add_argument("--protocol", default="unpaired", choices=("unpaired", "all"),
                      help="the unified model's data.protocol (default: unpaired, the paper's)")
  args = parser.parse_args(argv)

  # pylint: disable=g-import-not-at-top
  from uagan_jax import config as config_lib
  from uagan_jax import evaluate, train
  from uagan_jax.data import MODALITIES, REGIONS
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  steps = [f"--config.train.steps={args.steps}"] if args.steps else []
  # The unpaired run keeps the name it always had, so its earlier workdirs resume.
  unified = "uagan" if args.protocol == "unpaired" else f"uagan_{args.protocol}"
  runs = {unified: (root / "configs" / "uagan.py", [f"--config.data.protocol={args.protocol}"])}
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

  cases = len({r["case"] for r in results[unified]["rows"]})
  trains_on = {"unpaired": "one modality of each training patient (data.protocol unpaired)",
               "all": "every modality of each training patient (data.protocol all)"}
  lines = [f"Held-out Dice ({cases} test cases), same steps and sizes; "
           f"uagan = one model for all modalities, trained on {trains_on[args.protocol]}; "
           "segan = one model per modality",
           f"{'modality':<9}{'region':<7}{'uagan':>8}{'segan':>8}"]
  table = {}
  for modality in MODALITIES:
    for region in REGIONS:
      one_model = mean(results[unified]["rows"], modality, region)
      single = mean(results[f"segan_{modality}"]["rows"], modality, region)
      table[f"{modality}/{region}"] = {"uagan": one_model, "segan": single}
      lines.append(f"{modality:<9}{region:<7}{one_model:>8.3f}{single:>8.3f}")
  averages = {k: float(np.mean([v[k] for v in table.values()])) for k in ("uagan", "segan")}
  lines.append(f"{'mean':<16}{averages['uagan']:>8.3f}{averages['segan']:>8.3f}")
  print("\n".join(lines))
  name = ("unified_vs_single.json" if args.protocol == "unpaired"
          else f"unified_vs_single_{args.protocol}.json")
  (args.out / name).write_text(json.dumps(
      {"protocol": args.protocol, "dice": table, "mean": averages, "cases": cases}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
