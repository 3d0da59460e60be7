"""Validation during training and the evaluation report of a trained run.

One small data set where a test case and a val case have no enhancing tumour; four short runs on
it: validating every step (straight through), the same interrupted and resumed, and without
validation. Validation must not change training, must survive the resume, and must keep the
best checkpoint; the report must hold the BraTS metrics and follow the empty-mask rules.
"""

import csv
import json
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from uagan_jax import checkpoint, cli, evaluate, inference, metrics, train, train_state
from uagan_jax.data import MODALITIES, REGIONS, dataset

from conftest import TEST_CONFIG, assert_one_line_error, load_test_config
from test_evaluate import assert_png

STEPS = 4
# 8 cases: 2 test, 2 val, 4 train. Validation every step, checkpoints every 2 steps.
OVERRIDES = ("--config.data.val_fraction=0.25", f"--config.train.steps={STEPS}",
             "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5")


def _config(*extra):
  return load_test_config(*OVERRIDES, *extra)


def _train(config, data, workdir, evaluate_after=False):
  return jax.device_get(train.train_and_evaluate(config, workdir=workdir, data_dir=data,
                                                 log=lambda _: None,
                                                 evaluate_after=evaluate_after))


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):
  """The data (without ET in one test and one val case) and the workdirs of the four runs."""
  root = tmp_path_factory.mktemp("validation")
  data = root / "data"
  shutil.copytree(synth_data, data)
  config = _config()
  splits = dataset.split_cases(sorted(p.name for p in data.iterdir() if p.is_dir()),
                               seed=config.seed, val_fraction=config.data.val_fraction,
                               test_fraction=config.data.test_fraction)
  no_et = {"test": splits["test"][0], "val": splits["val"][0]}
  for case in no_et.values():
    path = data / case / f"{case}_seg.nii.gz"
    image = nib.load(path)
    label = np.asarray(image.dataobj).copy()
    assert (label == 4).any()
    label[label == 4] = 1  # enhancing becomes necrotic core: same WT and TC, no ET
    nib.save(nib.Nifti1Image(label, image.affine, image.header), path)

  validating = _config("--config.train.validate_every=1")
  straight = _train(validating, data, root / "straight", evaluate_after=True)
  # Interrupted after validating step 2 but before its checkpoint was written: the resumed run
  # starts from step 1, so it drops the log row of step 2 and validates step 2 again, while the
  # best checkpoint may already be the one of step 2 (it is, with this data and seed).
  _train(_config("--config.train.validate_every=1", "--config.train.steps=2",
                 "--config.train.checkpoint_every=1"), data, root / "resumed")
  shutil.rmtree(root / "resumed" / "checkpoints" / "2")
  resumed = _train(validating, data, root / "resumed")
  off = _train(config, data, root / "off")
  return {"data": data, "root": root, "no_et": no_et, "splits": splits,
          "states": {"straight": straight, "resumed": resumed, "off": off}}


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_validation_does_not_change_training(runs):
  states = runs["states"]
  assert int(states["straight"].step) == STEPS
  assert _leaves_equal(states["straight"], states["off"])  # bit-identical, not merely close
  assert _leaves_equal(states["straight"], states["resumed"])
  root = runs["root"]
  assert (root / "straight" / "metrics.jsonl").read_text() == \
      (root / "off" / "metrics.jsonl").read_text()
  assert not (root / "off" / "validation.jsonl").exists()
  assert not (root / "off" / "checkpoints_best").exists()


def test_validation_rows_every_step_survive_the_resume(runs):
  root = runs["root"]
  rows = _rows(root / "straight" / "validation.jsonl")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for row in rows:
    assert row["cases"] == 2
    for region in REGIONS:
      per_modality = [row[f"dice/{m}/{region}"] for m in MODALITIES]
      assert row[f"dice/{region}"] == pytest.approx(np.mean(per_modality))
      assert 0 <= row[f"dice/{region}"] <= 1
    assert row["dice/mean"] == pytest.approx(np.mean([row[f"dice/{r}"] for r in REGIONS]))
  # The resumed run's log equals the uninterrupted one's, row for row.
  assert (root / "resumed" / "validation.jsonl").read_text() == \
      (root / "straight" / "validation.jsonl").read_text()


