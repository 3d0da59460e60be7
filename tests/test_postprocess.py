"""Post-processing chosen on validation (`uagan_jax.postprocess`, ``uagan-jax postprocess``).

The rule's functions on tiny arrays; the chooser on masks with a known spurious component; the
command on a two-step configs/test.py model with a val split, its network replaced by one whose
answer is known (the choice then does not depend on a two-step model's noise); predict and
evaluate applying the file, or not with --no-postprocessing; the errors.
"""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from uagan_jax import cli, inference, metrics, postprocess, predict
from uagan_jax.data import readers
from uagan_jax.errors import UserError

from conftest import TEST_CONFIG, assert_one_line_error, run_cli


def _nested(wt, tc=None, et=None):
  shape = wt.shape
  tc = np.zeros(shape, bool) if tc is None else tc
  et = np.zeros(shape, bool) if et is None else et
  return np.stack([wt | tc | et, tc | et, et], axis=-1)


# --- The rule ----------------------------------------------------------------------------------


def test_components_are_removed_by_volume_in_mm3_whatever_the_spacing():
  mask = np.zeros((12, 12, 12), bool)
  mask[1:3, 1:3, 1:3] = True  # 8 voxels
  mask[6:10, 6:10, 6:9] = True  # 48 voxels
  # At 1 x 1 x 1 mm the small one is 8 mm^3, the large one 48 mm^3.
  kept = postprocess.remove_small_components(mask, min_volume_mm3=10, voxel_mm3=1.0)
  assert kept.sum() == 48 and not kept[1:3, 1:3, 1:3].any()
  # At 0.5 x 1 x 4 mm (2 mm^3 a voxel) the small one is 16 mm^3: kept at the same threshold.
  spacing = (0.5, 1.0, 4.0)
  rule = postprocess.Rule((10, 0, 0))
  out = postprocess.apply(_nested(mask), rule, spacing=spacing)
  assert out[..., 0].sum() == 56
  # Between the two volumes (16 and 96 mm^3): only the small one goes.
  out = postprocess.apply(_nested(mask), postprocess.Rule((17, 0, 0)), spacing=spacing)
  assert out[..., 0].sum() == 48 and not out[1:3, 1:3, 1:3, 0].any()
  # A component of exactly the threshold is kept ("smaller than" removes).
  out = postprocess.apply(_nested(mask), postprocess.Rule((16, 0, 0)), spacing=spacing)
  assert out[..., 0].sum() == 56


def test_components_are_26_connected_as_the_lesion_metrics_lesions():
  """Two voxels touching at a corner are one component of 2, as `metrics.label_components`
  counts lesions: at 1.5 mm^3 per voxel neither is removed below 3 mm^3."""
  mask = np.zeros((5, 5, 5), bool)
  mask[1, 1, 1] = mask[2, 2, 2] = True
  assert metrics.label_components(mask)[1] == 1
  kept = postprocess.remove_small_components(mask, min_volume_mm3=3.0, voxel_mm3=1.5)
  assert kept.sum() == 2
  assert postprocess.remove_small_components(mask, min_volume_mm3=3.01, voxel_mm3=1.5).sum() == 0


def test_every_threshold_zero_is_the_identity():
  rng = np.random.default_rng(0)
  masks = _nested(rng.random((9, 9, 9)) > 0.6, rng.random((9, 9, 9)) > 0.8,
                  rng.random((9, 9, 9)) > 0.9)
  rule = postprocess.Rule()
  assert rule.is_identity
  np.testing.assert_array_equal(postprocess.apply(masks, rule, spacing=(1, 1, 1)), masks)
  assert postprocess.remove_small_components(masks[..., 0], min_volume_mm3=0, voxel_mm3=1).sum() \
      == masks[..., 0].sum()


