"""Mixed precision, measured: a demo recipe trained in float32 and in bfloat16.

Trains ``--config`` (default ``configs/segan.py:demo``) twice on the same phantoms, with the same
seed, data and steps, once with ``model.dtype=float32`` and once with ``model.dtype=bfloat16``
(bfloat16 convolutions and activations; float32 parameters, optimizer state, norm statistics and
losses). Then prints, side by side, the main losses at every logged step of both
``metrics.jsonl``, the held-out Dice WT/TC/ET of both (the test split, scored as
``uagan-jax evaluate`` scores it) and the wall time of each run.

  uagan-jax synth --out data_synth --cases 80 --shape 96 96 64
  python benchmarks/mixed_precision.py --data data_synth --out runs/mixed_precision
  python benchmarks/mixed_precision.py --data data_synth --out runs/mp_uagan \\
      --config configs/uagan.py:demo --steps 300

Runs resume: a finished run is only scored again (its wall time is the sum over its sessions).
On a CPU, bfloat16 is emulated (converted to float32 and back around each operation), so the
time there says nothing about a GPU or TPU, where bfloat16 runs on the matrix units.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
REGIONS = ("WT", "TC", "ET")
DTYPES = ("float32", "bfloat16")
# The losses the table shows when they are logged: each network's objective, and S's Dice.
MAIN_LOSSES = ("seg/total", "seg/dice", "critic/l1", "gen/total", "disc/total", "seg/shape")


def read_metrics(path: pathlib.Path) -> dict[int, dict]:
  """``metrics.jsonl`` as {step: row}; a resumed run's repeated steps keep their last row."""
  rows = {}
  for line in path.read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      rows[int(row["step"])] = row
  return rows


def loss_table(curves: dict[str, dict[int, dict]], losses: list[str]) -> list[str]:
  """Markdown lines: every step logged by both runs, each loss as float32 | bfloat16."""
  steps = sorted(set.intersection(*(set(rows) for rows in curves.values())))
  header = "| step | " + " | ".join(f"{loss} {dtype}" for loss in losses for dtype in curves) + " |"
  lines = [header, "|---:|" + "---:|" * (len(losses) * len(curves))]
  for step in steps:
    cells = [f"{curves[dtype][step].get(loss, float('nan')):.4f}"
             for loss in losses for dtype in curves]
    lines.append(f"| {step} | " + " | ".join(cells) + " |")
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", type=pathlib.Path, required=True, help="training phantoms")
  parser.add_argument("--out", type=pathlib.Path, required=True,
                      help="the runs go to OUT/float32 and OUT/bfloat16")
  parser.add_argument("--config", default=str(ROOT / "configs" / "segan.py") + ":demo")
  parser.add_argument("--steps", type=int, default=0, help="default: the recipe's")
  parser.add_argument("--losses", default="",
                      help="comma-separated metrics.jsonl keys to tabulate (default: the main "
                           f"losses the family logs, of {', '.join(MAIN_LOSSES)})")
  args = parser.parse_args(argv)

  # pylint: disable=g-import-not-at-top
  import jax
  from uagan_jax import config as config_lib
  from uagan_jax import evaluate, families, inference, train
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
  steps = [f"--config.train.steps={args.steps}"] if args.steps else []
  curves, dice, wall = {}, {}, {}
  try:
    for dtype in DTYPES:
      config = config_lib.load_config(args.config, [f"--config.model.dtype={dtype}"] + steps)
      workdir = args.out / dtype
      log(f"=== {dtype}: {config.train.steps} steps of {args.config} into {workdir}")
      # The wall time of a resumed run adds up over its sessions (a finished run adds ~0).
      timing = workdir / "wall_time.json"
      previous = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
      started = time.time()
      train.train_and_evaluate(config, workdir=workdir, data_dir=args.data, log=log,
                               evaluate_after=False)
      wall[dtype] = previous + time.time() - started
      timing.write_text(json.dumps({"seconds": wall[dtype]}))
      curves[dtype] = read_metrics(workdir / "metrics.jsonl")
      if families.get(config.model.name).segments:
        # Scored from the checkpoint, as `uagan-jax evaluate` would: the held-out split.
        config, state, step = inference.load_model(workdir, capability="segments",
                                                   task="segment")
        rows = evaluate.evaluate_split(config, workdir=workdir, data_dir=args.data, split="test",
                                       state=state, curves=False, log=lambda _: None)["rows"]
        dice[dtype] = np.array([[row[f"dice_{region}"] for region in REGIONS] for row in rows])
        log(f"scored step {step} on {len(rows)} held-out case-modality pairs")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  logged = set.intersection(*(set(row) for rows in curves.values() for row in rows.values()))
  losses = ([k.strip() for k in args.losses.split(",") if k.strip()] if args.losses
            else [k for k in MAIN_LOSSES if k in logged])
  print(f"\n{args.config}, {config.train.steps} steps: losses at every logged step "
        "(float32 | bfloat16)\n")
  print("\n".join(loss_table(curves, losses)))
  print("\n| dtype | held-out Dice WT/TC/ET (mean over cases and modalities) | wall time |")
  print("|---|---|---:|")
  for dtype in DTYPES:
    scores = ("/".join(f"{v:.3f}" for v in dice[dtype].mean(axis=0)) if dtype in dice
              else "(does not segment)")
    print(f"| {dtype} | {scores} | {wall[dtype]:.0f} s |")
  platform = jax.devices()[0].platform
  if platform == "cpu":
    print("\nOn a CPU bfloat16 is emulated (each operation converts to float32 and back), so the "
          "wall times say nothing about a GPU or TPU, where bfloat16 runs on the matrix units; "
          "a resumed run's time is the sum of its sessions, and a shared machine's load is in it.")
  (args.out / "mixed_precision.json").write_text(json.dumps({
      "config": args.config, "steps": config.train.steps, "platform": platform,
      "losses": {dtype: [curves[dtype][s] for s in sorted(curves[dtype])] for dtype in curves},
      "dice_rows_WT_TC_ET": {dtype: scores.tolist() for dtype, scores in dice.items()},
      "wall_seconds": wall}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
