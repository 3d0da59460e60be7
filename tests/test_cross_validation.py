"""Cross-validation: a fold's training run records its fold, and ``evaluate --cross-validation``
scores each fold's val cases with that fold's model, refusing workdirs that are not the folds of
one split."""

import csv
import json
import shutil

import pytest

from conftest import TEST_CONFIG, assert_one_line_error, load_test_config, run_cli, \
    write_random_workdir
from uagan_jax import evaluate, postprocess
from uagan_jax.data import dataset, input_pipeline

FOLDS = 3
MODALITIES = ("t1", "flair")


def _fold_workdir(path, data, fold, *, folds=FOLDS, seed=0):
  """A random-weights configs/test.py:unet workdir of fold ``fold`` (weights seeded by the
  fold), two modalities (half the scoring time), with the splits.json training would write."""
  config = load_test_config(f"--config.data.folds={folds}", f"--config.data.fold={fold}",
                            f"--config.seed={seed}", "--config.eval.panels=0",
                            f"--config.data.modalities={MODALITIES!r}", variant="unet")
  workdir = write_random_workdir(path, config, seed=fold)
  found = input_pipeline.find_training_data(config, data)
  (workdir / "splits.json").write_text(json.dumps(
      {"data": str(data), **found.splits, "protocol": found.protocol, "folds": found.folds,
       "fold": found.fold, "trained_modalities": list(config.data.modalities)}))
  return workdir