def test_small_enhancing_tumour_is_relabelled_as_core_and_the_masks_stay_nested():
  wt = np.zeros((10, 10, 10), bool)
  wt[2:8, 2:8, 2:8] = True
  tc = np.zeros_like(wt)
  tc[3:6, 3:6, 3:6] = True
  et = np.zeros_like(wt)
  et[4:6, 4:6, 4:6] = True  # 8 voxels = 8 mm^3 at 1 mm, 64 mm^3 at 2 mm
  masks = _nested(wt, tc, et)
  out = postprocess.apply(masks, postprocess.Rule(et_relabel_mm3=10), spacing=(1, 1, 1))
  assert not out[..., 2].any()
  np.testing.assert_array_equal(out[..., :2], masks[..., :2])  # still tumour core and WT
  labels = readers.regions_to_labels(out, convention="brats")
  assert set(np.unique(labels[et])) == {1}  # ET voxels written as necrotic/non-enhancing core
  # Above the threshold (64 mm^3 at 2 mm voxels) ET stays.
  out = postprocess.apply(masks, postprocess.Rule(et_relabel_mm3=10), spacing=(2, 2, 2))
  np.testing.assert_array_equal(out, masks)


def test_removal_works_outside_in_and_keeps_the_nesting():
  """A small WT component takes its TC and ET along; a small TC component stays WT; a small ET
  component stays TC."""
  wt = np.zeros((20, 20, 20), bool)
  wt[2:12, 2:12, 2:12] = True  # 1000 voxels
  wt[15:17, 15:17, 15:17] = True  # 8 voxels, all of them ET too
  tc = np.zeros_like(wt)
  tc[3:9, 3:9, 3:9] = True  # 216
  tc[10, 10, 10] = True  # 1 voxel, apart from the rest of TC
  et = np.zeros_like(wt)
  et[4:8, 4:8, 4:8] = True  # 64
  et[15:17, 15:17, 15:17] = True
  masks = _nested(wt, tc, et)
  rule = postprocess.Rule((10, 2, 10))
  out = postprocess.apply(masks, rule, spacing=(1, 1, 1))
  assert not out[15:17, 15:17, 15:17].any()  # gone from every region
  assert out[10, 10, 10, 0] and not out[10, 10, 10, 1]  # oedema now
  assert out[..., 2].sum() == 64 and out[..., 1].sum() == 216 and out[..., 0].sum() == 1000
  assert not (out[..., 1] & ~out[..., 0]).any() and not (out[..., 2] & ~out[..., 1]).any()
  # Random masks: every rule's output is nested.
  rng = np.random.default_rng(1)
  masks = _nested(rng.random((12, 12, 12)) > 0.7, rng.random((12, 12, 12)) > 0.85,
                  rng.random((12, 12, 12)) > 0.9)
  for rule in (postprocess.Rule((5, 3, 2), 30), postprocess.Rule((0, 8, 0), 0),
               postprocess.Rule((0, 0, 4), 100)):
    out = postprocess.apply(masks, rule, spacing=(1, 1, 1))
    assert not (out[..., 1] & ~out[..., 0]).any() and not (out[..., 2] & ~out[..., 1]).any()
    assert not (out & ~masks).any()  # post-processing only ever takes voxels out of a region


def test_rule_round_trips_and_describes_itself():
  rule = postprocess.Rule((50, 0, 0), 200)
  assert rule.describe() == "WT: remove components < 50 mm^3; ET: relabel as TC when < 200 mm^3"
  assert postprocess.Rule.from_json(json.loads(json.dumps(rule.to_json()))) == rule
  assert postprocess.Rule().describe() == "none (every threshold off)"
  for bad in ({"min_component_mm3": {"WT": 1}, "et_relabel_mm3": 0},
              {"min_component_mm3": {"WT": 1, "TC": 0, "ET": "x"}, "et_relabel_mm3": 0},
              {"min_component_mm3": {"WT": -1, "TC": 0, "ET": 0}, "et_relabel_mm3": 0}, []):
    with pytest.raises(ValueError):
      postprocess.Rule.from_json(bad)


