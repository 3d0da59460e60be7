"""The evaluation report's pieces: per-case scores with the BraTS empty-mask rules, the summary
statistics, the printed table, and the figures (segmentation panel, training curves)."""

import json
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest

from uagan_jax import evaluate, metrics, visualize
from uagan_jax.data import REGIONS, preprocess
from uagan_jax.errors import UserError

from conftest import SYNTH_SHAPE, load_test_config, write_random_workdir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _masks(*regions):
  return np.stack([np.asarray(r, bool) for r in regions], axis=-1)


def assert_png(path):
  """A readable PNG image, not merely a file."""
  assert path.read_bytes()[:8] == PNG_SIGNATURE, path
  image = plt.imread(path)
  assert image.ndim == 3 and min(image.shape[:2]) > 50, image.shape


def test_dice_hand_computed_and_brats_empty_rules():
  truth = _masks([1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])
  pred = _masks([1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0])
  dice = evaluate.dice_per_region(pred, truth)
  # WT: 2*1/(2+2) = 0.5; TC: both empty -> 1; ET: truth only -> 0.
  np.testing.assert_allclose(dice, [0.5, 1.0, 0.0])
  np.testing.assert_allclose(evaluate.dice_per_region(truth, truth), [1, 1, 1])


def test_score_case_columns_and_brats_empty_rules():
  truth = np.zeros((8, 8, 4, 3), bool)
  predicted = np.zeros_like(truth)
  truth[2:6, 2:6, 1:3, 0] = True  # WT: 32 voxels
  predicted[2:6, 2:6, 1:3, 0] = True  # predicted exactly
  predicted[3:5, 3:5, 1:3, 1] = True  # TC: predicted, but the truth has none
  # ET: empty in both.
  row = evaluate.score_case(predicted, truth, spacing=(1.0, 1.0, 2.5))
  assert list(row) == [f"{m}_{r}" for r in REGIONS for m in evaluate.SEGMENTATION_METRICS]
  assert row["dice_WT"] == 1.0 and row["hd95_WT"] == 0.0
  assert row["true_ml_WT"] == row["predicted_ml_WT"] == 32 * 2.5 / 1000  # ml from the spacing
  assert row["dice_TC"] == 0.0 and row["hd95_TC"] == metrics.EMPTY_HD95_PENALTY_MM == 374.0
  assert row["sensitivity_TC"] == 0.0 and row["true_ml_TC"] == 0.0
  assert row["dice_ET"] == 1.0 and row["hd95_ET"] == 0.0 and row["sensitivity_ET"] == 1.0
  assert row["specificity_ET"] == 1.0
  # Lesion-wise (BraTS 2023+): WT's one lesion matched exactly; TC's predicted lesion is a false
  # positive (Dice 0, the toolkit's 373 mm); ET has no lesion on either side (Dice 1, HD95 0).
  assert (row["lesion_dice_WT"], row["lesion_hd95_WT"]) == (1.0, 0.0)
  assert (row["lesion_dice_TC"], row["lesion_hd95_TC"]) == (0.0, metrics.LESION_HD95_PENALTY_MM)
  assert (row["lesion_dice_ET"], row["lesion_hd95_ET"]) == (1.0, 0.0)


def test_score_case_lesion_columns_penalise_a_missed_lesion():
  truth = np.zeros((16, 16, 8, 3), bool)
  truth[1:5, 1:5, 1:5, 0] = True  # two WT lesions of 64 voxels
  truth[10:14, 10:14, 2:6, 0] = True
  predicted = truth.copy()
  predicted[10:14, 10:14, 2:6, 0] = False  # the second one missed
  row = evaluate.score_case(predicted, truth, spacing=(1.0, 1.0, 1.0))
  assert row["dice_WT"] == pytest.approx(2 * 64 / (64 + 128))  # global: half the voxels found
  assert row["lesion_dice_WT"] == 0.5  # lesion-wise: (1 + 0) / 2
  assert row["lesion_hd95_WT"] == metrics.LESION_HD95_PENALTY_MM / 2


