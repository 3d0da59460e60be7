"""``uagan-jax export`` and ``--model``: one verified file that predicts, translates and
evaluates exactly as its workdir does.

The workdirs hold checkpoints of seeded random weights (`conftest.write_random_workdir`) and
hand-written records (splits.json, validation.jsonl, eval_test/summary.json, run.json): what is
checked here (which arrays travel, their hashes, the card's fields, bit-identical outputs, the
refusals) does not depend on training.
"""

import hashlib
import io
import json
import shutil
import zipfile

import jax
import nibabel as nib
import numpy as np
import pytest

from uagan_jax import families, inference, model_file, postprocess, predict, train_state
from uagan_jax import config as config_lib

from conftest import assert_one_line_error, load_test_config, run_cli, write_random_workdir

VALIDATION_ROWS = [
    {"step": 1, "cases": 1, "dice/WT": 0.5, "dice/TC": 0.4, "dice/ET": 0.3, "dice/mean": 0.4},
    {"step": 2, "cases": 1, "dice/WT": 0.8, "dice/TC": 0.7, "dice/ET": 0.6, "dice/mean": 0.7},
    {"step": 3, "cases": 1, "dice/WT": 0.6, "dice/TC": 0.5, "dice/ET": 0.4, "dice/mean": 0.5},
]
SEGAN_SEED = 14
# A post-processing file as `uagan-jax postprocess` writes it (enhancing-tumour components below
# 5 mm^3 removed from FLAIR's segmentation), which predict and evaluate apply from either source.
POSTPROCESSING = {"format": postprocess.FORMAT, "step": 2, "cases": 2,
                  "modalities": {"flair": {"rule": postprocess.Rule((0, 0, 5), 0).to_json()}}}


def _cases(data):
  return sorted(p.name for p in data.iterdir() if p.is_dir())


def _with_records(workdir, data):
  """Gives a random-weight workdir what a trained one holds besides its checkpoints."""
  cases = _cases(data)
  (workdir / "splits.json").write_text(json.dumps(
      {"data": str(data), "layout": "brats2021", "train": cases[:5], "val": cases[5:6],
       "test": cases[6:7], "protocol": "all", "trained_modalities": list(
           config_lib.from_json_file(workdir / "config.json").data.modalities)}))
  (workdir / "validation.jsonl").write_text(
      "".join(json.dumps(row) + "\n" for row in VALIDATION_ROWS) + '{"step": 4, "cut sh')
  (workdir / "run.json").write_text(json.dumps({"recipe": "configs/test.py",
                                                "overrides": ["--config.train.steps=2"]}))
  (workdir / "postprocessing.json").write_text(json.dumps(POSTPROCESSING))
  return workdir


@pytest.fixture(scope="module")
def workdirs(synth_data, tmp_path_factory):
  """segan (with its records), stargan and uagan workdirs of random weights."""
  root = tmp_path_factory.mktemp("model_file_work")
  # Seed 14: random weights whose segmentation of the first case's flair is neither empty nor
  # the whole brain (most seeds give one or the other), so that equal outputs mean something.
  out = {"segan": _with_records(write_random_workdir(root / "segan", load_test_config(),
                                                     seed=SEGAN_SEED), synth_data)}
  for name in ("stargan", "uagan"):
    out[name] = write_random_workdir(root / name, load_test_config(variant=name))
  return out


@pytest.fixture(scope="module")
def models(workdirs, tmp_path_factory):
  """Each workdir exported (through the library) to a model file."""
  root = tmp_path_factory.mktemp("model_files")
  return {name: model_file.export(workdir, output=root / f"{name}.zip", log=print).output
          for name, workdir in workdirs.items()}


def _members(path):
  with zipfile.ZipFile(path) as archive:
    return {name: archive.read(name) for name in archive.namelist()}