def _blob_case(spurious: bool, *, shift: int = 0):
  """A 24^3 case: one true tumour (WT 6^3 with an ET core 2^3); the prediction is the truth
  moved by ``shift`` voxels and, with ``spurious``, a 2^3 false-positive WT component."""
  truth_wt = np.zeros((24, 24, 24), bool)
  truth_wt[8:14, 8:14, 8:14] = True
  truth_et = np.zeros_like(truth_wt)
  truth_et[10:12, 10:12, 10:12] = True
  truth = _nested(truth_wt, truth_et, truth_et)
  predicted = np.roll(truth, shift, axis=0)
  if spurious:
    predicted[1:3, 1:3, 1:3, 0] = True
  return postprocess.Case(predicted, truth, (1.0, 1.0, 1.0))


def test_the_chooser_removes_a_spurious_small_component_and_no_more():
  cases = [_blob_case(True), _blob_case(True, shift=1), _blob_case(False)]
  rule = postprocess.choose_rule(cases)
  # The spurious component is 8 mm^3, the tumour 216: the smallest grid size above 8 wins.
  assert rule.min_component_mm3[0] == 10.0
  # TC and ET have no spurious components: every size scores alike, so off (the smaller) stays.
  assert rule.min_component_mm3[1:] == (0.0, 0.0) and rule.et_relabel_mm3 == 0.0
  before, after = postprocess.scores(cases, postprocess.Rule()), postprocess.scores(cases, rule)
  assert after["WT"]["lesion_dice"] > before["WT"]["lesion_dice"]
  assert after["WT"]["lesion_hd95"] < before["WT"]["lesion_hd95"]


def test_the_chooser_relabels_a_false_enhancing_tumour():
  """Truths without ET, predictions with a small ET inside their TC: relabelling it (any volume
  above 8 mm^3) turns lesion-wise ET Dice from 0 to 1."""
  cases = []
  for _ in range(2):
    case = _blob_case(False)
    truth = case.truth.copy()
    truth[..., 2] = False
    cases.append(postprocess.Case(case.predicted, truth, case.spacing))
  rule = postprocess.choose_rule(cases)
  assert postprocess.scores(cases, rule)["ET"]["lesion_dice"] == 1.0
  # A component size of 10 mm^3 removes it too, and is tried before the relabelling.
  assert rule == postprocess.Rule((0, 0, 10), 0)
  rule = postprocess.choose_rule(cases, sizes=(0,))
  assert rule == postprocess.Rule((0, 0, 0), 50)


# --- The command and the file ------------------------------------------------------------------


def _spurious_wt(slices, modality_id):  # pylint: disable=unused-argument
  """WT where the (normalised) image is bright, the phantoms' FLAIR tumour, plus a 2x2 square in
  the corner of the first two brain slices: a spurious 8-voxel component apart from the tumour."""
  probs = np.zeros(slices.shape + (3,), np.float32)
  probs[..., 0] = slices > 2.0
  probs[:2, 1:3, 1:3, 0] = 1.0
  return probs


@pytest.fixture(scope="module")
def val_workdir(synth_data, tmp_path_factory):
  """A two-step segan workdir of configs/test.py with a val split (2 of the 8 cases)."""
  workdir = tmp_path_factory.mktemp("postprocess") / "w"
  assert cli.main(["train", "--config", TEST_CONFIG, "--data", str(synth_data), "--workdir",
                   str(workdir), "--config.train.steps=2", "--config.data.val_fraction=0.25",
                   "--no-eval"]) == 0
  splits = json.loads((workdir / "splits.json").read_text())
  assert len(splits["val"]) == 2 and splits["test"]
  return workdir


