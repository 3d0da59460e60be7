"""Scanner-shift augmentation, measured: a demo recipe trained with and without it.

Trains ``--config`` (default ``configs/segan.py:demo``) twice on the same phantoms, same seed and
steps: ``off`` is the recipe as it is (flips and intensity jitter only), ``on`` adds the
``data.augmentations`` of the matching full recipe (``configs/segan.py`` for
``configs/segan.py:demo``). Each model then segments, from every modality,
  * the held-out test cases of ``--data`` (the phantoms it was trained beside),
  * every case of ``--shifted``, phantoms written with other contrasts, noise and bias (never
    trained on), and
  * with ``--real CASE_DIR``, a real case,
and one table prints Dice WT/TC/ET per set (mean over cases and modalities), then one per
modality of the real case.

  uagan-jax synth --out data_synth --cases 80 --shape 96 96 64
  uagan-jax synth --out data_shifted --cases 12 --seed 1 --shape 96 96 64 \\
      --contrast-jitter 0.2 --noise 3 --bias 2.5
  python benchmarks/augmentation.py --data data_synth --shifted data_shifted \\
      --real PATH/TO/upenn_gbm_00003_11 --out runs/augmentation

Runs resume: a finished run is only scored again.
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


def augmentation_overrides(full_recipe: str) -> list[str]:
  """``--config.data.augmentations.*`` overrides that copy ``full_recipe``'s settings."""
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  settings = config_lib.load_config(full_recipe).data.augmentations
  return [f"--config.data.augmentations.{key}={value!r}" for key, value in settings.items()]


def dice_rows(rows: list[dict]) -> np.ndarray:
  """Dice [cases x modalities, WT/TC/ET] of `evaluate.evaluate_split`'s rows."""
  return np.array([[row[f"dice_{region}"] for region in REGIONS] for row in rows])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", type=pathlib.Path, required=True, help="training phantoms")
  parser.add_argument("--shifted", type=pathlib.Path, required=True,
                      help="phantoms with a scanner shift (synth --contrast-jitter/--noise/--bias)")
  parser.add_argument("--real", type=pathlib.Path, default=None, help="a real case's folder")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--config", default=str(ROOT / "configs" / "segan.py") + ":demo")
  parser.add_argument("--steps", type=int, default=0, help="default: the recipe's")
  parser.add_argument("--score-step", type=int, default=0,
                      help="score the checkpoint of this step (default: the newest); the learning "
                           "rate of the :demo recipes is constant, so step N of a longer run is "
                           "what an N-step run gives")
  parser.add_argument("--no-train", action="store_true", help="only score existing workdirs")
  parser.add_argument("--only", choices=("off", "on"), default=None,
                      help="train and score one setting (two processes may train both at once, "
                           "into the same --out); a last run without it prints the table")
  args = parser.parse_args(argv)

  # pylint: disable=g-import-not-at-top
  from uagan_jax import config as config_lib
  from uagan_jax import checkpoint, evaluate, inference, train, train_state
  from uagan_jax.errors import UserError
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  from results_table import score_external
  # pylint: enable=g-import-not-at-top
  log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
  steps = [f"--config.train.steps={args.steps}"] if args.steps else []
  full_recipe = args.config.partition(":")[0]
  settings = {"off": [], "on": augmentation_overrides(full_recipe)}
  if args.only:
    settings = {args.only: settings[args.only]}
  table, real_rows = {}, {}
  try:
    for name, overrides in settings.items():
      config = config_lib.load_config(args.config, overrides + steps)
      workdir = args.out / name
      if not args.no_train:
        log(f"=== {name}: {config.train.steps} steps into {workdir}")
        started = time.time()
        train.train_and_evaluate(config, workdir=workdir, data_dir=args.data, log=lambda _: None,
                                 evaluate_after=False)
        log(f"trained in {time.time() - started:.0f} s (0 if it had finished before)")
      # Scored from the checkpoint, as `uagan-jax evaluate` would.
      config, state, step = inference.load_model(workdir, capability="segments", task="segment")
      if args.score_step:
        checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=1_000_000)
        if args.score_step not in checkpoints.all_steps():
          raise UserError(f"{workdir / 'checkpoints'}: no checkpoint of step {args.score_step} "
                          f"(have {checkpoints.all_steps()})")
        state, step = checkpoints.restore(args.score_step, train_state.abstract_state(config)), \
            args.score_step
        checkpoints.close()
      # Scored as `uagan-jax evaluate` scores: the whole brain of each slice, resampled to the
      # recipe's spacing and back; the held-out split, then external sets.
      held_out = evaluate.evaluate_split(config, workdir=workdir, data_dir=args.data,
                                         split="test", state=state, curves=False,
                                         log=lambda _: None)["rows"]
      table[name] = {"held-out phantoms": dice_rows(held_out),
                     "shifted phantoms": dice_rows(score_external(config, state, workdir,
                                                                  args.shifted, lambda _: None))}
      if args.real is not None:
        rows = score_external(config, state, workdir, args.real, lambda _: None)
        real_rows[name] = rows
        table[name]["real case"] = dice_rows(rows)
      log(f"scored step {step}")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  sets = list(next(iter(table.values())))
  print(f"\nDice WT/TC/ET, mean over cases and modalities ({args.config}, step {step}):\n")
  print("| augmentation | " + " | ".join(sets) + " |")
  print("|---|" + "---|" * len(sets))
  for name, scores in table.items():
    cells = ["/".join(f"{v:.3f}" for v in scores[s].mean(axis=0)) for s in sets]
    print(f"| {name} | " + " | ".join(cells) + " |")
  if real_rows:
    modalities = [r["modality"] for r in next(iter(real_rows.values()))]
    print("\nThe real case per modality (Dice WT/TC/ET):\n")
    print("| augmentation | " + " | ".join(modalities) + " |")
    print("|---|" + "---|" * len(modalities))
    for name, rows in real_rows.items():
      print(f"| {name} | " + " | ".join("/".join(f"{r[f'dice_{k}']:.3f}" for k in REGIONS)
                                       for r in rows) + " |")
  report = {name: {s: scores[s].tolist() for s in scores} for name, scores in table.items()}
  (args.out / f"augmentation{'_' + args.only if args.only else ''}.json").write_text(json.dumps(
      {"config": args.config, "dice_rows_WT_TC_ET": report, "real": real_rows}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