def _rewrite(source, target, change):
  """``source`` rewritten to ``target`` as a valid zip after ``change(members)``: the way a
  deliberate edit looks (every CRC right)."""
  members = _members(source)
  change(members)
  with zipfile.ZipFile(target, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return target


def _manifest(members):
  return json.loads(members[model_file.MANIFEST])


def _set_manifest(members, manifest):
  members[model_file.MANIFEST] = json.dumps(manifest).encode()


# --- What the file holds ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["segan", "stargan", "uagan"])
def test_export_holds_the_inference_networks_only_each_array_hashed(capsys, workdirs, family,
                                                                    tmp_path):
  output = tmp_path / "model.zip"
  code, out, err = run_cli(capsys, "export", "--workdir", workdirs[family], "--output", output)
  assert code == 0, err
  members = _members(output)
  manifest = _manifest(members)
  implementation = families.implementation(family)
  expected_roles = {getattr(implementation, name) for name in ("SEGMENTATION_ROLE",
                                                               "TRANSLATION_ROLE")
                    if hasattr(implementation, name)}
  assert set(manifest["roles"]) == expected_roles
  assert manifest["format"] == model_file.FORMAT
  assert manifest["format_version"] == model_file.FORMAT_VERSION
  assert manifest["checkpoint"] == {"kind": "latest", "step": 1}
  # Never the critics, discriminators or optimizer states.
  others = set(families.get(family).roles) - expected_roles
  assert others  # each of these families trains a network that does not run at inference
  for name in members:
    assert not any(f"/{role}/" in name for role in others), name
    assert "opt_state" not in name, name
  arrays = [name for name in members if name.startswith("arrays/")]
  assert sorted(arrays) == sorted(entry["member"] for entry in manifest["arrays"])
  leaves = sum(len(jax.tree.leaves(train_state.abstract_variables(
      load_test_config(variant="" if family == "segan" else family), role)))
               for role in expected_roles)
  assert len(arrays) == leaves
  for entry in manifest["arrays"]:
    value = np.load(io.BytesIO(members[entry["member"]]), allow_pickle=False)
    assert hashlib.sha256(value.tobytes()).hexdigest() == entry["sha256"]
    assert [value.dtype.str, list(value.shape)] == [entry["dtype"], entry["shape"]]
  for name, digest in manifest["files"].items():
    assert hashlib.sha256(members[name]).hexdigest() == digest
  assert set(members) == {model_file.MANIFEST, *manifest["files"], *arrays}
  # The config byte for byte as the workdir holds it.
  assert members["config.json"] == (workdirs[family] / "config.json").read_bytes()
  # What the command printed.
  assert str(output) in out and f"{len(arrays)} arrays" in out and "step 1" in out
  assert all(role in out for role in expected_roles)
  assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.parametrize("family", ["segan", "stargan", "uagan"])
def test_the_variables_are_those_load_network_reads_from_the_workdir(workdirs, models, family):
  model = model_file.read(models[family])
  config = config_lib.from_json_file(workdirs[family] / "config.json")
  assert model.config.to_dict() == config.to_dict()
  for role, variables in model.variables.items():
    expected, step = inference.load_network(config, workdirs[family], role=role)
    assert step == model.step == 1
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for leaf, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
      assert leaf.dtype == want.dtype and leaf.shape == want.shape
      assert np.array_equal(leaf, want)


def test_the_model_card_says_what_the_model_is_and_how_it_did(workdirs, synth_data, tmp_path):
  workdir = tmp_path / "segan"
  shutil.copytree(workdirs["segan"], workdir)
  (workdir / "eval_test").mkdir()
  (workdir / "eval_test" / "summary.json").write_text(json.dumps(
      {"step": 1, "split": "test", "checkpoint": "latest", "cases": 1,
       "segmentation": {"flair": {region: {"dice": {"mean": 0.25, "std": 0, "median": 0.25},
                                           "hd95": {"mean": 9.5, "std": 0, "median": 9.5}}
                                  for region in ("WT", "TC", "ET")}}}))
  output = tmp_path / "model.zip"
  model_file.export(workdir, output=output, command="uagan-jax export --workdir W")
  model = model_file.read(output)
  card = model.card
  config = config_lib.from_json_file(workdir / "config.json")
  assert card["family"] == "segan" and card["segments"] and not card["translates"]
  assert card["modalities"] == list(config.data.modalities)
  assert card["trained_modalities"] == list(config.data.modalities)
  assert card["spacing_mm"] == list(config.data.spacing)
  assert card["slice_size"] == list(config.data.image_size) == [32, 32]
  assert card["training_data"] == {"folder": synth_data.name, "layout": "brats2021",
                                   "protocol": "all", "cases": {"train": 5, "val": 1, "test": 1}}
  assert card["steps"] == {"planned": config.train.steps, "trained": 1, "exported": 1,
                           "checkpoint": "latest"}
  assert card["validation"]["best"] == VALIDATION_ROWS[1]
  assert card["validation"]["last"] == VALIDATION_ROWS[2]  # the line cut short is skipped
  assert card["validation"]["at_exported_step"] == VALIDATION_ROWS[0]
  assert card["test"][0]["segmentation_mean"]["flair"]["ET"] == {"dice": 0.25, "hd95": 9.5}
  assert card["external"] is None and "external" in card["absent"]
  assert card["package_version"] == model_file.package_version()
  assert card["train_command"].startswith("uagan-jax train --config configs/test.py --data ")
  assert card["train_command"].endswith("--config.train.steps=2")
  assert card["export_command"] == "uagan-jax export --workdir W"
  markdown = _members(output)[model_file.CARD_MARKDOWN].decode()
  for text in ("# Model card: segan", synth_data.name, "5 train, 1 val, 1 test",
               "best: step 2: Dice mean 0.700", "ET Dice 0.250 / HD95 9.5 mm",
               "External metrics", "Absent (no eval_external_*/summary.json",
               "uagan-jax export --workdir W"):
    assert text in markdown, text
  # The post-processing travels, for whoever applies it, from either kind of model.
  assert model.postprocessing == POSTPROCESSING
  assert model_file.postprocessing(output) == model_file.postprocessing(workdir) == POSTPROCESSING


def test_a_workdir_without_records_says_so_in_the_card(workdirs, models):
  model = model_file.read(models["uagan"])
  assert model.training_record is None and model.postprocessing is None
  assert model_file.postprocessing(models["uagan"]) is None
  for key in ("training_data", "validation", "test", "train_command"):
    assert model.card[key] is None and key in model.card["absent"], key
  markdown = _members(models["uagan"])[model_file.CARD_MARKDOWN].decode()
  assert "Training data: absent (no splits.json" in markdown
  assert "segments WT/TC/ET and translates between modalities" in markdown


# --- The same outputs as the workdir ---------------------------------------------------------


def test_predict_with_the_model_writes_the_workdirs_labels(capsys, workdirs, models, case_dir,
                                                           tmp_path):
  outputs = {}
  for flag, source in (("--workdir", workdirs["segan"]), ("--model", models["segan"])):
    outputs[flag] = tmp_path / f"{flag[2:]}.nii.gz"
    code, out, err = run_cli(capsys, "predict", flag, source, "--input", case_dir,
                             "--modality", "flair", "--output", outputs[flag])
    assert code == 0, err
  assert "checkpoint step 1 (the one the model file holds)" in out
  a, b = (nib.load(outputs[flag]) for flag in ("--workdir", "--model"))
  labels = np.asarray(a.dataobj)
  brain = np.asarray(nib.load(case_dir / f"{case_dir.name}_flair.nii.gz").dataobj) != 0
  # Random weights, but a map that varies inside the brain: the comparison means something.
  assert len(np.unique(labels[brain])) > 1
  assert np.array_equal(labels, np.asarray(b.dataobj)) and np.array_equal(a.affine, b.affine)
  # The training record travels: a modality training never saw is refused as from the workdir.
  segmentor = predict.load_segmentor(models["segan"])
  assert segmentor.modalities == predict.load_segmentor(workdirs["segan"]).modalities


def test_translate_with_the_model_writes_the_workdirs_image(capsys, workdirs, models, case_dir,
                                                           tmp_path):
  outputs = {}
  for flag, source in (("--workdir", workdirs["uagan"]), ("--model", models["uagan"])):
    outputs[flag] = tmp_path / f"{flag[2:]}.nii.gz"
    code, _, err = run_cli(capsys, "translate", flag, source, "--input", case_dir, "--source",
                           "t1", "--target", "flair", "--output", outputs[flag])
    assert code == 0, err
  a, b = (np.asarray(nib.load(outputs[flag]).dataobj) for flag in ("--workdir", "--model"))
  assert a.std() > 0 and np.array_equal(a, b)


def test_evaluate_with_the_model_scores_as_the_workdir(capsys, workdirs, models, synth_data,
                                                       tmp_path):
  outs = {"--workdir": tmp_path / "from_workdir", "--model": tmp_path / "from_model"}
  for flag, source in (("--workdir", workdirs["segan"]), ("--model", models["segan"])):
    code, _, err = run_cli(capsys, "evaluate", flag, source, "--data", synth_data,
                           "--split", "test", "--out", outs[flag], "--no-tta")
    assert code == 0, err
  files = [outs["--workdir"] / "eval_test" / name for name in ("metrics.csv", "summary.json")]
  assert all(path.is_file() for path in files)
  csv = files[0]
  assert (outs["--model"] / csv.relative_to(outs["--workdir"])).read_text() == csv.read_text()
  summaries = [json.loads((out / "eval_test" / "summary.json").read_text())
               for out in outs.values()]
  # Both applied the same post-processing; only where it was read from differs.
  files_read = [summary["postprocessing"].pop("file") for summary in summaries]
  assert [summary["models"][0].pop("workdir") for summary in summaries] == [
      str(workdirs["segan"]), str(models["segan"])]
  assert files_read == [str(workdirs["segan"] / "postprocessing.json"),
                        f"{models['segan']}:postprocessing.json"]
  assert summaries[0] == summaries[1]
  assert summaries[0]["postprocessing"]["rules"] == {"flair": POSTPROCESSING["modalities"][
      "flair"]["rule"]}
  assert not (workdirs["segan"] / "eval_test").exists()  # --out kept the workdir as it was


# --- Refusals: one line each -----------------------------------------------------------------


def _predict_with(capsys, model, case_dir, tmp_path):
  return run_cli(capsys, "predict", "--model", model, "--input", case_dir, "--modality", "flair",
                 "--output", tmp_path / "seg.nii.gz")


def _largest_array(members):
  return max((entry for entry in _manifest(members)["arrays"]), key=lambda e: len(
      members[e["member"]]))


def _flip_a_byte_of_the_largest_array(source, target):
  members = _members(source)
  data = members[_largest_array(members)["member"]]
  raw = bytearray(source.read_bytes())
  at = raw.find(data) + len(data) // 2  # stored, not deflated: the bytes are in the file as is
  raw[at] ^= 0xFF
  target.write_bytes(bytes(raw))
  return target


def _change_an_array(members):
  entry = _largest_array(members)
  value = np.load(io.BytesIO(members[entry["member"]]))
  value.flat[0] += 1
  buffer = io.BytesIO()
  np.save(buffer, value)
  members[entry["member"]] = buffer.getvalue()


def _edit_a_hash(members):
  manifest = _manifest(members)
  entry = max(manifest["arrays"], key=lambda e: len(members[e["member"]]))
  entry["sha256"] = "0" * 64
  _set_manifest(members, manifest)


def _newer_format(members):
  manifest = _manifest(members)
  manifest["format_version"] = model_file.FORMAT_VERSION + 1
  manifest["package_version"] = "9.9.9"
  _set_manifest(members, manifest)


def _other_network(members):
  """A config edited (and its hash too) so that the arrays no longer fit the network it builds:
  what a model file of an incompatible version looks like to this one."""
  config = json.loads(members["config.json"])
  config["model"]["segmentor_features"] = [8, 16]
  members["config.json"] = json.dumps(config).encode()
  manifest = _manifest(members)
  manifest["files"]["config.json"] = hashlib.sha256(members["config.json"]).hexdigest()
  _set_manifest(members, manifest)


BROKEN = {
    "truncated": (lambda source, target: target.write_bytes(
        source.read_bytes()[:source.stat().st_size // 2]) and target,
                  ["not a model file, or truncated"]),
    "flipped byte": (_flip_a_byte_of_the_largest_array, ["damaged or truncated member arrays/",
                                                         "CRC"]),
    "changed array": (lambda s, t: _rewrite(s, t, _change_an_array),
                      ["array segmentor/params/", "does not match its SHA-256"]),
    "edited hash": (lambda s, t: _rewrite(s, t, _edit_a_hash),
                    ["array segmentor/params/", "does not match its SHA-256"]),
    "newer format": (lambda s, t: _rewrite(s, t, _newer_format),
                     ["made by uagan_jax 9.9.9 (model file format 2); this is version",
                      "which reads format 1: upgrade"]),
    "incompatible network": (lambda s, t: _rewrite(s, t, _other_network),
                             ["the network of this version has", "incompatible version"]),
    "not a zip": (lambda source, target: target.write_text("hello") and target,
                  ["not a model file, or truncated"]),
    "missing member": (lambda s, t: _rewrite(s, t, lambda m: m.pop("config.json")),
                       ["member config.json is missing"]),
    "extra member": (lambda s, t: _rewrite(s, t, lambda m: m.update({"x.py": b"print()"})),
                     ["member x.py is not in the manifest"]),
    "changed card": (lambda s, t: _rewrite(s, t, lambda m: m.update(
        {model_file.CARD_MARKDOWN: b"# another model"})),
                     ["MODEL_CARD.md does not match its SHA-256"]),
    "malformed manifest": (lambda s, t: _rewrite(s, t, lambda m: _set_manifest(
        m, {**_manifest(m), "arrays": [{"member": ["not", "a", "name"]}]})),
                           ["manifest.json is not a complete manifest"]),
    "no manifest": (lambda s, t: _rewrite(s, t, lambda m: m.pop(model_file.MANIFEST)),
                    ["not a uagan-jax model file (no manifest.json"]),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_a_damaged_or_foreign_model_file_is_one_error_line(capsys, models, case_dir, tmp_path,
                                                           problem):
  damage, needles = BROKEN[problem]
  broken = damage(models["segan"], tmp_path / "broken.zip")
  assert broken == tmp_path / "broken.zip"
  code, _, err = _predict_with(capsys, broken, case_dir, tmp_path)
  assert_one_line_error(code, err, broken, *needles)
  assert not (tmp_path / "seg.nii.gz").exists()


def test_a_missing_model_or_a_folder_is_one_error_line(capsys, workdirs, case_dir, tmp_path):
  code, _, err = _predict_with(capsys, tmp_path / "none.zip", case_dir, tmp_path)
  assert_one_line_error(code, err, tmp_path / "none.zip", "no such file")
  code, _, err = _predict_with(capsys, workdirs["segan"], case_dir, tmp_path)
  assert_one_line_error(code, err, workdirs["segan"], "a folder", "--workdir")


def test_model_and_workdir_flags(capsys, workdirs, models, case_dir, synth_data, tmp_path):
  common = ["--input", case_dir, "--modality", "flair", "--output", tmp_path / "s.nii.gz"]
  code, _, err = run_cli(capsys, "predict", *common)
  assert_one_line_error(code, err, "one of the arguments --workdir --model is required")
  code, _, err = run_cli(capsys, "predict", "--workdir", workdirs["segan"], "--model",
                         models["segan"], *common)
  assert_one_line_error(code, err, "not allowed with argument")
  code, _, err = run_cli(capsys, "predict", "--model", models["segan"], "--checkpoint", "best",
                         *common)
  assert_one_line_error(code, err, "--checkpoint best", "holds one checkpoint")
  code, _, err = run_cli(capsys, "evaluate", "--model", models["segan"], "--data", synth_data)
  assert_one_line_error(code, err, "give --out DIR")
  code, _, err = run_cli(capsys, "translate", "--model", models["segan"], "--input", case_dir,
                         "--source", "t1", "--target", "flair", "--output", tmp_path / "t.nii.gz")
  assert_one_line_error(code, err, models["segan"], "does not translate", "model file")


def test_export_refuses_an_existing_output_unless_forced(capsys, workdirs, tmp_path):
  output = tmp_path / "model.zip"
  output.write_text("keep me")
  code, _, err = run_cli(capsys, "export", "--workdir", workdirs["segan"], "--output", output)
  assert_one_line_error(code, err, output, "exists", "--force")
  assert output.read_text() == "keep me"
  code, _, err = run_cli(capsys, "export", "--workdir", workdirs["segan"], "--output", output,
                         "--force")
  assert code == 0, err
  assert model_file.read(output).step == 1
  code, _, err = run_cli(capsys, "export", "--workdir", workdirs["segan"], "--output",
                         tmp_path / "b.zip", "--checkpoint", "best")
  assert_one_line_error(code, err, "no best checkpoint")
  code, _, err = run_cli(capsys, "export", "--workdir", workdirs["segan"], "--output", tmp_path)
  assert_one_line_error(code, err, tmp_path, "a folder")
  assert not (tmp_path / "b.zip").exists()


def test_the_card_in_markdown_names_translation_and_external_scores(workdirs, models):
  card = dict(model_file.read(models["uagan"]).card)
  card["external"] = [{"folder": "eval_external_shifted", "cases": 12, "checkpoint": "best",
                       "step": 600,
                       "segmentation_mean": {"t2": {"WT": {"dice": 0.875, "hd95": 4.25}}},
                       "translation_mean": {"t1->flair": {"psnr": 21.5, "ssim": 0.625,
                                                          "mae": 0.125}}}]
  markdown = model_file.card_markdown(card)
  for text in ("- eval_external_shifted: 12 cases, best checkpoint (step 600)",
               "  - t2: WT Dice 0.875 / HD95 4.2 mm",
               "  - t1->flair: PSNR 21.50 dB, SSIM 0.625, MAE 0.125",
               "## Test metrics\n\nAbsent (no eval_test*/summary.json in the workdir)."):
    assert text in markdown, text