@pytest.fixture(scope="module")
def chosen(val_workdir, synth_data, tmp_path_factory):
  """(workdir holding postprocessing.json chosen with `_spurious_wt`, the case ids read, output)."""
  workdir = tmp_path_factory.mktemp("chosen") / "w"
  shutil.copytree(val_workdir, workdir)
  read = []
  original = readers.load_case
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(inference.SlicePredictor, "__call__",
                  lambda self, slices, modality_id: _spurious_wt(slices, modality_id))
    patch.setattr(readers, "load_case",
                  lambda case, **kwargs: read.append(case.case_id) or original(case, **kwargs))
    lines = []
    # One pass per slice: `_spurious_wt` is not mirror-symmetric, so test-time augmentation
    # would average its corner component away.
    postprocess.choose(workdir=workdir, data_dir=synth_data, tta=False, log=lines.append)
  return workdir, read, "\n".join(lines)


def test_postprocess_chooses_on_the_val_cases_only_and_writes_the_file(chosen):
  workdir, read, output = chosen
  splits = json.loads((workdir / "splits.json").read_text())
  assert read == splits["val"]  # each val case read once, never a test (or train) case
  report = json.loads((workdir / "postprocessing.json").read_text())
  assert report["case_ids"] == splits["val"] and report["cases"] == 2
  assert report["split"] == "val" and report["step"] == 2 and report["checkpoint"] == "latest"
  assert report["pooled"] is False and report["tta"] is False
  assert set(report["modalities"]) == {"t1", "t1ce", "t2", "flair"}
  flair = report["modalities"]["flair"]
  # The 8-voxel corner component (8 mm^3 at the phantoms' 1 mm) is removed (with a few specks
  # of bright noise the threshold also takes out), the tumour is not.
  size = flair["rule"]["min_component_mm3"]["WT"]
  assert 8 < size <= 100
  assert flair["after"]["WT"]["lesion_dice"] > flair["before"]["WT"]["lesion_dice"]
  assert flair["description"].startswith(f"WT: remove components < {size:g} mm^3")
  assert report["grid"]["min_component_mm3"][0] == 0.0
  assert "segmented 2/2 val cases" in output and "wrote" in output and "flair" in output
  assert "lesion Dice WT" in output


def test_pooled_chooses_one_rule_for_every_modality_through_the_command_line(
    capsys, val_workdir, synth_data, tmp_path, monkeypatch):
  monkeypatch.setattr(inference.SlicePredictor, "__call__",
                      lambda self, slices, modality_id: _spurious_wt(slices, modality_id))
  workdir = tmp_path / "w"
  shutil.copytree(val_workdir, workdir)
  code, out, err = run_cli(capsys, "postprocess", "--workdir", workdir, "--data", synth_data,
                           "--pooled", "--no-tta")
  assert code == 0, err
  report = json.loads((workdir / "postprocessing.json").read_text())
  assert report["pooled"] is True and "pooled" in report["objective"]
  rules = [entry["rule"] for entry in report["modalities"].values()]
  assert len(rules) == 4 and all(rule == rules[0] for rule in rules)
  # Every modality's spurious corner component is in the pool: it is removed.
  assert rules[0]["min_component_mm3"]["WT"] > 8
  assert f"wrote {workdir / 'postprocessing.json'}" in out


def _predict(capsys, workdir, case_dir, output, *extra):
  """predict of one case, one pass per slice (the post-processing was chosen so)."""
  code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                            "--modality", "flair", "--output", output, "--no-tta", *extra)
  assert code == 0, err
  return out


