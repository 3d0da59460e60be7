"""``uagan-jax study``: a tiny study end to end (train, score, resume, a failing arm), the study
files' checks, the analysis of scored rows, and a study stopped by a signal."""

import json
import os
import pathlib
import re
import signal
import textwrap
import time

import pytest

from conftest import ROOT, TEST_CONFIG, assert_one_line_error, run_cli
from uagan_jax import config as config_lib
from uagan_jax import study as study_lib
from uagan_jax.errors import UserError

STUDIES = ROOT / "studies"


def _write_study(path: pathlib.Path, body: str) -> pathlib.Path:
  path.write_text("import ml_collections\n\n\ndef get_config(arg=''):\n"
                  + textwrap.indent(textwrap.dedent(body), "  "))
  return path


def _tiny_study(tmp_path, data, *, arms=None, comparisons=(("a", "b"), ("a", "broken")),
                seeds=(0, 1)) -> pathlib.Path:
  """Two arms of configs/test.py:unet that differ in their data only (so the second compiles
  nothing new), two steps, two modalities; ``broken`` fails when training starts (a batch of 6
  on the tests' 4 devices)."""
  arms = arms or {
      "a": {"recipe": f"{TEST_CONFIG}:unet"},
      "b": {"recipe": f"{TEST_CONFIG}:unet",
            "overrides": ("--config.data.tumour_free_fraction=0.2",)},
      "broken": {"recipe": f"{TEST_CONFIG}:unet", "overrides": ("--config.train.batch_size=6",)},
  }
  return _write_study(tmp_path / "tiny.py", f"""\
      s = ml_collections.ConfigDict()
      s.data = {str(data)!r}
      s.seeds = {tuple(seeds)!r}
      s.overrides = ("--config.train.steps=2", "--config.data.modalities=('t1', 'flair')",
                     "--config.eval.panels=0", "--config.train.tensorboard=false")
      s.arms = {arms!r}
      s.comparisons = {tuple(comparisons)!r}
      s.bootstrap = {{"resamples": 500}}
      return s
      """)


# ------------------------------------------------------------------------------------------------
# End to end: train, score, write; a failing arm; resume
# ------------------------------------------------------------------------------------------------


