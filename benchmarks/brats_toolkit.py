"""The project's BraTS metrics beside the official toolkit's, on a handful of prediction/truth pairs.

The official BraTS 2023+ evaluation is ``brats-evaluation`` (on Panoptica). It pins numpy below the
project's pin, so it runs in its own virtual environment, ``.venv-brats/`` at the repository root
(git-ignored), created on the first run (PyPI, about 300 MB) and reused after. Re-run the check
with one command from the repository root (the project's environment, e.g. ``.venv``):

  python benchmarks/brats_toolkit.py [--real CASE_DIR]

It writes the pairs as NIfTI label maps in the BraTS 2023 labels (1 necrotic core, 2 oedema,
3 enhancing; the toolkit's glioma config groups WT = 1, 2, 3, TC = 1, 3, ET = 3) into a temporary
folder, evaluates each with the toolkit (``evaluate_single_exam`` and the glioma config, then its
own ``parse_seg_results`` and ``parse_mets_results`` on the JSON it wrote), computes the project's
numbers on the same arrays (`uagan_jax.metrics`), and prints one JSON: per pair and region, the
toolkit's numbers, the project's, and their differences. The pairs are synthetic (several
lesions, a missed one, a false positive, lesions merged and split, an empty prediction, an empty
truth, both empty, an anisotropic grid) and, with ``--real CASE_DIR``, a labelled UPENN-GBM or
BraTS case (labels 1, 2, 4 read as BraTS 2021; 4 written as 3) against perturbed copies of its
own label map. tests/test_lesion_metrics.py holds the numbers this printed and checks the
project's against them without the toolkit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The toolkit and the Panoptica it was checked with (pinned: the numbers in the test are theirs).
TOOLKIT_REQUIREMENTS = ("brats-evaluation==0.0.10", "panoptica==2.1.7")
DEFAULT_VENV = ROOT / ".venv-brats"
# The BraTS 2023 region groups of the toolkit's glioma config (config_gli.yaml), as ours.
REGIONS = {"WT": "wt", "TC": "tc", "ET": "et"}
# The threshold passed to the toolkit's parse_mets_results, its default (mm^3).
VOLUME_THRESHOLD_MM3 = 20.0


# ------------------------------------------------------------------------------------------------
# The pairs (numpy only, so the test builds the same arrays without the toolkit).
# ------------------------------------------------------------------------------------------------


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
  import numpy as np  # pylint: disable=g-import-not-at-top
  grid = np.indices(shape, dtype=np.float64)
  distance = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
  return distance <= radius ** 2


def _tumour(label, centre, radius, spacing=(1.0, 1.0, 1.0)):
  """Paints a layered tumour into ``label`` (BraTS 2023 labels): oedema, enhancing rim, core."""
  label[_ball(label.shape, centre, radius, spacing)] = 2
  label[_ball(label.shape, centre, 0.6 * radius, spacing)] = 3
  label[_ball(label.shape, centre, 0.35 * radius, spacing)] = 1


def synthetic_pairs() -> dict:
  """``{name: (predicted_labels, true_labels, spacing)}``, uint8 label maps in BraTS 2023 labels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  shape = (64, 64, 48)
  pairs = {}

  truth = np.zeros(shape, np.uint8)
  _tumour(truth, (18, 20, 20), 9)
  _tumour(truth, (46, 44, 24), 6)
  truth[_ball(shape, (20, 50, 36), 4)] = 2  # an oedema-only lesion, missed below
  truth[40:42, 10:12, 8:10] = 3  # 8 mm^3: below the volume threshold
  predicted = np.zeros(shape, np.uint8)
  _tumour(predicted, (19, 21, 20), 8)  # shifted and smaller
  _tumour(predicted, (46, 45, 25), 7)  # shifted and larger
  predicted[_ball(shape, (52, 14, 38), 3)] = 3  # a false positive
  pairs["several_lesions"] = (predicted, truth, (1.0, 1.0, 1.0))

  # Two true lesions merged into one predicted lesion (one-to-one: one stays unmatched), one true
  # lesion split into two predicted ones (one is a false positive).
  truth = np.zeros(shape, np.uint8)
  truth[_ball(shape, (16, 16, 20), 5)] = 2
  truth[_ball(shape, (16, 30, 20), 6)] = 2
  _tumour(truth, (44, 40, 24), 8)
  predicted = np.zeros(shape, np.uint8)
  predicted[8:24, 9:38, 15:26] = 2
  split = np.zeros(shape, np.uint8)
  _tumour(split, (44, 40, 24), 8)
  split[:, 39:42, :] = 0
  predicted = np.maximum(predicted, split)
  pairs["merged_and_split"] = (predicted, truth, (1.0, 1.0, 1.0))

  truth = pairs["several_lesions"][1]
  pairs["empty_prediction"] = (np.zeros(shape, np.uint8), truth, (1.0, 1.0, 1.0))
  pairs["empty_truth"] = (pairs["several_lesions"][0], np.zeros(shape, np.uint8), (1.0, 1.0, 1.0))
  pairs["both_empty"] = (np.zeros(shape, np.uint8), np.zeros(shape, np.uint8), (1.0, 1.0, 1.0))

  # Anisotropic voxels: distances and the volume threshold in mm.
  spacing = (0.9, 0.9, 2.5)
  truth = np.zeros(shape, np.uint8)
  _tumour(truth, (20, 22, 10), 10, spacing)
  _tumour(truth, (46, 40, 30), 7, spacing)
  truth[50:52, 10:12, 40:42] = 2  # 8 voxels of 2.025 mm^3: 16.2 mm^3, below the threshold
  truth[10:14, 50:52, 40:42] = 2  # 16 voxels: 32.4 mm^3, counted (and missed)
  predicted = np.zeros(shape, np.uint8)
  _tumour(predicted, (21, 21, 11), 9, spacing)
  _tumour(predicted, (46, 42, 30), 8, spacing)
  predicted[30:33, 8:11, 5:7] = 1  # a false positive
  pairs["anisotropic"] = (predicted, truth, spacing)
  return pairs