def test_definitions_cover_every_column():
  definitions = evaluate.definitions()
  assert set(evaluate.SEGMENTATION_METRICS) <= set(definitions)
  assert evaluate.SEGMENTATION_METRICS[:len(evaluate.GLOBAL_METRICS)] == evaluate.GLOBAL_METRICS
  assert "373" in definitions["lesion_hd95"] and "26-connectivity" in definitions["lesion_dice"]


def _rows():
  rng = np.random.default_rng(0)
  rows = []
  for case in ("a", "b", "c"):
    for modality in ("t1", "flair"):
      rows.append({"case": case, "modality": modality,
                   **{f"{m}_{r}": float(rng.random() * (374 if m == "hd95" else 1))
                      for r in REGIONS for m in evaluate.SEGMENTATION_METRICS}})
  return rows


def test_summary_statistics_are_numpy_over_the_cases():
  rows = _rows()
  summary = evaluate.summarise(rows, ["t1", "flair"])
  for modality in ("t1", "flair"):
    for region in REGIONS:
      for metric in evaluate.SEGMENTATION_METRICS:
        values = [r[f"{metric}_{region}"] for r in rows if r["modality"] == modality]
        stats = summary[modality][region][metric]
        assert stats == {"mean": np.mean(values), "std": np.std(values),
                         "median": np.median(values)}
  json.dumps(summary)  # plain floats, ready for summary.json


def test_format_table_dice_and_hd95_per_modality():
  rows = [{"case": c, "modality": "t1",
           **{f"{m}_{r}": 0.0 for r in REGIONS for m in evaluate.SEGMENTATION_METRICS}}
          for c in ("a", "b")]
  rows[0].update(dice_WT=1.0, dice_TC=0.5, hd95_ET=374.0)
  rows[1].update(dice_WT=0.0, dice_TC=0.5, hd95_ET=0.0)
  table = evaluate.format_table(evaluate.summarise(rows, ["t1"]), ["t1"], title="t")
  assert "Dice WT" in table and "HD95 mm ET" in table
  assert "0.500 ± 0.500" in table and "0.500 ± 0.000" in table and "187.0 ± 187.0" in table


def test_segmentation_panel_and_training_curves_are_pngs(tmp_path):
  class Volume:  # the two attributes the panel reads
    images = {"t1": np.random.default_rng(0).random((16, 16, 8)).astype(np.float32),
              "flair": np.random.default_rng(1).random((16, 16, 8)).astype(np.float32)}
  truth = np.zeros((16, 16, 8, 3), bool)
  truth[4:10, 4:10, 5, 0] = truth[5:8, 5:8, 5, 1] = truth[6, 6, 5, 2] = True
  assert visualize.tumour_slice(truth) == 5
  predictions = {"t1": truth, "flair": np.zeros_like(truth)}
  scores = {m: evaluate.score_case(p, truth, spacing=(1, 1, 1)) for m, p in predictions.items()}
  panel = visualize.segmentation_panel(Volume(), truth, predictions, tmp_path / "f" / "case.png",
                                       title="case", scores=scores)
  assert_png(panel)

  (tmp_path / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "seg/dice": 1 / s, "seg/bce": 0.5, "gen/grad_norm": 3.0}) + "\n"
      for s in range(1, 6)))
  (tmp_path / "validation.jsonl").write_text("".join(
      json.dumps({"step": s, **{f"dice/{r}": s / 10 for r in REGIONS}}) + "\n" for s in (2, 4)))
  curves = visualize.training_curves(tmp_path / "metrics.jsonl", tmp_path / "validation.jsonl",
                                     tmp_path / "f" / "training_curves.png")
  assert_png(curves)
  assert visualize.training_curves(tmp_path / "missing.jsonl", None, tmp_path / "none.png") is None