def test_best_checkpoint_is_the_best_validation_step_and_restorable(runs):
  root = runs["root"]
  rows = _rows(root / "straight" / "validation.jsonl")
  scores = [r["dice/mean"] for r in rows]
  best_step = rows[int(np.argmax(scores))]["step"]  # the first of equal best scores
  for run in ("straight", "resumed"):
    best = checkpoint.Checkpointer(root / run / "checkpoints_best", every=1, keep=1,
                                   best_metric="dice_mean")
    assert best.all_steps() == [best_step], run
    assert best.metrics(best_step) == {"dice_mean": max(scores)}
    best.close()
  config = _config("--config.train.validate_every=1")
  state, step = inference.load_state(config, root / "straight", checkpoint="best")
  assert step == best_step and int(state.step) == best_step
  latest = checkpoint.Checkpointer(root / "straight" / "checkpoints", every=1, keep=5)
  expected = latest.restore(best_step, train_state.abstract_state(config)) \
      if best_step in latest.all_steps() else None
  latest.close()
  if expected is not None:  # the regular checkpoint of the same step holds the same state
    assert _leaves_equal(jax.device_get(state), jax.device_get(expected))


def _read_csv(path):
  with path.open() as f:
    return list(csv.DictReader(f))


def test_report_csv_summary_and_brats_empty_rules(runs):
  work = runs["root"] / "straight"
  rows = _read_csv(work / "eval_test" / "metrics.csv")
  columns = ["case", "modality"] + [f"{m}_{r}" for r in REGIONS
                                    for m in evaluate.SEGMENTATION_METRICS]
  assert list(rows[0]) == columns
  assert [(r["case"], r["modality"]) for r in rows] == [
      (c, m) for c in runs["splits"]["test"] for m in MODALITIES]
  for row in rows:
    for region in REGIONS:
      values = {m: float(row[f"{m}_{region}"]) for m in evaluate.SEGMENTATION_METRICS}
      assert 0 <= values["dice"] <= 1 and 0 <= values["hd95"] <= metrics.EMPTY_HD95_PENALTY_MM
      if row["case"] == runs["no_et"]["test"] and region == "ET":
        # No true ET: Dice 1 and HD95 0 if none is predicted, else Dice 0 and the 374 mm penalty.
        assert values["true_ml"] == 0.0
        if values["predicted_ml"] == 0:
          assert (values["dice"], values["hd95"]) == (1.0, 0.0)
        else:
          assert (values["dice"], values["hd95"]) == (0.0, metrics.EMPTY_HD95_PENALTY_MM)
      else:
        assert values["true_ml"] > 0

  summary = json.loads((work / "eval_test" / "summary.json").read_text())
  assert (summary["step"], summary["split"], summary["checkpoint"], summary["cases"]) == \
      (STEPS, "test", "latest", 2)
  assert "374" in summary["definitions"]["empty_masks"]
  assert "mm" in summary["definitions"]["hd95"]
  for modality in MODALITIES:
    for region in REGIONS:
      for metric in evaluate.SEGMENTATION_METRICS:
        values = [float(r[f"{metric}_{region}"]) for r in rows if r["modality"] == modality]
        stats = summary["segmentation"][modality][region][metric]
        np.testing.assert_allclose([stats["mean"], stats["std"], stats["median"]],
                                   [np.mean(values), np.std(values), np.median(values)])


def test_figures_panels_and_training_curves(runs):
  figures = runs["root"] / "straight" / "figures"
  assert_png(figures / "training_curves.png")
  panels = sorted(figures.glob(f"test_*_step{STEPS}.png"))
  assert len(panels) == 1  # configs/test.py draws eval.panels = 1 case
  assert_png(panels[0])


def test_cli_evaluates_the_best_checkpoint_or_says_there_is_none(capsys, runs):
  root, data = runs["root"], runs["data"]
  code = cli.main(["evaluate", "--workdir", str(root / "straight"), "--data", str(data),
                   "--checkpoint", "best", "--split", "val"])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "best checkpoint" in out and "HD95 mm WT" in out and "flair" in out
  rows = _read_csv(root / "straight" / "eval_val_best_tta" / "metrics.csv")  # TTA: the default
  assert {r["case"] for r in rows} == set(runs["splits"]["val"])
  code = cli.main(["evaluate", "--workdir", str(root / "off"), "--data", str(data),
                   "--checkpoint", "best"])
  _, err = capsys.readouterr()
  assert_one_line_error(code, err, "checkpoints_best", "no best checkpoint")


def test_validation_without_a_val_split_is_skipped_with_a_note(capsys, synth_data, tmp_path):
  code = cli.main(["train", "--config", TEST_CONFIG, "--data", str(synth_data), "--workdir",
                   str(tmp_path / "w"), "--config.train.validate_every=1",
                   "--config.train.steps=1", "--no-eval"])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "the val split is empty" in out and "train.validate_every=1 is ignored" in out
  assert not (tmp_path / "w" / "validation.jsonl").exists()
  assert not (tmp_path / "w" / "checkpoints_best").exists()