def test_tiny_study_trains_scores_records_a_failed_arm_and_resumes(capsys, synth_data, tmp_path,
                                                                    monkeypatch):
  spec = _tiny_study(tmp_path, synth_data)
  out = tmp_path / "out"
  code, stdout, err = run_cli(capsys, "study", spec, "--out", out)
  assert code == 1, err  # a run failed; the others were scored
  assert "Traceback" not in err
  report = json.loads((out / "study.json").read_text())
  assert (out / "study.md").is_file() and (out / "study.png").stat().st_size > 0

  # The runs: seed by seed, every arm; broken's two recorded as failed with their error.
  runs = [(r["arm"], r["seed"], r["status"]) for r in report["runs"]]
  assert runs == [("a", 0, "trained"), ("b", 0, "trained"), ("broken", 0, "failed"),
                  ("a", 1, "trained"), ("b", 1, "trained"), ("broken", 1, "failed")]
  for record in report["runs"]:
    assert pathlib.Path(record["workdir"]) == out / "runs" / record["arm"] / f"seed{record['seed']}"
    if record["arm"] == "broken":
      assert "batch_size=6" in record["error"]
    else:
      assert record["step"] == 2 and record["train_seconds"] > 0
  # Progress: done/total and an ETA over the whole study.
  assert re.search(r"study: 3/6 runs done, ETA \d", stdout)

  # Rows: per arm, seed, case and modality; each seed's two held-out cases (8 cases, 25% test).
  rows = report["rows"]
  assert len(rows) == 2 * 2 * 2 * 2  # arms a, b x seeds x cases x modalities
  assert {r["test_set"] for r in rows} == {"test"}
  cases = {seed: {r["case"] for r in rows if r["seed"] == seed} for seed in (0, 1)}
  assert all(len(c) == 2 for c in cases.values())

  # Results: per test set, metric (dice, hd95), region, modality (all, t1, flair) and arm.
  results = report["results"]
  assert len(results) == 1 * 2 * 3 * 3 * 2
  entry = next(e for e in results if (e["arm"], e["metric"], e["region"], e["modality"])
               == ("a", "dice", "WT", "all"))
  assert (entry["n_seeds"], entry["n_values"]) == (2, 4)
  assert entry["n_cases"] == len(cases[0] | cases[1])
  assert entry["design"] == ("crossed" if cases[0] == cases[1] else "nested")
  assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
  assert entry["mean"] == pytest.approx(sum(entry["seed_means"]) / 2)
  pooled = [(r["dice_WT"]) for r in rows if r["arm"] == "a"]
  assert entry["mean"] == pytest.approx(sum(pooled) / len(pooled))  # 2 cases per seed
  # Comparisons: a - b everywhere; a - broken nowhere (nothing of broken's scored).
  differences = report["differences"]
  assert {(d["a"], d["b"]) for d in differences} == {("a", "b")}
  assert len(differences) == 2 * 3 * 3
  for d in differences:
    assert 0 <= d["p_wilcoxon"] <= 1 and d["n_values"] == 4 and d["n_seeds"] == 2
  assert "a - broken" in (out / "study.md").read_text().split("Not compared")[1]
  assert "bootstrap" in report["method"]["interval"] and report["method"]["resamples"] == 500

  # Again: the finished runs are only scored (train is called for broken's two runs only), and
  # give the same numbers.
  from uagan_jax import train  # pylint: disable=g-import-not-at-top
  trained = []
  real_train = train.train_and_evaluate

  def recording_train(config, *, workdir, **kwargs):
    trained.append(pathlib.Path(workdir).relative_to(out).as_posix())
    return real_train(config, workdir=workdir, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", recording_train)
  code, stdout, err = run_cli(capsys, "study", spec, "--out", out)
  assert code == 1, err
  assert trained == ["runs/broken/seed0", "runs/broken/seed1"]
  assert stdout.count("finished before (step 2): scoring only") == 4
  again = json.loads((out / "study.json").read_text())
  assert [r["status"] for r in again["runs"]] == ["finished", "finished", "failed"] * 2
  assert again["results"] == results and again["rows"] == rows


# ------------------------------------------------------------------------------------------------
# Bad study files: one line naming the file, exit 2, nothing trained
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, needles", [
    ("s = ml_collections.ConfigDict(); s.data = DATA; s.seeds = (0,)\n"
     "s.arms = {'a': {'recipe': TEST}}; s.colour = 'red'\nreturn s", ("unknown key 'colour'",)),
    ("s = ml_collections.ConfigDict(); s.data = DATA; s.seeds = (0,)\n"
     "s.arms = {'a': {'recipe': TEST}}; s.comparisons = (('a', 'z'),)\nreturn s",
     ("no arm 'z'",)),
    ("s = ml_collections.ConfigDict(); s.data = DATA; s.seeds = (0,)\n"
     "s.arms = {'a': {'recipe': 'configs/nowhere.py:demo'}}\nreturn s",
     ("arm 'a'", "configs/nowhere.py", "not found")),
    ("s = ml_collections.ConfigDict(); s.data = DATA; s.seeds = (0,)\n"
     "s.arms = {'a': {'recipe': TEST, 'overides': ()}}\nreturn s",
     ("unknown key 'arms.a.overides'",)),
    ("s = ml_collections.ConfigDict(); s.data = DATA; s.seeds = (0,)\n"
     "s.arms = {'a': {'recipe': TEST, 'overrides': ('--config.train.stepz=3',)}}\nreturn s",
     ("arm 'a'", "train.stepz")),
    ("s = ml_collections.ConfigDict(); s.data = DATA + '_missing'; s.seeds = (0,)\n"
     "s.arms = {'a': {'recipe': TEST}}\nreturn s", ("_missing: not found",)),
    ("s = ml_collections.ConfigDict(); s.data = DATA; s.seeds = (0, 0)\n"
     "s.arms = {'a': {'recipe': TEST}}\nreturn s", ("seeds",)),
])
def test_bad_study_file_is_one_line_naming_the_file(capsys, tmp_path, synth_data, body, needles):
  path = _write_study(tmp_path / "bad.py", f"DATA = {str(synth_data)!r}\nTEST = {TEST_CONFIG!r}\n"
                      + body + "\n")
  code, _, err = run_cli(capsys, "study", path, "--out", tmp_path / "out")
  assert_one_line_error(code, err, path, *needles)
  assert not (tmp_path / "out").exists()