def test_translation_is_scored_per_pair_beside_the_identity_and_drawn_with_the_input_on_the_diagonal(
    tmp_path):
  config = load_test_config()
  rng = np.random.default_rng(0)
  brain = np.zeros((32, 32, 6), bool)
  brain[6:26, 6:26, 1:5] = True
  images = {m: np.where(brain, rng.normal(100.0 + 10 * i, 20.0, brain.shape), 0.0).astype(np.float32)
            for i, m in enumerate(("t1", "t1ce", "t2", "flair"))}
  calls = []

  def translator(slices, source_id, target_id):
    # A perfect translator for t1 -> t2 only (the true t2 slices); otherwise the input (identity).
    calls.append((source_id, target_id))
    return true_t2[has_brain] if (source_id, target_id) == (0, 2) else slices

  true_t2, _, has_brain, _ = preprocess.volume_to_slices(images["t2"], None, size=(32, 32),
                                                         clip=config.data.clip)
  volume = type("Volume", (), {"images": images})()
  rows, panel = evaluate._evaluate_translation(  # pylint: disable=protected-access
      translator, volume, "case0", ("t1", "t1ce", "t2", "flair"), config)

  assert len(rows) == 12 and all(r["source"] != r["target"] for r in rows)
  assert all(s != t for s, t in calls), "a modality was translated into itself"
  for row in rows:
    if (row["source"], row["target"]) == ("t1", "t2"):
      assert row["psnr"] == np.inf or row["psnr"] > row["identity_psnr"] + 20
      assert row["mae"] == 0.0 and row["identity_mae"] > 0.1
    else:  # the identity translator scores exactly as the identity baseline
      assert row["psnr"] == row["identity_psnr"] and row["mae"] == row["identity_mae"]
  np.testing.assert_array_equal(panel["translated"][("t1", "t1")], panel["true"]["t1"])
  np.testing.assert_array_equal(panel["translated"][("t1", "t2")], panel["true"]["t2"])
  assert panel["true"]["t1"].shape == (32, 32) and np.any(panel["true"]["t1"] != 0)
  path = visualize.translation_panel(panel, tmp_path / "translation.png", title="case0",
                                     clip=config.data.clip)
  assert_png(path)


def test_the_translation_panel_alone_equals_the_evaluations_translating_its_slice_only():
  """`evaluate.translation_panel` (TensorBoard's): the panel `_evaluate_translation` draws, from
  one slice per pair."""
  config = load_test_config()
  rng = np.random.default_rng(1)
  brain = np.zeros((32, 32, 6), bool)
  brain[6:26, 6:26, 1:5] = True
  modalities = ("t1", "t1ce", "t2", "flair")
  volume = type("Volume", (), {"images": {
      m: np.where(brain, rng.normal(100.0 + 10 * i, 20.0, brain.shape), 0.0).astype(np.float32)
      for i, m in enumerate(modalities)}})()
  sizes = []

  def translator(slices, source_id, target_id):  # per slice, different for every pair
    sizes.append(len(slices))
    return slices * (target_id + 2) - source_id

  _, expected = evaluate._evaluate_translation(  # pylint: disable=protected-access
      translator, volume, "case0", modalities, config)
  sizes.clear()
  panel = evaluate.translation_panel(translator, volume, modalities, config)
  assert sizes == [1] * 12
  assert panel["true"].keys() == expected["true"].keys()
  assert panel["translated"].keys() == expected["translated"].keys()
  for key in expected["true"]:
    np.testing.assert_array_equal(panel["true"][key], expected["true"][key])
  for key in expected["translated"]:
    np.testing.assert_array_equal(panel["translated"][key], expected["translated"][key])


def _run_on_synth_data(synth_data, tmp_path):
  """(config, workdir, case ids): a random-weights unet workdir whose splits.json says it trained
  on the first 6 synthetic cases and holds out the other 2."""
  config = load_test_config(variant="unet")
  workdir = write_random_workdir(tmp_path / "w", config)
  ids = sorted(p.name for p in synth_data.iterdir() if p.is_dir())
  (workdir / "splits.json").write_text(json.dumps(
      {"data": str(synth_data), "train": ids[:6], "val": [], "test": ids[6:]}))
  return config, workdir, ids