def test_predict_applies_the_file_and_says_so_and_the_flag_turns_it_off(
    capsys, chosen, synth_data, tmp_path, monkeypatch):
  workdir, _, _ = chosen
  monkeypatch.setattr(inference.SlicePredictor, "__call__",
                      lambda self, slices, modality_id: _spurious_wt(slices, modality_id))
  case_dir = sorted(p for p in synth_data.iterdir() if p.is_dir())[0]
  out = _predict(capsys, workdir, case_dir, tmp_path / "on.nii.gz")
  rule = postprocess.load(workdir).rules["flair"]
  assert "post-processing (" in out and f"flair: {rule.describe()}" in out
  assert "chosen on 2 val cases for step 2" in out and "note:" not in out
  out = _predict(capsys, workdir, case_dir, tmp_path / "off.nii.gz", "--no-postprocessing")
  assert "post-processing off (--no-postprocessing" in out
  on = np.asanyarray(nib.load(tmp_path / "on.nii.gz").dataobj)
  off = np.asanyarray(nib.load(tmp_path / "off.nii.gz").dataobj)
  # The spurious 8-voxel corner component is in the unprocessed output only; the processed one
  # only lacks voxels.
  differ = on != off
  assert not on[differ].any()
  labels, count = metrics.label_components(differ)
  assert 8 in np.bincount(labels.ravel())[1:]
  # The file's rule applied to the unprocessed label map gives the processed one.
  regions = readers.labels_to_regions(off, convention="brats")
  spacing = nib.load(tmp_path / "off.nii.gz").header.get_zooms()[:3]
  np.testing.assert_array_equal(
      readers.regions_to_labels(postprocess.apply(regions, rule, spacing=spacing),
                                convention="brats"), on)


def test_an_exported_model_carries_the_file_and_predict_model_applies_it(
    capsys, chosen, synth_data, tmp_path, monkeypatch):
  """`uagan-jax export` copies postprocessing.json in; predict --model applies it (the same line,
  the same file as --workdir), and --no-postprocessing turns it off there too."""
  workdir, _, _ = chosen
  monkeypatch.setattr(inference.SlicePredictor, "__call__",
                      lambda self, slices, modality_id: _spurious_wt(slices, modality_id))
  model = tmp_path / "model.zip"
  code, _, err = run_cli(capsys, "export", "--workdir", workdir, "--output", model)
  assert code == 0, err
  case_dir = sorted(p for p in synth_data.iterdir() if p.is_dir())[0]
  _predict(capsys, workdir, case_dir, tmp_path / "workdir.nii.gz")
  outputs = {}
  for name, extra in (("model", ()), ("model_off", ("--no-postprocessing",))):
    code, out, err = run_cli(capsys, "predict", "--model", model, "--input", case_dir,
                             "--modality", "flair", "--output", tmp_path / f"{name}.nii.gz",
                             "--no-tta", *extra)
    assert code == 0, err
    outputs[name] = out
  rule = postprocess.load(model).rules["flair"]
  assert rule == postprocess.load(workdir).rules["flair"]
  assert f"post-processing ({model}:postprocessing.json" in outputs["model"]
  assert f"flair: {rule.describe()}" in outputs["model"]
  assert "post-processing off (--no-postprocessing" in outputs["model_off"]
  read = lambda name: np.asanyarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj)
  np.testing.assert_array_equal(read("model"), read("workdir"))
  assert (read("model_off") != read("model")).any()  # the spurious component is back