@pytest.fixture(scope="module")
def folds(synth_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("folds")
  return [_fold_workdir(root / f"fold{k}", synth_data, k) for k in range(FOLDS)]


def _read_csv(path):
  with path.open() as f:
    return list(csv.DictReader(f))


def test_a_fold_trains_on_its_folds_and_records_them(capsys, synth_data, tmp_path):
  work = tmp_path / "work"
  code, out, err = run_cli(capsys, "train", "--config", f"{TEST_CONFIG}:unet", "--data", synth_data,
                           "--workdir", work, "--no-eval", "--config.train.steps=2",
                           "--config.data.folds=3", "--config.data.fold=1")
  assert code == 0, err
  record = json.loads((work / "splits.json").read_text())
  config = load_test_config(variant="unet")
  ids = sorted(p.name for p in synth_data.iterdir() if p.is_dir())
  expected = dataset.split_fold(ids, seed=config.seed, test_fraction=config.data.test_fraction,
                                folds=3, fold=1)
  assert {k: record[k] for k in ("train", "val", "test")} == expected
  assert (record["folds"], record["fold"]) == (3, 1)
  assert record["test"] == dataset.split_cases(ids, seed=config.seed, val_fraction=0.1,
                                               test_fraction=config.data.test_fraction)["test"]
  assert (f"{len(expected['train'])} train, {len(expected['val'])} val, "
          f"{len(expected['test'])} test") in out


def test_cross_validation_scores_each_case_with_the_fold_that_held_it_out(capsys, synth_data,
                                                                           folds, tmp_path):
  out = tmp_path / "cv"
  # Any order of --workdir: the folds are put in order.
  code, stdout, err = run_cli(capsys, "evaluate", "--cross-validation", "--workdir", folds[2],
                              "--workdir", folds[0], "--workdir", folds[1], "--data", synth_data,
                              "--out", out)
  assert code == 0, err
  rows = _read_csv(out / "eval_cv_tta" / "metrics.csv")  # TTA by default, as evaluate
  splits = [json.loads((w / "splits.json").read_text()) for w in folds]
  non_test = sorted(set().union(*(s["val"] for s in splits)))
  assert len(non_test) == 6 and not set(non_test) & set(splits[0]["test"])
  assert sorted({r["case"] for r in rows}) == non_test  # every non-test case, once per modality
  assert len(rows) == len(non_test) * len(MODALITIES)
  assert list(rows[0])[:3] == ["fold", "case", "modality"]
  for row in rows:
    assert row["case"] in splits[int(row["fold"])]["val"]
  # Each fold's rows are its own model's scores of its own val cases (what evaluate --split val
  # of that workdir gives).
  config = load_test_config("--config.data.folds=3", "--config.eval.panels=0",
                            f"--config.data.modalities={MODALITIES!r}", variant="unet")
  quiet = dict(curves=False, log=lambda _: None, split="val", tta=True)
  own = evaluate.evaluate_split(config, workdir=folds[1], data_dir=synth_data, **quiet)
  mine = [r for r in rows if r["fold"] == "1"]
  assert [(r["case"], r["modality"]) for r in mine] == [(r["case"], r["modality"])
                                                        for r in own["rows"]]
  for row, expected in zip(mine, own["rows"]):
    assert float(row["dice_WT"]) == pytest.approx(expected["dice_WT"])
    assert float(row["hd95_TC"]) == pytest.approx(expected["hd95_TC"])
  for k, workdir in enumerate(folds):  # each fold's evaluation: its model, its val cases
    own_summary = json.loads((out / "eval_cv_tta" / f"fold{k}" / "eval_val_tta" /
                              "summary.json").read_text())
    assert own_summary["models"] == [{"workdir": str(workdir), "checkpoint": "latest",
                                      "step": 1}]
    assert own_summary["case_ids"] == splits[k]["val"]
  summary = json.loads((out / "eval_cv_tta" / "summary.json").read_text())
  assert summary["split"] == "cross_validation" and summary["folds"] == 3
  assert summary["cases"] == 6 and summary["tta"] is True
  assert [m["fold"] for m in summary["models"]] == [0, 1, 2]
  assert [m["workdir"] for m in summary["models"]] == [str(w) for w in folds]
  assert [m["cases"] for m in summary["models"]] == [s["val"] for s in splits]
  dice = [float(r["dice_WT"]) for r in rows if r["modality"] == "flair"]
  assert summary["segmentation"]["flair"]["WT"]["dice"]["mean"] == pytest.approx(
      sum(dice) / len(dice))
  assert "fold" in summary["definitions"]["columns"]
  # Each fold's own evaluation beside, and the table of all of them.
  for k in range(3):
    assert (out / "eval_cv_tta" / f"fold{k}" / "eval_val_tta" / "metrics.csv").is_file()
  assert "Cross-validation, 3 folds: 6 val cases, each scored by the model of its fold" in stdout
  assert "Dice WT" in stdout


def test_cross_validation_applies_each_folds_own_postprocessing(synth_data, folds, tmp_path):
  # Fold 0 carries a rule that removes every component: its cases come out empty, the others
  # are untouched; --no-postprocessing turns it off.
  work = [tmp_path / f"f{k}" for k in range(3)]
  for source, target in zip(folds, work):
    shutil.copytree(source, target)
  rule = postprocess.Rule((1e9, 1e9, 1e9), 0.0).to_json()
  (work[0] / "postprocessing.json").write_text(json.dumps(
      {"format": postprocess.FORMAT, "step": 1, "cases": 2, "tta": False,
       "modalities": {m: {"rule": rule} for m in MODALITIES}}))
  lines = []
  result = evaluate.evaluate_cross_validation(workdirs=work, data_dir=synth_data,
                                              out=tmp_path / "cv", log=lines.append)
  plain = evaluate.evaluate_cross_validation(workdirs=work, data_dir=synth_data,
                                             out=tmp_path / "raw", postprocessing=False,
                                             log=lambda _: None)
  assert (tmp_path / "cv" / "eval_cv" / "fold0" / "eval_val" / "metrics.csv").is_file()
  summary = json.loads((tmp_path / "cv" / "eval_cv" / "summary.json").read_text())
  assert summary["tta"] is False
  assert summary["models"][0]["postprocessing"]["file"] == str(work[0] / "postprocessing.json")
  assert summary["models"][1]["postprocessing"] is None
  assert any(str(work[0] / "postprocessing.json") in line for line in lines)
  for processed, raw in zip(result["rows"], plain["rows"]):
    if processed["fold"] == 0:
      assert processed["predicted_ml_WT"] == 0
    else:
      assert processed == raw
  assert sum(r["predicted_ml_WT"] for r in plain["rows"] if r["fold"] == 0) > 0


def _edit(workdir, name, change):
  path = workdir / name
  data = json.loads(path.read_text())
  change(data)
  path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, needles", [
    ("missing", ("fold 2 of 3 missing",)),
    ("repeated", ("fold 1 again",)),
    ("seed", ("seed 1 against 0",)),
    ("folds", ("data.folds 4 against 3",)),
    ("data", ("data folder",)),
    ("plain", ("not a fold of a cross-validation", "--config.data.folds=K")),
    ("empty", ("fold 2 has no val cases",)),
    ("overlap", ("validates on", "disjoint")),
])
def test_workdirs_that_are_not_the_folds_of_one_split_are_refused(capsys, synth_data, folds,
                                                                  tmp_path, case, needles):
  work = [tmp_path / f"f{k}" for k in range(3)]
  for source, target in zip(folds, work):
    shutil.copytree(source, target)
  given = list(work)
  if case == "missing":
    given = work[:2]
  elif case == "repeated":
    given = [work[0], work[1], work[1]]
  elif case == "seed":
    _edit(work[2], "config.json", lambda c: c.update(seed=1))
  elif case == "folds":
    _edit(work[2], "splits.json", lambda s: s.update(folds=4))
  elif case == "data":
    _edit(work[2], "splits.json", lambda s: s.update(data=str(tmp_path)))
  elif case == "plain":
    _edit(work[1], "splits.json", lambda s: s.pop("folds"))
  elif case == "empty":
    _edit(work[2], "splits.json", lambda s: s.update(val=[]))
  elif case == "overlap":
    first_val = json.loads((work[0] / "splits.json").read_text())["val"]
    _edit(work[2], "splits.json", lambda s: s.update(val=s["val"] + first_val[:1]))
  argv = ["evaluate", "--cross-validation", "--data", synth_data, "--out", tmp_path / "cv"]
  for workdir in given:
    argv += ["--workdir", workdir]
  code, _, err = run_cli(capsys, *argv)
  assert_one_line_error(code, err, *needles)
  assert not (tmp_path / "cv" / "eval_cv_tta").exists()


@pytest.mark.parametrize("extra, needles", [
    (("--split", "test"), ("--cross-validation --split test",)),
    (("--checkpoint", "latest", "--checkpoint", "best"), ("give one checkpoint",)),
    (("--no-out",), ("give --out DIR",)),
])
def test_cross_validation_command_line_refusals(capsys, synth_data, folds, tmp_path, extra,
                                                needles):
  argv = ["evaluate", "--cross-validation", "--data", synth_data]
  if extra != ("--no-out",):
    argv += ["--out", tmp_path / "cv", *extra]
  for workdir in folds:
    argv += ["--workdir", workdir]
  code, _, err = run_cli(capsys, *argv)
  assert_one_line_error(code, err, *needles)


def test_cross_validation_refuses_a_model_file(capsys, synth_data, tmp_path):
  model = tmp_path / "m.zip"
  model.write_bytes(b"")
  code, _, err = run_cli(capsys, "evaluate", "--cross-validation", "--model", model, "--data",
                         synth_data, "--out", tmp_path / "cv")
  assert_one_line_error(code, err, "--cross-validation --model", "workdirs")