def test_evaluate_split_scores_the_runs_split_or_every_case_of_an_external_folder(synth_data,
                                                                                  tmp_path):
  """The run's data folder (splits.json "data"): its split, as always. The same data moved:
  refused without --split (it holds training cases), its split with one. Any other folder: every
  case, into eval_external_<folder>/, which a folder named like a split does not confuse with it."""
  config, workdir, ids = _run_on_synth_data(synth_data, tmp_path)
  quiet = dict(curves=False, log=lambda _: None)
  own = evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data, **quiet)
  assert own["report"]["case_ids"] == ids[6:] and own["report"]["split"] == "test"
  assert (workdir / "eval_test" / "summary.json").is_file()

  moved = tmp_path / "moved"
  shutil.copytree(synth_data, moved)
  with pytest.raises(UserError, match=r"holds 6 case\(s\) the run trained.*--split test"):
    evaluate.evaluate_split(config, workdir=workdir, data_dir=moved, **quiet)
  again = evaluate.evaluate_split(config, workdir=workdir, data_dir=moved, split="test", **quiet)
  assert again["rows"] == own["rows"]

  external = tmp_path / "test"  # named like the split
  for number, case_id in enumerate(ids[6:]):
    folder = external / f"Other_{number}"
    folder.mkdir(parents=True)
    for path in (synth_data / case_id).iterdir():
      shutil.copy(path, folder / path.name.replace(case_id, f"Other_{number}"))
  scored = evaluate.evaluate_split(config, workdir=workdir, data_dir=external, **quiet)
  assert scored["report"]["case_ids"] == ["Other_0", "Other_1"]
  assert scored["report"]["split"] == "external_test"
  # The same scans under other names: the same numbers, in their own folder.
  assert [{**r, "case": None} for r in scored["rows"]] == [{**r, "case": None}
                                                          for r in own["rows"]]
  assert json.loads((workdir / "eval_external_test" / "summary.json").read_text())["case_ids"] == [
      "Other_0", "Other_1"]
  assert json.loads((workdir / "eval_test" / "summary.json").read_text())["case_ids"] == ids[6:]
  with pytest.raises(UserError, match="--split every: use train, val, test or all"):
    evaluate.evaluate_split(config, workdir=workdir, data_dir=external, split="every", **quiet)


def test_other_scans_under_the_training_cases_names_are_an_external_test_set(synth_data,
                                                                          tmp_path):
  """Synthetic sets (and other centres' numbering) reuse case names: a folder whose cases are
  named like training cases but hold other scans (files of other sizes) is scored; the same
  files (a copy of the run's data) are still refused."""
  from uagan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config, workdir, ids = _run_on_synth_data(synth_data, tmp_path)
  quiet = dict(curves=False, log=lambda _: None)
  other = tmp_path / "shifted"
  synthetic.write_dataset(other, cases=2, seed=99, shape=SYNTH_SHAPE,
                          shift=synthetic.ScannerShift(noise=3.0))
  assert sorted(p.name for p in other.iterdir() if p.is_dir()) == ids[:2]  # training names
  scored = evaluate.evaluate_split(config, workdir=workdir, data_dir=other, **quiet)
  assert scored["report"]["case_ids"] == ids[:2] and scored["report"]["split"] == "external_shifted"
  copy = tmp_path / "copy"
  shutil.copytree(synth_data / ids[0], copy / ids[0])
  with pytest.raises(UserError, match=r"holds 1 case\(s\) the run trained"):
    evaluate.evaluate_split(config, workdir=workdir, data_dir=copy, **quiet)