def test_a_rule_chosen_for_another_step_is_applied_with_a_note(capsys, chosen, synth_data,
                                                               tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(chosen[0], workdir)
  report = json.loads((workdir / "postprocessing.json").read_text())
  report["step"] = 1
  (workdir / "postprocessing.json").write_text(json.dumps(report))
  case_dir = sorted(p for p in synth_data.iterdir() if p.is_dir())[0]
  out = _predict(capsys, workdir, case_dir, tmp_path / "seg.nii.gz")
  assert "note: chosen for step 1, applied to step 2" in out
  assert "test-time augmentation]" not in out


def test_a_rule_chosen_without_tta_says_so_when_applied_with_it(capsys, chosen, synth_data,
                                                                tmp_path):
  """The rule was chosen on single-pass segmentations (`chosen`: tta=False); predict with its
  default test-time augmentation applies it with a note, and --no-tta without one."""
  case_dir = sorted(p for p in synth_data.iterdir() if p.is_dir())[0]
  code, out, err = run_cli(capsys, "predict", "--workdir", chosen[0], "--input", case_dir,
                           "--modality", "flair", "--output", tmp_path / "seg.nii.gz", "--tta")
  assert code == 0, err
  assert ("[note: chosen on segmentations without test-time augmentation, applied to "
          "segmentations with test-time augmentation]") in out


def test_evaluate_applies_it_records_it_and_the_flag_turns_it_off(capsys, chosen, synth_data,
                                                                  tmp_path, monkeypatch):
  monkeypatch.setattr(inference.SlicePredictor, "__call__",
                      lambda self, slices, modality_id: _spurious_wt(slices, modality_id))
  workdir = tmp_path / "w"
  shutil.copytree(chosen[0], workdir)
  means = {}
  for extra in ((), ("--no-postprocessing",)):
    code, out, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--data", synth_data,
                             "--split", "test", "--no-tta", *extra)
    assert code == 0, err
    summary = json.loads((workdir / "eval_test" / "summary.json").read_text())
    means[extra] = summary["segmentation"]["flair"]["WT"]["lesion_dice"]["mean"]
    if extra:
      assert summary["postprocessing"] is None and "post-processing off" in out
    else:
      recorded = summary["postprocessing"]
      assert recorded["chosen_for_step"] == 2 and recorded["applied_to_step"] == 2
      rule = postprocess.load(workdir).rules["flair"]
      assert recorded["rules"]["flair"] == rule.to_json()
      assert recorded["descriptions"]["flair"] == rule.describe()
      assert "post-processing (" in out and f"flair: {rule.describe()}" in out
  # The test cases have the same spurious corner component: removing it raises lesion Dice.
  assert means[()] > means[("--no-postprocessing",)]


def _never(*args, **kwargs):
  raise AssertionError("the model was loaded")


def test_a_missing_val_split_and_a_damaged_file_are_one_line(capsys, val_workdir, synth_data,
                                                             tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(val_workdir, workdir)
  splits = json.loads((workdir / "splits.json").read_text())
  splits["val"] = []
  (workdir / "splits.json").write_text(json.dumps(splits))
  code, _, err = run_cli(capsys, "postprocess", "--workdir", workdir, "--data", synth_data)
  assert_one_line_error(code, err, workdir / "splits.json", "val split has no cases",
                        "data.val_fraction > 0")
  assert not (workdir / "postprocessing.json").exists()
  case_dir = sorted(p for p in synth_data.iterdir() if p.is_dir())[0]
  path = workdir / "postprocessing.json"
  for damaged in ("{not json", json.dumps({"format": postprocess.FORMAT}),
                  json.dumps({"format": postprocess.FORMAT, "step": 2, "cases": 2,
                              "modalities": {"flair": {"rule": {"et_relabel_mm3": 0}}}})):
    path.write_text(damaged)
    with pytest.raises(UserError, match="damaged post-processing file"):
      postprocess.load(workdir)
    for command in (("predict", "--input", case_dir, "--modality", "flair", "--output",
                     tmp_path / "x.nii.gz"), ("evaluate", "--data", synth_data)):
      with pytest.MonkeyPatch.context() as patch:  # reported before any checkpoint is read
        for module, name in ((predict, "load_segmentor"), (inference, "load_state")):
          patch.setattr(module, name, _never)
        code, _, err = run_cli(capsys, command[0], "--workdir", workdir, *command[1:])
      assert_one_line_error(code, err, path, "damaged post-processing file")
  # --no-postprocessing does not read it at all.
  code, _, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                         "--modality", "flair", "--output", tmp_path / "x.nii.gz",
                         "--no-postprocessing")
  assert code == 0, err


def test_an_ensemble_is_not_post_processed_and_a_note_names_the_models_that_hold_rules(
    chosen, val_workdir):
  lines = []
  postprocess.note_ensemble([val_workdir, chosen[0]], log=lines.append)
  assert lines == [f"note: an ensemble is not post-processed (the postprocessing.json of "
                   f"{chosen[0]} was chosen for one model's segmentations)"]
  lines.clear()
  postprocess.note_ensemble([val_workdir, val_workdir], log=lines.append)
  assert not lines