def test_missing_study_file_and_unknown_variant(capsys, tmp_path):
  code, _, err = run_cli(capsys, "study", tmp_path / "none.py", "--out", tmp_path / "out")
  assert_one_line_error(code, err, "none.py", "not found")
  code, _, err = run_cli(capsys, "study", f"{STUDIES / 'results_table.py'}:huge", "--out",
                         tmp_path / "out")
  assert_one_line_error(code, err, "results_table.py", "huge", "smoke")


# ------------------------------------------------------------------------------------------------
# The studies/ files
# ------------------------------------------------------------------------------------------------


def _variants(path: pathlib.Path) -> list[str]:
  """'' and the variants the study's ValueError names ("known: a, b"); each also in its
  docstring."""
  text = path.read_text()
  known = [v.strip() for v in re.search(r"known: ([^)]*)\)", text).group(1).split(",")]
  for variant in known:
    assert f":{variant}``" in text or f"{path.name}:{variant} " in text, variant
  return [""] + sorted(known)


def _as_the_docstrings_run_them(tmp_path, monkeypatch):
  """Study files run from the checkout's root (the recipes' paths), with the data folders there
  (empty here: loading and planning read none)."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  (tmp_path / "data_synth").mkdir()
  (tmp_path / "data_shifted").mkdir()


@pytest.mark.parametrize("name, runs", [("results_table", {"": 9, "smoke": 3}),
                                        ("unified_vs_single", {"": 15, "all": 15, "smoke": 5,
                                                               "all_smoke": 5}),
                                        ("augmentation", {"": 18, "segan": 6, "segan_long": 6,
                                                          "recipes": 18, "smoke": 6}),
                                        ("mixed_precision", {"": 6, "uagan": 6, "smoke": 2}),
                                        ("uagan_dice", {"": 12, "on": 6, "smoke": 4}),
                                        ("learning_rate", {"": 12, "unet": 6, "uagan": 6,
                                                           "smoke": 4})])
def test_study_files_load_and_plan(tmp_path, monkeypatch, name, runs):
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  path = STUDIES / f"{name}.py"
  assert f"uagan-jax study studies/{name}.py" in path.read_text()
  assert "uagan-jax synth --out data_synth" in path.read_text()
  assert _variants(path) == sorted(runs, key=lambda v: (v != "", v))
  for variant, count in runs.items():
    study = study_lib.load_study(f"{path}:{variant}" if variant else str(path))
    planned = study_lib.plan(study, out=tmp_path / "out")
    assert len(planned) == count, variant
    assert all(run.config.seed == run.seed for run in planned)
    for a, b in study.comparisons:
      assert a in study.arms and b in study.arms
    if "smoke" in variant:
      assert study.seeds == (0,) and all(run.config.train.steps == 2 for run in planned)
    else:
      assert study.seeds == (0, 1, 2)


def test_the_results_table_trains_the_augmentation_studys_off_arms(tmp_path, monkeypatch):
  """studies/results_table.py's runs are the `*_off` runs of studies/augmentation.py, bit for bit:
  the same resolved config per family and seed (the docs quote one study's numbers for both)."""
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  table = study_lib.load_study(str(STUDIES / "results_table.py"))
  augmentation = study_lib.load_study(str(STUDIES / "augmentation.py"))
  for family in ("unet", "segan", "uagan"):
    for seed in (0, 1, 2):
      ours = table.configs[(family, seed, None)][0]
      theirs = augmentation.configs[(f"{family}_off", seed, None)][0]
      assert config_lib.to_json(ours) == config_lib.to_json(theirs), (family, seed)
      assert ours.train.steps == 400 and ours.train.batch_size == 8


def test_the_uagan_dice_studys_batch_arms_are_the_augmentation_studys_uagan_arms(tmp_path,
                                                                                 monkeypatch):
  """studies/uagan_dice.py's batch_* runs are studies/augmentation.py's uagan_* runs, bit for bit;
  its modality_* runs differ from them in loss.dice_reduction only."""
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  dice = study_lib.load_study(str(STUDIES / "uagan_dice.py"))
  augmentation = study_lib.load_study(str(STUDIES / "augmentation.py"))
  for state in ("off", "on"):
    for seed in (0, 1, 2):
      ours = dice.configs[(f"batch_{state}", seed, None)][0]
      theirs = augmentation.configs[(f"uagan_{state}", seed, None)][0]
      assert config_lib.to_json(ours) == config_lib.to_json(theirs), (state, seed)
      other = json.loads(config_lib.to_json(dice.configs[(f"modality_{state}", seed, None)][0]))
      assert other["loss"].pop("dice_reduction") == "modality_batch"
      same = json.loads(config_lib.to_json(ours))
      assert same["loss"].pop("dice_reduction") == "batch" and other == same


def test_the_learning_rate_studys_arms_are_the_long_segan_arms_at_two_peak_rates(tmp_path,
                                                                                monkeypatch):
  """studies/learning_rate.py's lr1e-3_* runs are augmentation.py:segan_long's segan_* runs, bit
  for bit; its lr3e-4_* runs differ from them in the two peak rates only (3e-4)."""
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  rates = study_lib.load_study(str(STUDIES / "learning_rate.py"))
  long = study_lib.load_study(f"{STUDIES / 'augmentation.py'}:segan_long")
  for state in ("off", "on"):
    for seed in (0, 1, 2):
      ours = rates.configs[(f"lr1e-3_{state}", seed, None)][0]
      theirs = long.configs[(f"segan_{state}", seed, None)][0]
      assert config_lib.to_json(ours) == config_lib.to_json(theirs), (state, seed)
      lower = json.loads(config_lib.to_json(rates.configs[(f"lr3e-4_{state}", seed, None)][0]))
      same = json.loads(config_lib.to_json(ours))
      for name in ("segmentor_lr", "critic_lr"):
        assert lower["optim"].pop(name) == 3e-4 and same["optim"].pop(name) == 1e-3
      assert lower == same, (state, seed)


def test_the_recipes_augmentation_study_shares_the_learning_rate_studys_uagan_runs(tmp_path,
                                                                                   monkeypatch):
  """augmentation.py:recipes trains the recipes' own :study; its uagan arms are
  learning_rate.py:uagan's, bit for bit (so one study's finished runs serve the other)."""
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  recipes = study_lib.load_study(f"{STUDIES / 'augmentation.py'}:recipes")
  rates = study_lib.load_study(f"{STUDIES / 'learning_rate.py'}:uagan")
  assert recipes.external == ()
  for state in ("off", "on"):
    for seed in (0, 1, 2):
      ours = recipes.configs[(f"uagan_{state}", seed, None)][0]
      theirs = rates.configs[(f"lr3e-4_{state}", seed, None)][0]
      assert config_lib.to_json(ours) == config_lib.to_json(theirs), (state, seed)
  steps = {family: config_lib.load_config(str(ROOT / "configs" / f"{family}.py:study"),
                                          []).train.steps for family in ("unet", "segan", "uagan")}
  for (arm, seed, _), (config, _) in recipes.configs.items():
    assert (config.train.steps, config.optim.segmentor_lr) == (1200, 3e-4), arm
    assert config.train.steps == steps[arm.partition("_")[0]] and config.seed == seed


@pytest.mark.parametrize("spec", ["augmentation.py", "augmentation.py:segan", "mixed_precision.py",
                                  "mixed_precision.py:uagan", "results_table.py", "uagan_dice.py",
                                  "unified_vs_single.py", "unified_vs_single.py:all"])
def test_the_studies_the_docs_tabulate_train_at_the_first_budget(tmp_path, monkeypatch, spec):
  """The study files whose tables docs/EXPERIMENTS.md gives at the first study budget keep
  training it (400 steps, S's and C's peak rate 1e-3), whatever the recipes' ``:study`` became."""
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  planned = study_lib.load_study(str(STUDIES / spec))
  for config, _ in planned.configs.values():
    assert (config.train.steps, config.optim.decay_start, config.optim.decay_end) == (400, 100, 400)
    assert (config.optim.segmentor_lr, config.optim.critic_lr) == (1e-3, 1e-3)


def test_the_long_augmentation_study_is_the_segan_arms_three_times_as_long(tmp_path, monkeypatch):
  """augmentation.py:segan_long differs from :segan in the steps and the schedule's steps only."""
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  short = study_lib.load_study(f"{STUDIES / 'augmentation.py'}:segan")
  long = study_lib.load_study(f"{STUDIES / 'augmentation.py'}:segan_long")
  assert short.configs.keys() == long.configs.keys() and long.comparisons == short.comparisons
  for key, (config, _) in long.configs.items():
    assert (config.train.steps, config.optim.decay_start, config.optim.decay_end,
            config.train.checkpoint_every) == (1200, 300, 1200, 1200)
    config, reference = json.loads(config_lib.to_json(config)), json.loads(
        config_lib.to_json(short.configs[key][0]))
    for group, name in (("train", "steps"), ("optim", "decay_start"), ("optim", "decay_end"),
                        ("train", "checkpoint_every")):
      del config[group][name], reference[group][name]
    assert config == reference, key


@pytest.mark.parametrize("variant, folds, steps", [("", 5, 600), ("3", 3, 600), ("smoke", 5, 2),
                                                   ("3_smoke", 3, 2)])
def test_cross_validation_study_is_one_arm_per_fold_and_the_single_model(tmp_path, monkeypatch,
                                                                         variant, folds, steps):
  _as_the_docstrings_run_them(tmp_path, monkeypatch)
  path = STUDIES / "cross_validation.py"
  assert "uagan-jax study studies/cross_validation.py" in path.read_text()
  study = study_lib.load_study(f"{path}:{variant}" if variant else str(path))
  planned = study_lib.plan(study, out=tmp_path / "out")
  assert sorted(run.arm for run in planned) == sorted(["single"] + [f"fold{k}"
                                                                   for k in range(folds)])
  assert study.seeds == (0,)
  for run in planned:
    assert run.config.model.name == "segan" and run.config.train.steps == steps
    assert run.config.data.image_size == planned[0].config.data.image_size  # one recipe
    expected = (0, 0) if run.arm == "single" else (folds, int(run.arm.removeprefix("fold")))
    assert (run.config.data.folds, run.config.data.fold) == expected
  assert study.comparisons == tuple((f"fold{k}", "single") for k in range(folds))
  assert [f.name for f in study.external] == ([] if "smoke" in variant else ["data_shifted"])
  for bad in ("1", "x", "3_x"):
    with pytest.raises(UserError, match="cross_validation.py"):
      study_lib.load_study(f"{path}:{bad}")


def test_unified_vs_single_is_one_model_per_modality(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  (tmp_path / "data_synth").mkdir()
  study = study_lib.load_study(f"{STUDIES / 'unified_vs_single.py'}:all_smoke")
  planned = study_lib.plan(study, out=tmp_path / "out")
  single = [run for run in planned if run.arm == "single"]
  assert [run.modality for run in single] == ["t1", "t1ce", "t2", "flair"]
  for run in single:
    assert run.config.model.name == "segan"
    assert tuple(run.config.data.modalities) == (run.modality,)
    assert run.workdir == tmp_path / "out" / "runs" / "single" / run.modality / "seed0"
  unified = next(run for run in planned if run.arm == "unified")
  assert unified.config.model.name == "uagan" and unified.config.data.protocol == "all"
  assert len(unified.config.data.modalities) == 4


# ------------------------------------------------------------------------------------------------
# The analysis of scored rows
# ------------------------------------------------------------------------------------------------


def _rows(arm, seed, case, values, test_set="test"):
  return [{"arm": arm, "seed": seed, "test_set": test_set, "case": case, "modality": m,
           "dice_WT": v, "dice_TC": v, "dice_ET": v} for m, v in values.items()]


def test_analyse_combines_a_per_modality_arm_and_pairs_per_case_and_seed():
  rows = []
  for seed in (0, 1):
    for case, base in (("c1", 0.5), ("c2", 0.7), ("c3", 0.9)):
      # unified: flair 0.1 better than t1; single (one model per modality, so one row each from
      # two runs): 0.05 below unified's on each.
      rows += _rows("unified", seed, case, {"t1": base, "flair": base + 0.1})
      rows += _rows("single", seed, case, {"t1": base - 0.05})
      rows += _rows("single", seed, case, {"flair": base + 0.05})
  results, differences = study_lib.analyse(
      rows=rows, arms={"unified": ("t1", "flair"), "single": ("t1", "flair")},
      comparisons=[("unified", "single")], test_sets=["test"], metrics=["dice"], resamples=200)
  wt = {(e["arm"], e["modality"]): e for e in results if e["region"] == "WT"}
  assert set(wt) == {(a, m) for a in ("unified", "single") for m in ("all", "t1", "flair")}
  assert wt[("unified", "all")]["mean"] == pytest.approx((0.7 + 0.8) / 2)
  assert wt[("single", "t1")]["mean"] == pytest.approx(0.65)
  assert wt[("single", "all")]["n_values"] == 6  # 3 cases x 2 seeds, both modalities each
  assert wt[("single", "all")]["design"] == "crossed"
  assert wt[("single", "all")]["sd"] == pytest.approx(0.0)  # the seeds agree
  diff = {d["modality"]: d for d in differences if d["region"] == "WT"}
  assert set(diff) == {"all", "t1", "flair"}
  for d in diff.values():
    assert d["mean_difference"] == pytest.approx(0.05)
    assert d["ci"] == pytest.approx([0.05, 0.05])
    # Every case's difference positive: the exact p of 3 cases, 2/8.
    assert d["p_wilcoxon"] == pytest.approx(0.25) and d["n_cases"] == 3
    assert d["better"] == "a"


def test_analyse_nested_seeds_and_a_missing_modality():
  # The held-out split differs by seed: seed 0 scored c1 c2, seed 1 c3 c4 (nested). Arm b lacks
  # flair for c4: its pooled value is left out there, its t1 value kept.
  both = lambda v: {"t1": v, "flair": v}
  rows = (_rows("a", 0, "c1", both(0.6)) + _rows("a", 0, "c2", both(0.8))
          + _rows("a", 1, "c3", both(0.4)) + _rows("a", 1, "c4", both(0.2))
          + _rows("b", 0, "c1", both(0.5)) + _rows("b", 0, "c2", both(0.7))
          + _rows("b", 1, "c3", both(0.3)) + _rows("b", 1, "c4", {"t1": 0.3}))
  results, differences = study_lib.analyse(
      rows=rows, arms={"a": ("t1", "flair"), "b": ("t1", "flair")}, comparisons=[("a", "b")],
      test_sets=["test"], metrics=["dice"], resamples=200)
  a_all = next(e for e in results if (e["arm"], e["modality"], e["region"]) == ("a", "all", "WT"))
  assert a_all["design"] == "nested" and a_all["n_cases"] == 4 and a_all["n_seeds"] == 2
  assert a_all["seed_means"] == pytest.approx([0.7, 0.3]) and a_all["mean"] == pytest.approx(0.5)
  b_all = next(e for e in results if (e["arm"], e["modality"], e["region"]) == ("b", "all", "WT"))
  assert b_all["n_values"] == 3
  d_all = next(d for d in differences if (d["modality"], d["region"]) == ("all", "WT"))
  assert d_all["n_values"] == 3 and d_all["mean_difference"] == pytest.approx(0.1)
  d_t1 = next(d for d in differences if (d["modality"], d["region"]) == ("t1", "WT"))
  assert d_t1["n_values"] == 4
  # Seed 0: +0.1 +0.1, seed 1: +0.1 -0.1: means 0.1 and 0.
  assert d_t1["seed_means"] == pytest.approx([0.1, 0.0])


# ------------------------------------------------------------------------------------------------
# Stopped by a signal: one line, finished runs kept (fake training and scoring: no JAX work)
# ------------------------------------------------------------------------------------------------


def _fake_train_and_evaluate(calls, stop_on):
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from uagan_jax.train_utils import Interrupted  # pylint: disable=g-import-not-at-top

  def fake(config, *, workdir, log, **kwargs):
    del kwargs
    calls.append(pathlib.Path(workdir))
    if len(calls) == stop_on == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # outside a training loop: the study's handler
      time.sleep(30)
      raise AssertionError("SIGTERM did not stop the study")
    if len(calls) == stop_on == 3:  # inside one: the loop checkpoints and raises Interrupted
      raise Interrupted(signal.SIGTERM, "stopped by SIGTERM at step 1; checkpoint saved")
    log(f"step {config.train.steps}/{config.train.steps}  seg/total 1.0")
    (pathlib.Path(workdir) / "checkpoints" / str(config.train.steps)).mkdir(parents=True)
    (pathlib.Path(workdir) / "config.json").write_text(config_lib.to_json(config))

  return fake


def _fake_evaluate_split(config, *, workdir, data_dir, split, **kwargs):
  assert kwargs["translation"] is False  # a study scores the segmentation only
  del config, data_dir, kwargs
  seed = int(pathlib.Path(workdir).name[len("seed"):])
  return {"step": 2, "rows": [{"case": f"c{i}", "modality": m, "dice_WT": 0.5, "dice_TC": 0.5,
                               "dice_ET": 0.5, "hd95_WT": 1.0, "hd95_TC": 1.0, "hd95_ET": 1.0}
                              for i in range(seed, seed + 2) for m in ("t1", "flair")]}


@pytest.mark.parametrize("stop_on, where", [(2, ""), (3, "; its checkpoint saved")])
def test_sigterm_stops_the_study_with_one_line_and_keeps_finished_runs(
    capsys, tmp_path, synth_data, monkeypatch, stop_on, where):
  from uagan_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train_and_evaluate(calls, stop_on))
  monkeypatch.setattr(evaluate, "evaluate_split", _fake_evaluate_split)
  spec = _tiny_study(tmp_path, synth_data, arms={"a": {"recipe": f"{TEST_CONFIG}:unet"},
                                                 "b": {"recipe": f"{TEST_CONFIG}:unet"}},
                     comparisons=(("a", "b"),))
  out = tmp_path / "out"
  before = signal.getsignal(signal.SIGTERM)
  code, _, err = run_cli(capsys, "study", spec, "--out", out)
  assert code == 143
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  run = "run 2/4 (b seed 0)" if stop_on == 2 else "run 3/4 (a seed 1)"
  assert lines[0] == (f"study stopped by SIGTERM during {run}{where}; {stop_on - 1} finished "
                      f"run(s) kept in {out / 'runs'}: run the same command to resume")
  assert signal.getsignal(signal.SIGTERM) is before  # the handler put back
  assert (out / "runs" / "a" / "seed0" / "checkpoints" / "2").is_dir()
  assert not (out / "study.json").exists()

  # Resumed: the finished runs are scored only, the others trained; all four compared.
  calls.clear()
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train_and_evaluate(calls, 0))
  code, _, err = run_cli(capsys, "study", spec, "--out", out)
  assert code == 0, err
  assert len(calls) == 4 - (stop_on - 1)
  report = json.loads((out / "study.json").read_text())
  assert [r["status"] for r in report["runs"]].count("finished") == stop_on - 1
  assert {(d["a"], d["b"]) for d in report["differences"]} == {("a", "b")}
  same = next(d for d in report["differences"] if d["modality"] == "all")
  assert same["mean_difference"] == 0 and same["p_wilcoxon"] == 1.0


