"""Did any run switch a tumour region off? Per run (arm x seed) and modality of a study, the mean
Dice of each region over the run's cases, with every (run, modality, region) below a floor named.

A region "collapses" when a model stops predicting it for a whole input modality (its Dice near 0
on every case): a mean over seeds can hide one dead seed, so this looks at each run alone.

  python benchmarks/region_collapse.py runs/augmentation/study.json [--floor 0.05] [--test-set test]

Prints one line per run and modality (Dice WT/TC/ET), then the runs, modalities and regions whose
mean is below the floor, and their count; exits 0 either way (it reports, it does not judge).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

REGIONS = ("WT", "TC", "ET")


def run_means(rows, *, test_set: str) -> dict[tuple[str, int, str], dict[str, float]]:
  """{(arm, seed, modality): {region: mean Dice over the run's cases}} for one test set."""
  values = collections.defaultdict(lambda: collections.defaultdict(list))
  for row in rows:
    if row["test_set"] != test_set:
      continue
    for region in REGIONS:
      values[(row["arm"], row["seed"], row["modality"])][region].append(row[f"dice_{region}"])
  return {key: {region: sum(v) / len(v) for region, v in per_region.items()}
          for key, per_region in values.items()}


def below(means, *, floor: float, regions=REGIONS) -> list[tuple[tuple[str, int, str], str, float]]:
  """The (run key, region, mean) whose mean is below ``floor``, in key order."""
  return [(key, region, means[key][region]) for key in sorted(means) for region in regions
          if means[key][region] < floor]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("study_json", type=pathlib.Path)
  parser.add_argument("--floor", type=float, default=0.05)
  parser.add_argument("--test-set", default="test", help="held-out split 'test' or an external "
                      "folder's name (default: test)")
  args = parser.parse_args(argv)
  try:
    report = json.loads(args.study_json.read_text())
  except (OSError, json.JSONDecodeError) as e:
    print(f"error: {args.study_json}: {e}", file=sys.stderr)
    return 2
  means = run_means(report["rows"], test_set=args.test_set)
  if not means:
    print(f"error: {args.study_json}: no rows for test set {args.test_set!r}", file=sys.stderr)
    return 2
  print(f"test set {args.test_set}: mean Dice WT/TC/ET per run and modality")
  for (arm, seed, modality), m in sorted(means.items()):
    print(f"  {arm:>12} seed {seed} {modality:>5}: " + "/".join(f"{m[r]:.3f}" for r in REGIONS))
  low = below(means, floor=args.floor)
  print(f"below {args.floor}: {len(low)} of {len(means) * len(REGIONS)} (run, modality, region)")
  for (arm, seed, modality), region, value in low:
    print(f"  {arm} seed {seed} {modality} {region}: {value:.3f}")
  lowest = {r: min(m[r] for m in means.values()) for r in REGIONS}
  print("lowest: " + ", ".join(f"{r} {v:.3f}" for r, v in lowest.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