def test_tta_and_ensembles_write_their_own_folders(capsys, synth_data, tmp_path):
  """TTA goes to eval_<split>_tta/ (summary.json tta: true), beside eval_<split>/ of one pass; an
  ensemble goes to --out DIR (eval_<split>_ensemble[_tta]/, figures/), and the same workdir
  twice scores as the workdir alone."""
  from uagan_jax import timing  # pylint: disable=g-import-not-at-top
  from conftest import assert_one_line_error, run_cli  # pylint: disable=g-import-not-at-top
  config, workdir, ids = _run_on_synth_data(synth_data, tmp_path)
  quiet = dict(curves=False, log=lambda _: None)
  plain = evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data, **quiet)
  stopwatch = timing.Stopwatch()
  mirrored = evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data, tta=True,
                                     stopwatch=stopwatch, **quiet)
  for folder, tta in (("eval_test", False), ("eval_test_tta", True)):
    summary = json.loads((workdir / folder / "summary.json").read_text())
    assert summary["tta"] is tta and summary["case_ids"] == ids[6:]
    assert summary["models"] == [{"workdir": str(workdir), "checkpoint": "latest", "step": 1}]
  assert plain["rows"] != mirrored["rows"]  # random weights: the mirrorings disagree
  assert {"load model", "read", "segment", "compile", "tta", "score"} <= set(stopwatch.seconds)
  assert stopwatch.seconds["tta"] > 0

  out = tmp_path / "ensemble"
  twice = evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data, tta=True,
                                  ensemble=[(workdir, "latest")], out=out, **quiet)
  assert twice["rows"] == mirrored["rows"]
  summary = json.loads((out / "eval_test_ensemble_tta" / "summary.json").read_text())
  assert summary["tta"] is True and len(summary["models"]) == 2
  assert (out / "eval_test_ensemble_tta" / "metrics.csv").is_file()
  assert list((out / "figures").glob("test_*_ensemble_tta.png"))

  # An ensemble has no workdir of its own: --out is needed, in one line.
  code, _, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--workdir", workdir,
                         "--data", synth_data)
  assert_one_line_error(code, err, "an ensemble of 2 models", "--out DIR")
  code, _, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--workdir", workdir,
                         "--checkpoint", "latest", "--checkpoint", "best", "--checkpoint", "1",
                         "--data", synth_data, "--out", out)
  assert_one_line_error(code, err, "2 --workdir and 3 --checkpoint")
  # A model that trained on a scored case, or does not segment a scored modality: named.
  other = write_random_workdir(tmp_path / "other", config, seed=1)
  (other / "splits.json").write_text(json.dumps(
      {"data": str(synth_data), "train": ids[5:7], "val": [], "test": ids[7:]}))
  with pytest.raises(UserError, match=rf"{other}: the run trained or validated on 1 of the 2 "
                                      r"test cases scored \(" + ids[6]):
    evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data,
                            ensemble=[(other, "latest")], out=out, **quiet)
  fewer = load_test_config("--config.data.modalities=('t1', 't2')", variant="unet")
  narrow = write_random_workdir(tmp_path / "narrow", fewer)
  (narrow / "splits.json").write_text(json.dumps(
      {"data": str(synth_data), "train": ids[:6], "val": [], "test": ids[6:]}))
  with pytest.raises(UserError, match=rf"{narrow}: the model does not segment t1ce, flair"):
    evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data,
                            ensemble=[(narrow, "latest")], out=out, **quiet)


def test_translation_false_scores_the_segmentation_alone(synth_data, tmp_path):
  """What a study asks of uagan: the same segmentation rows, no translation scored or written."""
  config = load_test_config(variant="uagan")
  workdir = write_random_workdir(tmp_path / "w", config)
  ids = sorted(p.name for p in synth_data.iterdir() if p.is_dir())
  (workdir / "splits.json").write_text(json.dumps(
      {"data": str(synth_data), "train": ids[:7], "val": [], "test": ids[7:]}))
  quiet = dict(curves=False, log=lambda _: None)
  both = evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data, **quiet)
  assert both["translation_rows"] and (workdir / "eval_test" / "translation.csv").is_file()
  (workdir / "eval_test" / "translation.csv").unlink()
  alone = evaluate.evaluate_split(config, workdir=workdir, data_dir=synth_data, translation=False,
                                  **quiet)
  assert alone["translation_rows"] == [] and alone["rows"] == both["rows"]
  assert not (workdir / "eval_test" / "translation.csv").exists()
  assert "translation_mean" not in alone["report"]