def real_pairs(case_dir: pathlib.Path) -> dict:
  """The case's own label map (BraTS 2021 labels 1, 2, 4 written as 1, 2, 3) against perturbed
  copies of it: ``{name: (predicted_labels, true_labels, spacing)}`` on the file's voxel grid."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  case_dir = pathlib.Path(case_dir)
  (path,) = [p for p in case_dir.iterdir() if p.name.endswith(("_seg.nii.gz", "_segm.nii.gz"))]
  image = nib.load(path)
  raw = np.asarray(image.dataobj).astype(np.int64)
  if not np.isin(raw, (0, 1, 2, 4)).all():
    raise SystemExit(f"{path}: labels {np.unique(raw).tolist()}, expected BraTS 2021 / UPENN-GBM "
                     "labels 0, 1, 2, 4")
  truth = np.select([raw == 1, raw == 2, raw == 4], [1, 2, 3], 0).astype(np.uint8)
  spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
  tumour = np.argwhere(truth > 0)
  low, high = tumour.min(0), tumour.max(0)

  shifted = np.roll(truth, (3, -2, 1), axis=(0, 1, 2))
  blob_centre = tuple(int(c) for c in np.where(high + 20 < np.array(truth.shape), high + 12,
                                                low - 12))
  shifted[_ball(truth.shape, blob_centre, 5, spacing)] = 3  # a false-positive enhancing blob

  # Eroded: each label's voxels whose six face neighbours share the label (thin parts vanish,
  # which splits lesions into several).
  eroded = truth.copy()
  for axis in range(3):
    for step in (-1, 1):
      eroded[np.roll(truth, step, axis=axis) != truth] = 0
  return {"real_shifted_with_blob": (shifted, truth, spacing),
          "real_eroded": (eroded, truth, spacing)}


# ------------------------------------------------------------------------------------------------
# The project's numbers.
# ------------------------------------------------------------------------------------------------


def project_numbers(predicted, truth, spacing) -> dict:
  """Per region, the project's global and lesion-wise metrics of two BraTS 2023 label maps."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import evaluate, metrics
  from uagan_jax.data import readers
  # pylint: enable=g-import-not-at-top
  predicted_regions = readers.labels_to_regions(predicted, convention="brats2023")
  true_regions = readers.labels_to_regions(truth, convention="brats2023")
  row = evaluate.score_case(predicted_regions, true_regions, spacing=spacing)
  numbers = {}
  for index, region in enumerate(REGIONS):
    lesions = metrics.lesion_metrics(predicted_regions[..., index], true_regions[..., index],
                                     spacing=spacing, min_volume_mm3=VOLUME_THRESHOLD_MM3)
    numbers[region] = {
        "dice": row[f"dice_{region}"],
        "hd95": row[f"hd95_{region}"],
        "pooled_hd95": metrics.pooled_hd95(predicted_regions[..., index],
                                           true_regions[..., index], spacing=spacing),
        "lesion_dice": row[f"lesion_dice_{region}"],
        "lesion_hd95": row[f"lesion_hd95_{region}"],
        "matched_dice": lesions["matched_dice"],
        "matched_hd95": lesions["matched_hd95"],
        "tp": lesions["true_positives"],
        "fp": lesions["false_positives"],
        "fn": lesions["false_negatives"],
    }
  return numbers


# ------------------------------------------------------------------------------------------------
# The toolkit's side (runs in .venv-brats; imports nothing of the project).
# ------------------------------------------------------------------------------------------------


def _plain(value):
  """A JSON-safe float: NaN and inf as strings, so the printed JSON is valid."""
  value = float(value)
  return value if math.isfinite(value) else str(value)