def test_an_edited_study_does_not_score_models_of_the_old_config(capsys, tmp_path, synth_data,
                                                                  monkeypatch):
  from uagan_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train_and_evaluate(calls, 0))
  monkeypatch.setattr(evaluate, "evaluate_split", _fake_evaluate_split)
  arms = {"a": {"recipe": f"{TEST_CONFIG}:unet"}}
  spec = _tiny_study(tmp_path, synth_data, arms=arms, comparisons=(), seeds=(0,))
  out = tmp_path / "out"
  assert run_cli(capsys, "study", spec, "--out", out)[0] == 0 and len(calls) == 1
  # More steps (or other eval settings): the run resumes, trained again from its checkpoint.
  assert run_cli(capsys, "study", spec, "--out", out, "--config.train.steps=3",
                 "--config.eval.max_cases=1")[0] == 0
  assert len(calls) == 2
  # Another learning rate: that workdir holds another model; recorded as failed, not scored.
  code, _, err = run_cli(capsys, "study", spec, "--out", out, "--config.train.steps=3",
                         "--config.optim.segmentor_lr=0.5")
  assert code == 1 and len(calls) == 2, err
  record = json.loads((out / "study.json").read_text())["runs"][0]
  assert record["status"] == "failed"
  assert "another config" in record["error"] and "optim.segmentor_lr" in record["error"]
