"""Numbers a refactor must not change: short runs of every family, printed as digests and values.

A move of code (not of arithmetic) must leave these identical. Uses only the command line and the
files a run writes, so it runs unchanged against any revision of the project:

  python benchmarks/fingerprint.py --out /tmp/fp_before       # on the old tree
  python benchmarks/fingerprint.py --out /tmp/fp_after        # on the new tree
  diff /tmp/fp_before/fingerprint.json /tmp/fp_after/fingerprint.json

For each family it trains ``configs/test.py:<family>`` (tiny networks, 4 steps, every step logged)
and evaluates the held-out cases; and it runs 12 steps of each ``configs/<family>.py:demo`` recipe
(the recipes' own options at demo width, every 4th step logged, no validation or evaluation). It
prints the digest of each ``metrics.jsonl`` and of the evaluation's ``summary.json`` (the numbers
only), and the last logged row, so that a difference shows where it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys

# Every family the tree registers; against an older tree without the table, name them.
try:
  from uagan_jax import families as _families  # pylint: disable=g-import-not-at-top
  FAMILIES = _families.names()
except ImportError:
  FAMILIES = ("unet", "segan", "stargan", "uagan")


def _run(*argv: str) -> None:
  command = [sys.executable, "-m", "uagan_jax", *argv]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _numbers(report: dict) -> dict:
  """summary.json without what names the run (paths, definitions text)."""
  return {k: v for k, v in report.items() if k not in ("definitions",)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for data and runs")
  parser.add_argument("--families", nargs="*", default=FAMILIES)
  args = parser.parse_args()
  root = pathlib.Path(__file__).resolve().parents[1]
  args.out.mkdir(parents=True, exist_ok=True)
  tiny, demo = args.out / "data_tiny", args.out / "data_demo"
  if not tiny.is_dir():
    _run("synth", "--out", str(tiny), "--cases", "8", "--seed", "0", "--shape", "32", "32", "32")
  if not demo.is_dir():
    _run("synth", "--out", str(demo), "--cases", "8", "--seed", "0", "--shape", "96", "96", "32")
  result = {}
  for family in args.families:
    variant = "" if family == "segan" else f":{family}"  # configs/test.py's default is segan
    workdir = args.out / f"test_{family}"
    _run("train", "--config", f"{root}/configs/test.py{variant}", "--data", str(tiny),
         "--workdir", str(workdir))
    metrics = (workdir / "metrics.jsonl").read_text()
    summary = _numbers(json.loads((workdir / "eval_test" / "summary.json").read_text()))
    result[f"test:{family}"] = {
        "metrics.jsonl": _digest(metrics), "summary.json": _digest(json.dumps(summary,
                                                                               sort_keys=True)),
        "last_row": json.loads(metrics.splitlines()[-1])}
    workdir = args.out / f"demo_{family}"
    _run("train", "--config", f"{root}/configs/{family}.py:demo", "--data", str(demo),
         "--workdir", str(workdir), "--no-eval", "--config.train.steps=12",
         "--config.train.log_every=4", "--config.train.validate_every=0",
         "--config.train.checkpoint_every=12", "--config.data.val_fraction=0.0")
    metrics = (workdir / "metrics.jsonl").read_text()
    result[f"demo:{family}"] = {"metrics.jsonl": _digest(metrics),
                                "last_row": json.loads(metrics.splitlines()[-1])}
    print(f"{family}: test metrics {result[f'test:{family}']['metrics.jsonl']} summary "
          f"{result[f'test:{family}']['summary.json']}; demo metrics "
          f"{result[f'demo:{family}']['metrics.jsonl']}", flush=True)
  (args.out / "fingerprint.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
  print(f"wrote {args.out / 'fingerprint.json'}")


if __name__ == "__main__":
  main()