def toolkit_side(folder: pathlib.Path) -> dict:
  """Runs the toolkit on ``folder/<pair>/{pred,ref}.nii.gz``; its numbers per pair and region."""
  # pylint: disable=g-import-not-at-top
  import csv
  import contextlib
  import io
  import brats_evaluation
  from brats_evaluation import evaluate_single_exam, parse_mets_results, parse_seg_results
  from panoptica import Panoptica_Evaluator
  # pylint: enable=g-import-not-at-top
  evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))
  names = sorted(p.name for p in folder.iterdir() if p.is_dir())
  results = {"metrics": [], "missings": []}
  with contextlib.redirect_stdout(io.StringIO()):  # the toolkit's progress prints
    for name in names:
      results["metrics"].append(evaluate_single_exam(str(folder / name / "pred.nii.gz"),
                                                     str(folder / name / "ref.nii.gz"), name,
                                                     evaluator))
    (folder / "panoptica.json").write_text(json.dumps(results))
    parse_seg_results(str(folder / "panoptica.json"), str(folder / "seg.csv"))
    parse_mets_results(str(folder / "panoptica.json"), VOLUME_THRESHOLD_MM3, 0.1,
                       str(folder / "mets.csv"))

  def read(path):
    with open(path, newline="") as f:
      return {row["subject_id"]: row for row in csv.DictReader(f)}

  seg, mets = read(folder / "seg.csv"), read(folder / "mets.csv")
  numbers = {}
  for name in names:
    numbers[name] = {}
    for region, key in REGIONS.items():
      def value(table, column, key=key):
        text = table[name].get(f"{column}_{key}", "")
        return _plain(text) if text != "" else "nan"
      numbers[name][region] = {
          "dice": value(seg, "global_dsc"),
          "hd95": value(seg, "global_hd95"),
          "lesion_dice": value(mets, "lesionwise_dsc_mean"),
          "lesion_hd95": value(mets, "lesionwise_hd95_mean"),
          "matched_dice": value(seg, "lesionwise_dsc_mean"),
          "matched_hd95": value(seg, "lesionwise_hd95_mean"),
          "tp": value(seg, "all_instance_tp"),
          "fp": value(seg, "all_instance_fp"),
          "fn": value(seg, "all_instance_fn"),
      }
  return numbers


# ------------------------------------------------------------------------------------------------
# The comparison.
# ------------------------------------------------------------------------------------------------


def ensure_venv(venv: pathlib.Path) -> pathlib.Path:
  """The toolkit's interpreter, creating ``venv`` and installing the pinned toolkit if needed."""
  python = venv / "bin" / "python"
  check = [str(python), "-c", "import brats_evaluation, panoptica, importlib.metadata as m; "
           "print(m.version('brats-evaluation'), m.version('panoptica'))"]
  wanted = " ".join(r.split("==")[1] for r in TOOLKIT_REQUIREMENTS)
  if python.exists():
    found = subprocess.run(check, capture_output=True, text=True)
    if found.returncode == 0 and found.stdout.strip() == wanted:
      return python
  print(f"installing {', '.join(TOOLKIT_REQUIREMENTS)} into {venv}", file=sys.stderr)
  subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
  subprocess.run([str(python), "-m", "pip", "install", "-q", *TOOLKIT_REQUIREMENTS], check=True)
  return python


def _difference(ours, theirs):
  if isinstance(theirs, str) or not math.isfinite(ours):
    return None  # NaN/inf on one side: a convention, see docs/EVALUATION.md
  return ours - theirs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--real", type=pathlib.Path, default=None,
                      help="a labelled case folder (BraTS 2021 labels) for the real pairs")
  parser.add_argument("--venv", type=pathlib.Path, default=DEFAULT_VENV,
                      help="the toolkit's virtual environment (created if missing)")
  parser.add_argument("--toolkit-side", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.toolkit_side is not None:  # inside .venv-brats: only the toolkit's numbers
    print(json.dumps(toolkit_side(args.toolkit_side)))
    return 0

  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))
  pairs = synthetic_pairs()
  if args.real is not None:
    pairs.update(real_pairs(args.real))
  python = ensure_venv(args.venv)
  with tempfile.TemporaryDirectory() as folder:
    folder = pathlib.Path(folder)
    for name, (predicted, truth, spacing) in pairs.items():
      (folder / name).mkdir()
      affine = np.diag([*spacing, 1.0])
      nib.save(nib.Nifti1Image(predicted, affine), folder / name / "pred.nii.gz")
      nib.save(nib.Nifti1Image(truth, affine), folder / name / "ref.nii.gz")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), __file__, "--toolkit-side", str(folder)],
                          capture_output=True, text=True, env=environment)
    if done.returncode != 0:
      print(done.stderr, file=sys.stderr)
      return done.returncode
    toolkit = json.loads(done.stdout.strip().splitlines()[-1])
  report = {"toolkit": " ".join(TOOLKIT_REQUIREMENTS), "pairs": {}}
  for name, (predicted, truth, spacing) in pairs.items():
    ours = project_numbers(predicted, truth, spacing)
    report["pairs"][name] = {
        region: {"toolkit": toolkit[name][region],
                 "project": {k: _plain(v) for k, v in ours[region].items()},
                 "difference": {k: _difference(ours[region][k if k != "hd95" else "pooled_hd95"],
                                               theirs)
                                for k, theirs in toolkit[name][region].items()}}
        for region in REGIONS}
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
