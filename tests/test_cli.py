"""The command line: every kind of bad input ends in one line naming the file or key, exit 2."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from uagan_jax.data import MODALITIES, dataset

from conftest import ROOT, TEST_CONFIG, assert_one_line_error, load_test_config, run_cli


@pytest.fixture
def data_copy(synth_data, tmp_path):
  """A writable copy of the synthetic data, and the first training case with its modality."""
  copy = tmp_path / "data"
  shutil.copytree(synth_data, copy)
  config = load_test_config()
  ids = sorted(p.name for p in copy.iterdir() if p.is_dir())
  splits = dataset.split_cases(ids, seed=config.seed, val_fraction=config.data.val_fraction,
                               test_fraction=config.data.test_fraction)
  assignment = dataset.assign_modalities(splits["train"], seed=config.seed,
                                         modalities=config.data.modalities)
  case = splits["train"][0]
  return copy, case, assignment[case]


def _train(capsys, data, tmp_path, *extra):
  return run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", data, "--workdir",
                  tmp_path / "work", "--no-eval", *extra)


def test_missing_modality_file(capsys, data_copy, tmp_path):
  data, case, _ = data_copy
  (data / case / f"{case}_t2.nii.gz").unlink()
  code, _, err = _train(capsys, data, tmp_path)
  assert_one_line_error(code, err, case, "t2")


def test_truncated_nifti(capsys, data_copy, tmp_path):
  data, case, _ = data_copy
  path = data / case / f"{case}_seg.nii.gz"
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  code, _, err = _train(capsys, data, tmp_path)
  assert_one_line_error(code, err, path, "truncated or corrupt")


def _rewrite(path, array, like):
  image = nib.load(like)
  out = nib.Nifti1Image(array, image.affine, image.header)
  out.set_data_dtype(array.dtype)
  nib.save(out, path)


def test_image_and_label_of_different_shapes(capsys, data_copy, tmp_path):
  data, case, _ = data_copy
  seg = data / case / f"{case}_seg.nii.gz"
  _rewrite(seg, np.zeros((30, 32, 32), np.uint8), seg)
  code, _, err = _train(capsys, data, tmp_path)
  assert_one_line_error(code, err, seg.name, "(30, 32, 32)")


def test_nan_voxels(capsys, data_copy, tmp_path):
  data, case, modality = data_copy
  path = data / case / f"{case}_{modality}.nii.gz"
  volume = np.asarray(nib.load(path).dataobj).astype(np.float32)
  volume[10, 10, 10:13] = np.nan
  _rewrite(path, volume, path)
  code, _, err = _train(capsys, data, tmp_path)
  assert_one_line_error(code, err, path, "3 NaN")


def test_unexpected_label_value(capsys, data_copy, tmp_path):
  data, case, _ = data_copy
  seg = data / case / f"{case}_seg.nii.gz"
  label = np.asarray(nib.load(seg).dataobj).copy()
  label[0, 0, 0] = 3  # 3 is BraTS 2023's enhancing label, not BraTS 2021's
  _rewrite(seg, label, seg)
  code, _, err = _train(capsys, data, tmp_path)
  assert_one_line_error(code, err, seg, "unexpected label value")


def test_empty_data_folder(capsys, tmp_path):
  (tmp_path / "empty").mkdir()
  code, _, err = _train(capsys, tmp_path / "empty", tmp_path)
  assert_one_line_error(code, err, tmp_path / "empty", "empty folder")


def test_unknown_data_folder(capsys, tmp_path):
  folder = tmp_path / "photos"
  (folder / "holiday").mkdir(parents=True)
  (folder / "holiday" / "beach.jpg").write_bytes(b"\xff\xd8")
  (folder / "notes.txt").write_text("hello")
  code, _, err = _train(capsys, folder, tmp_path)
  assert_one_line_error(code, err, folder, "unknown dataset layout")


def test_missing_data_folder(capsys, tmp_path):
  code, _, err = _train(capsys, tmp_path / "nowhere", tmp_path)
  assert_one_line_error(code, err, tmp_path / "nowhere", "no such folder")


def test_unknown_config_key(capsys, synth_data, tmp_path):
  code, _, err = _train(capsys, synth_data, tmp_path, "--config.train.stpes=3")
  assert_one_line_error(code, err, "train.stpes", "did you mean 'train.steps'")
  assert not (tmp_path / "work").exists()  # rejected before anything is written


def test_bad_config_value_and_file(capsys, synth_data, tmp_path):
  code, _, err = _train(capsys, synth_data, tmp_path, "--config.train.steps=many")
  assert_one_line_error(code, err, "train.steps", "many")
  code, _, err = run_cli(capsys, "train", "--config", tmp_path / "nope.py", "--data", synth_data,
                          "--workdir", tmp_path / "w")
  assert_one_line_error(code, err, "nope.py", "not found")
  code, _, err = run_cli(capsys, "train", "--config", f"{TEST_CONFIG}:huge", "--data",
                          synth_data, "--workdir", tmp_path / "w")
  assert_one_line_error(code, err, "test.py", "unknown variant")


@pytest.fixture(scope="module")
def one_step_workdir(synth_data, tmp_path_factory):
  """What ``_train(..., "--config.train.steps=1")`` leaves: a workdir trained one step by the
  command line (read-only: the tests copy it before training on in it or being refused by it)."""
  from uagan_jax import cli  # pylint: disable=g-import-not-at-top
  work = tmp_path_factory.mktemp("one_step") / "work"
  assert cli.main(["train", "--config", TEST_CONFIG, "--data", str(synth_data), "--workdir",
                   str(work), "--no-eval", "--config.train.steps=1"]) == 0
  return work


def test_changed_config_does_not_destroy_checkpoints(capsys, synth_data, tmp_path,
                                                     one_step_workdir):
  shutil.copytree(one_step_workdir, tmp_path / "work")
  before = sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir())
  config_before = (tmp_path / "work" / "config.json").read_text()
  code, _, err = _train(capsys, synth_data, tmp_path, "--config.train.steps=4",
                        "--config.model.segmentor_features=(4, 16)")
  assert_one_line_error(code, err, "checkpoints", "does not fit the current config")
  assert sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir()) == before
  assert (tmp_path / "work" / "config.json").read_text() == config_before


def test_a_workdir_of_another_family_is_refused_naming_what_it_holds(capsys, synth_data,
                                                                    tmp_path, one_step_workdir):
  shutil.copytree(one_step_workdir, tmp_path / "work")
  record = json.loads((tmp_path / "work" / "run.json").read_text())
  assert record == {"recipe": TEST_CONFIG, "overrides": ["--config.train.steps=1"]}
  config_before = (tmp_path / "work" / "config.json").read_text()
  code, _, err = run_cli(capsys, "train", "--config", f"{TEST_CONFIG}:unet", "--data", synth_data,
                         "--workdir", tmp_path / "work", "--no-eval")
  assert_one_line_error(code, err, f"{tmp_path / 'work'} holds a segan run ({TEST_CONFIG})",
                        f"this command trains unet ({TEST_CONFIG}:unet)", "another --workdir")
  assert "data:" not in capsys.readouterr().out  # refused before the data is read
  assert (tmp_path / "work" / "config.json").read_text() == config_before
  # Resuming the same run keeps the record of how it was started.
  code, _, err = _train(capsys, synth_data, tmp_path, "--config.train.steps=2")
  assert code == 0, err
  assert json.loads((tmp_path / "work" / "run.json").read_text()) == record


def _help_workflow(capsys):
  """The commands of 'uagan-jax --help''s workflow, as printed, each split into words."""
  lines = _help(capsys).splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("typical workflow"))
  commands = [line.split()[1:] for line in lines[start:] if line.startswith("  uagan-jax ")]
  assert [c[0] for c in commands] == ["synth", "train", "evaluate", "predict", "translate"]
  return commands


def _run_workflow(capsys, tmp_path, monkeypatch, commands, *, recipe=None, steps=2):
  """Runs the workflow's commands one after the other in a fresh folder (with configs/), with
  fewer and smaller phantoms, ``steps`` training steps and, given ``recipe``, that recipe in
  place of the printed one; everything else (workdirs, files, options) as printed."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  for argv in commands:
    argv = list(argv)
    if argv[0] == "synth":
      argv[argv.index("--cases") + 1] = "8"
      at = argv.index("--shape") + 1
      argv[at:at + 3] = ["32", "32", "32"]
    if argv[0] == "train":
      if recipe is not None:
        argv[argv.index("--config") + 1] = recipe
      argv += [f"--config.train.steps={steps}", f"--config.train.validate_every={steps}",
               "--config.eval.val_max_cases=1", "--config.data.val_fraction=0.2",
               "--config.data.spacing=(2.0, 2.0, 2.0)", "--no-eval"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, (argv, err)
  assert (tmp_path / "seg.nii.gz").is_file() and (tmp_path / "flair.nii.gz").is_file()
  workdir = tmp_path / "runs" / "demo_uagan"
  assert (workdir / "eval_test_best_tta" / "summary.json").is_file()  # TTA, the default
  return workdir


def test_the_help_workflow_runs_as_printed(capsys, tmp_path, monkeypatch):
  """The printed workflow runs, command after command, on small phantoms; its recipe is swapped
  for the test config's uagan variant of the same family (the :demo networks compile for minutes
  on 2 cores; the slow test below runs them)."""
  commands = _help_workflow(capsys)
  train = commands[1]
  assert train[train.index("--config") + 1] == "configs/uagan.py:demo"
  # launch/demo.sh with MODEL=uagan trains into the workdir the workflow then uses.
  demo = (ROOT / "launch" / "demo.sh").read_text()
  assert 'default_workdir=runs/demo_$MODEL' in demo
  assert all(c[c.index("--workdir") + 1] == "runs/demo_uagan" for c in commands[1:])
  _run_workflow(capsys, tmp_path, monkeypatch, commands, recipe=f"{ROOT}/configs/test.py:uagan")


@pytest.mark.slow
def test_the_help_workflow_runs_as_printed_with_its_recipe(capsys, tmp_path, monkeypatch):
  """As above with the printed recipe, configs/uagan.py:demo (two steps)."""
  _run_workflow(capsys, tmp_path, monkeypatch, _help_workflow(capsys))


def test_console_script_prints_no_traceback(tmp_path):
  """The installed entry point, as a user runs it, in its own process."""
  result = subprocess.run([sys.executable, "-m", "uagan_jax", "train", "--config", TEST_CONFIG,
                           "--data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=300)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"


def test_synth_then_train_then_evaluate(capsys, tmp_path):
  data = tmp_path / "data"
  code, out, _ = run_cli(capsys, "synth", "--out", data, "--cases", 4, "--seed", 3, "--shape",
                          32, 32, 32)
  assert code == 0 and "4 synthetic cases" in out
  assert len([p for p in data.iterdir() if p.is_dir()]) == 4
  work = tmp_path / "work"
  code, out, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", data,
                            "--workdir", work, "--config.train.steps=2")
  assert code == 0, err
  for line in ("step 1/2", "seg/dice", "critic/l1", "steps/s", "ETA",
               "Segmentation of 1 test case, latest checkpoint (step 2): the case's values",
               "HD95 mm WT"):
    assert line in out
  table = out[out.index("Segmentation of 1 test case"):].splitlines()[2:6]
  assert table and not any("±" in line for line in table)  # no spread of one value
  for name in ("config.json", "splits.json", "metrics.jsonl", "eval_test/metrics.csv",
               "eval_test/summary.json", "figures/training_curves.png"):
    assert (work / name).is_file(), name
  assert list((work / "figures").glob("test_*.png"))
  # data.folds 0 (the default): the plain split, as before folds existed, and no fold keys.
  record = json.loads((work / "splits.json").read_text())
  assert "folds" not in record and "fold" not in record
  config = load_test_config()
  assert {k: record[k] for k in ("train", "val", "test")} == dataset.split_cases(
      sorted(p.name for p in data.iterdir() if p.is_dir()), seed=config.seed,
      val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction)
  curves = (work / "figures" / "training_curves.png").stat().st_mtime_ns
  code, out, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", data)
  assert code == 0, err
  assert "Dice WT" in out and "flair" in out
  # Evaluating a finished run leaves the training curves as training drew them.
  assert (work / "figures" / "training_curves.png").stat().st_mtime_ns == curves
  code, out, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", data,
                           "--checkpoint", "2")
  assert code == 0, err
  assert "checkpoint of step 2" in out
  assert (work / "eval_test_step2_tta" / "summary.json").is_file()  # TTA, the default
  summary = json.loads((work / "eval_test_step2_tta" / "summary.json").read_text())
  assert summary["checkpoint"] == "2" and summary["tta"] is True
  # Training's own evaluation (one pass per slice) is still there, and so is --no-tta's.
  assert json.loads((work / "eval_test" / "summary.json").read_text())["tta"] is False
  code, out, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", data,
                           "--checkpoint", "2", "--no-tta")
  assert code == 0 and "mirrored" not in out, err
  assert json.loads((work / "eval_test_step2" / "summary.json").read_text())["tta"] is False
  code, _, err = run_cli(capsys, "evaluate", "--workdir", tmp_path / "nothing", "--data", data)
  assert_one_line_error(code, err, "config.json", "not found")


# ------------------------------------------------------------------------------------------------
# The command line explains itself: --help, --version, no command, the recipes, the families.
# ------------------------------------------------------------------------------------------------


def _help(capsys, *argv):
  """What ``uagan-jax ARGV --help`` prints; it exits 0 (argparse's SystemExit(0))."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import cli
  with pytest.raises(SystemExit) as exit_info:
    cli.main([*argv, "--help"])
  captured = capsys.readouterr()
  assert exit_info.value.code == 0
  assert captured.err == ""
  return captured.out


def _flat(text):
  """Whitespace collapsed: help is wrapped to the terminal width."""
  return " ".join(text.split())


def _subparsers():
  from uagan_jax import cli  # pylint: disable=g-import-not-at-top
  return cli._subcommands(cli._build_parser()).choices  # pylint: disable=protected-access


def test_version(capsys):
  # pylint: disable=g-import-not-at-top
  import configparser
  import importlib.metadata
  import uagan_jax
  from uagan_jax import cli
  # pylint: enable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out == f"uagan-jax {importlib.metadata.version('uagan_jax')}\n"
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  assert uagan_jax.__version__ == setup["metadata"]["version"] == cli.version()


def test_no_command_prints_the_usage_and_the_commands_then_one_error_line(capsys):
  for argv in ([], ["--config.train.steps=3"]):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert "Traceback" not in err
    assert err.startswith("usage: uagan-jax")
    for name in _subparsers():
      assert f"  {name} " in err, name
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert "no command given" in lines[-1] and "uagan-jax --help" in lines[-1]


def test_usage_errors_are_one_line_and_point_to_help(capsys):
  code, _, err = run_cli(capsys, "train")
  assert_one_line_error(code, err, "--config", "--data", "--workdir", "uagan-jax train --help")
  code, _, err = run_cli(capsys, "frobnicate")
  assert_one_line_error(code, err, "frobnicate", "uagan-jax --help")
  code, _, err = run_cli(capsys, "evaluate", "--workdir", "w", "--data", "d", "--split", "dev")
  assert_one_line_error(code, err, "dev", "uagan-jax evaluate --help")


def test_help_says_what_the_tool_does_without_rst(capsys):
  from uagan_jax import families  # pylint: disable=g-import-not-at-top
  out = _help(capsys)
  flat = _flat(out)
  assert out.startswith("usage: uagan-jax")
  for words in ("segments brain tumours", "multi-modal MRI", "(WT)", "(TC)", "(ET)",
                "translates an image from one modality into another", "typical workflow",
                "uagan-jax synth", "uagan-jax train", "uagan-jax evaluate", "uagan-jax predict",
                "--version"):
    assert words in flat, words
  workflow = out[out.index("typical workflow"):]
  assert (workflow.index("uagan-jax synth") < workflow.index("uagan-jax train")
          < workflow.index("uagan-jax evaluate") < workflow.index("uagan-jax predict"))
  for name in families.names():
    assert name in out and _flat(families.get(name).summary) in flat, name
  from uagan_jax import cli  # pylint: disable=g-import-not-at-top
  for choice in cli._subcommands(cli._build_parser())._choices_actions:  # pylint: disable=protected-access
    assert _flat(f"{choice.dest} {choice.help}") in flat, choice.dest
  for argv in ((), *((name,) for name in _subparsers())):
    assert "``" not in _help(capsys, *argv), argv


def test_every_option_of_every_command_has_help_that_states_its_default(capsys):
  # pylint: disable=g-import-not-at-top,protected-access
  import argparse
  from uagan_jax import cli
  parser = cli._build_parser()
  subparsers = cli._subcommands(parser)
  assert [a.dest for a in subparsers._choices_actions] == list(subparsers.choices)
  for choice in subparsers._choices_actions:
    assert choice.help and choice.help.strip(), choice.dest
  for name, sub in [("uagan-jax", parser), *subparsers.choices.items()]:
    assert sub.description and sub.description.strip(), name
    formatter = sub._get_formatter()
    for action in sub._actions:
      if action is subparsers:
        continue
      assert action.help and action.help.strip(), (name, action.option_strings)
      if isinstance(action, argparse._HelpAction) or action.default is argparse.SUPPRESS:
        continue
      text = formatter._expand_help(action)
      assert ("(required)" in text) == action.required, (name, action.option_strings, text)
      assert action.required or "default:" in text, (name, action.option_strings, text)
    for action in sub._actions:  # and the printed help shows each option
      for option in action.option_strings:
        assert option in _help(capsys, *([] if sub is parser else [name])), option
  assert "(default: 24)" in _flat(_help(capsys, "synth"))
  assert "(default: 128 128 96)" in _flat(_help(capsys, "synth"))
  assert "(default: latest)" in _flat(_help(capsys, "evaluate"))
  assert "(default: brats)" in _flat(_help(capsys, "predict"))


def _known_variants(text):
  """The variants a recipe's ValueError names ("known: a, b"): an oracle independent of the CLI."""
  import re  # pylint: disable=g-import-not-at-top
  match = re.search(r"known: ([^)\"']*)", text)
  return [v.strip() for v in match.group(1).split(",")] if match else []


def test_train_help_lists_every_recipe_with_its_variants_and_the_overrides(capsys):
  # pylint: disable=g-import-not-at-top
  import ast
  from uagan_jax import cli
  from uagan_jax import config as config_lib
  from uagan_jax import families
  # pylint: enable=g-import-not-at-top
  folder = ROOT / "configs"
  assert cli.recipes_folder() == folder
  out = _help(capsys, "train")
  flat = _flat(out)
  recipes = sorted(folder.glob("*.py"))
  assert recipes
  starts = [flat.index(f"{path.name} ") for path in recipes]
  assert starts == sorted(starts)  # one block per recipe, in name order
  for path, start, end in zip(recipes, starts, starts[1:] + [len(flat)]):
    block = flat[start:end]
    text = path.read_text()
    variants = _known_variants(text)
    assert variants, path  # every recipe has at least one variant today
    assert f"variants: {', '.join(variants)}" in block, (path, block)
    first_line = ast.get_docstring(ast.parse(text)).splitlines()[0]
    assert _flat(first_line) in block, (path, block)
    # what the help says is true: each listed variant loads, and the family is the recipe's
    config = config_lib.load_config(str(path))
    assert f"model.name {config.model.name}" in block
    for variant in cli.read_recipe(path).variants:
      config_lib.load_config(f"{path}:{variant}")
  for words in ("--config.train.steps=2000 --config.optim.segmentor_lr=1e-4",
                "--config.GROUP.KEY=VALUE", "[--config.KEY=VALUE ...]",
                "An unknown key or a value of the wrong type is an error"):
    assert words in flat, words
  for name in families.names():
    assert _flat(families.get(name).summary) in flat


def test_recipes_are_read_from_source_text(tmp_path):
  from uagan_jax import cli  # pylint: disable=g-import-not-at-top
  (tmp_path / "a.py").write_text(
      '"""First sentence, with et al. 2019 inside. Second sentence.\n\nMore."""\n'
      "import jax  # never imported by the help\n"
      "def get_config(arg=''):\n"
      "  c = base()\n  c.model.name = 'segan'\n"
      "  if arg == 'small':\n    c.model.name = 'unet'\n"
      "  elif arg in ('x', 'y'):\n    pass\n"
      "  elif arg:\n    raise ValueError(f'unknown variant {arg!r} (known: small, x, y, z)')\n"
      "  return c\n")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  (tmp_path / "bare.py").write_text("def get_config():\n  return None\n")
  (tmp_path / "_helper.py").write_text("")
  found = {r.path.name: r for r in cli.recipes(tmp_path)}
  assert sorted(found) == ["a.py", "bare.py", "broken.py"]
  assert found["a.py"] == cli.Recipe(tmp_path / "a.py", "First sentence, with et al. 2019 inside.",
                                     "segan", ("small", "x", "y", "z"))
  assert found["bare.py"].variants == () and found["bare.py"].summary == "(no docstring)"
  assert "cannot be read" in found["broken.py"].summary
  assert cli.recipes(tmp_path / "missing") == []


def test_train_help_without_a_recipes_folder_says_where_they_live(capsys, monkeypatch, tmp_path):
  from uagan_jax import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cli, "recipes_folder", lambda: tmp_path / "configs")
  flat = _flat(_help(capsys, "train"))
  assert "none found" in flat and "configs/*.py files of the source checkout" in flat
  assert str(tmp_path / "configs") in flat


def test_predict_and_translate_help_name_the_families_from_the_table(capsys):
  # pylint: disable=g-import-not-at-top
  import re
  from uagan_jax import families
  # pylint: enable=g-import-not-at-top
  top = _flat(_help(capsys))
  for command, capable in (("predict", families.with_capability(segments=True)),
                           ("translate", families.with_capability(translates=True))):
    text = _flat(_help(capsys, command))
    for name in families.names():
      assert bool(re.search(rf"\b{name}\b", text)) == (name in capable), (command, name)
    line = top[top.index(f" {command} "):]
    assert f"({', '.join(capable)} models)" in line[:200], (command, line[:200])
  # The table is the source: a newly registered family shows up without touching the CLI.
  families.register(families.Family(name="toyseg", roles=("segmentor",), segments=True,
                                    translates=False, summary="a toy segmentor",
                                    implementation="uagan_jax.families.unet"))
  try:
    assert "toyseg" in _flat(_help(capsys, "predict"))
    assert "toyseg" not in _flat(_help(capsys, "translate"))
    assert "a toy segmentor" in _flat(_help(capsys, "train"))
  finally:
    families.unregister("toyseg")


def test_help_and_version_do_not_import_jax():
  """The CLI answers --help without loading JAX (the commands import their modules lazily)."""
  script = (
      "import sys\n"
      "from uagan_jax import cli\n"
      "for argv in (['--help'], ['--version'], ['train', '--help'], ['synth', '--help'],\n"
      "             ['evaluate', '--help'], ['translate', '--help'], ['predict', '--help'],\n"
      "             ['postprocess', '--help']):\n"
      "  try:\n"
      "    cli.main(argv)\n"
      "  except SystemExit as e:\n"
      "    assert e.code == 0, (argv, e.code)\n"
      "  else:\n"
      "    raise AssertionError(argv)\n"
      "assert cli.main([]) == 2\n"
      "assert cli.main(['train']) == 2\n"
      "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', "
      "'optax', 'numpy', 'matplotlib'))\n"
      "assert not heavy, heavy\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ), timeout=120)
  assert result.returncode == 0, result.stderr
  assert "uagan-jax train" in result.stdout and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# Small data honestly: one training case, an empty test split, an external test set.
# ------------------------------------------------------------------------------------------------


def _copy_case(source_case, data_dir, new_id):
  """A synthetic (BraTS 2021 layout) case copied into ``data_dir`` under the id ``new_id``."""
  folder = data_dir / new_id
  folder.mkdir(parents=True)
  for path in source_case.iterdir():
    shutil.copy(path, folder / path.name.replace(source_case.name, new_id))


def test_one_case_trains_names_its_untrained_modalities_and_scores_an_external_test_set(
    capsys, synth_data, tmp_path):
  cases = sorted(p for p in synth_data.iterdir() if p.is_dir())
  one = tmp_path / "one"
  _copy_case(cases[0], one, "OnlyCase")
  work = tmp_path / "work"
  code, out, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", one, "--workdir",
                           work, "--config.train.steps=2")
  # A run that trained exits 0, though there is nothing held out to evaluate.
  assert code == 0, err
  assert "1 train, 0 val, 0 test; each training case contributes one modality (data.protocol " \
         "unpaired)" in out
  splits = json.loads((work / "splits.json").read_text())
  assert splits["protocol"] == "unpaired"
  (trained,) = splits["trained_modalities"]
  assert splits["train_modality"] == {"OnlyCase": trained}
  untrained = [m for m in MODALITIES if m != trained]
  warnings = [line for line in out.splitlines() if "warning: no training slices" in line]
  assert len(warnings) == 1, out
  assert f"of {', '.join(untrained)} (no training case contributes {', '.join(untrained)}: " \
         "data.protocol unpaired gives each of the 1 training case(s) one modality" in warnings[0]
  notes = [line for line in out.splitlines() if "evaluation skipped" in line]
  assert len(notes) == 1 and "the test split has no cases" in notes[0], out
  assert not (work / "eval_test").exists()
  # predict from a modality training never saw: refused, one line, the reason.
  code, _, err = run_cli(capsys, "predict", "--workdir", work, "--input", one / "OnlyCase",
                         "--modality", untrained[0], "--output", tmp_path / "seg.nii.gz")
  assert_one_line_error(code, err, f"--modality {untrained[0]}", f"trained on {trained} only",
                        "data.protocol unpaired")
  # The default split is empty: asking for it is asking for nothing.
  code, _, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", one)
  assert_one_line_error(code, err, "splits.json", "the test split has no cases")
  # Another folder is an external test set: every case, into eval_external_<folder>_tta/
  # (mirrored, the default).
  external = tmp_path / "external"
  for number, case in enumerate(cases[1:3]):
    _copy_case(case, external, f"External_{number}")
  code, out, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", external)
  assert code == 0, err
  assert "Segmentation of 2 external_external cases" in out
  # The modalities it never trained on are scored all the same, but said and starred.
  notes = [line for line in out.splitlines() if "note: the model never trained on" in line]
  assert len(notes) == 1 and ", ".join(untrained) in notes[0], out
  table = out[out.index("Segmentation of 2"):].splitlines()
  assert any(line.startswith(f"{untrained[0]}* ") for line in table)
  assert any(line.startswith(f"{trained} ") for line in table)
  assert "(* a modality the model never trained on)" in out
  rows = (work / "eval_external_external_tta" / "metrics.csv").read_text().splitlines()
  assert rows[0].startswith("case,modality,dice_WT,")
  assert sorted({tuple(r.split(",")[:2]) for r in rows[1:]}) == sorted(
      (f"External_{n}", m) for n in range(2) for m in MODALITIES)
  summary = json.loads((work / "eval_external_external_tta" / "summary.json").read_text())
  assert summary["case_ids"] == ["External_0", "External_1"]
  assert summary["split"] == "external_external" and summary["data"] == str(external)
  assert summary["untrained_modalities"] == untrained
  assert set(summary["segmentation"]) == set(MODALITIES)
  # --split all names the same thing; a folder holding the training case is no test set.
  code, out, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", external, "--split",
                           "all", "--checkpoint", "latest")
  assert code == 0 and (work / "eval_external_external_tta" / "summary.json").is_file(), err
  code, _, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", one, "--split", "all")
  assert_one_line_error(code, err, str(one), "1 case(s) the run trained or validated on",
                        "OnlyCase", "--split test")


def test_all_protocol_trains_every_modality_of_one_case(capsys, synth_data, tmp_path):
  one = tmp_path / "one"
  _copy_case(sorted(p for p in synth_data.iterdir() if p.is_dir())[0], one, "OnlyCase")
  work = tmp_path / "work"
  code, out, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", one, "--workdir",
                           work, "--config.train.steps=1", "--config.data.protocol=all",
                           "--no-eval")
  assert code == 0, err
  assert "each training case contributes every modality (data.protocol all)" in out
  assert "warning" not in out
  splits = json.loads((work / "splits.json").read_text())
  assert splits["protocol"] == "all" and "train_modality" not in splits
  assert splits["train_modalities"] == {"OnlyCase": list(MODALITIES)}
  assert splits["trained_modalities"] == list(MODALITIES)
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", one, "--workdir",
                         tmp_path / "w2", "--config.data.protocol=paired")
  assert_one_line_error(code, err, "data.protocol='paired'", "unpaired or all")


# ------------------------------------------------------------------------------------------------
# The persistent compilation cache of the commands.
# ------------------------------------------------------------------------------------------------


def test_compilation_cache_location_default_override_off_and_jax_own(monkeypatch, tmp_path):
  from uagan_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv("UAGAN_JAX_COMPILATION_CACHE", raising=False)
  assert compilation_cache.location() == compilation_cache.DEFAULT_LOCATION
  assert compilation_cache.DEFAULT_LOCATION.parts[-3:] == (".cache", "uagan_jax", "jax")
  monkeypatch.setenv("UAGAN_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
  assert compilation_cache.location() == tmp_path / "xla"
  for off in ("off", "OFF", "none", "0"):
    monkeypatch.setenv("UAGAN_JAX_COMPILATION_CACHE", off)
    assert compilation_cache.location() is None
  # JAX's own variable means JAX is configured already: left alone.
  monkeypatch.setenv("UAGAN_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert compilation_cache.location() is None


def _predict_process(workdir, case_dir, output, **env):
  """``uagan-jax predict --timing`` as a new process with ``env`` (no JAX cache variable);
  returns its stderr, where JAX's compiler logs each persistent cache hit."""
  environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  environment.update(env, PYTHONPATH=str(ROOT), JAX_DEBUG_LOG_MODULES="jax._src.compiler")
  result = subprocess.run(
      [sys.executable, "-m", "uagan_jax", "predict", "--workdir", str(workdir), "--input",
       str(case_dir), "--modality", "flair", "--output", str(output), "--timing"],
      capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "timing: " in result.stdout
  return result.stderr


def _cached_programs(folder):
  return sorted(p.name for p in folder.rglob("jit_probs-*")) if folder.is_dir() else []


def test_predict_caches_its_compiled_program_per_user_or_where_the_variable_says(case_dir,
                                                                                tmp_path):
  from conftest import write_random_workdir  # pylint: disable=g-import-not-at-top
  workdir = write_random_workdir(tmp_path / "w", load_test_config())
  home = tmp_path / "home"
  home.mkdir()
  hit = "Persistent compilation cache hit for 'jit_probs'"
  # The default: under the user's ~/.cache, small and quick-to-compile programs included.
  assert hit not in _predict_process(workdir, case_dir, tmp_path / "a.nii.gz", HOME=str(home))
  default = home / ".cache" / "uagan_jax" / "jax"
  assert len(_cached_programs(default)) == 1
  # $UAGAN_JAX_COMPILATION_CACHE moves it: compiled once into it, then read back from it, and
  # the output does not change.
  elsewhere = tmp_path / "xla"
  logs = [_predict_process(workdir, case_dir, tmp_path / f"{name}.nii.gz", HOME=str(home),
                           UAGAN_JAX_COMPILATION_CACHE=str(elsewhere)) for name in ("b", "c")]
  assert hit not in logs[0] and hit in logs[1]
  assert len(_cached_programs(elsewhere)) == 1
  assert len(_cached_programs(default)) == 1
  assert ((tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
          == (tmp_path / "c.nii.gz").read_bytes())


def test_predict_as_the_program_exits_without_teardown_in_process_it_returns(case_dir,
                                                                            tmp_path):
  # As the program (no argv), a finished predict leaves through os._exit: atexit handlers (JAX's
  # backend teardown) do not run; its output and its one-line summary are complete. --version
  # (any other command) still exits normally.
  from conftest import write_random_workdir  # pylint: disable=g-import-not-at-top
  workdir = write_random_workdir(tmp_path / "w", load_test_config())
  output = tmp_path / "seg.nii.gz"
  script = ("import atexit, sys\n"
            "atexit.register(lambda: print('teardown ran', flush=True))\n"
            "from uagan_jax import cli\n"
            "sys.argv = ['uagan-jax'] + sys.argv[1:]\n"
            "sys.exit(cli.main())\n")
  runs = {}
  for name, argv in (("predict", ["predict", "--workdir", str(workdir), "--input", str(case_dir),
                                  "--modality", "flair", "--output", str(output)]),
                     ("version", ["--version"])):
    runs[name] = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                                text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                timeout=300)
  assert runs["predict"].returncode == 0, runs["predict"].stderr
  assert "teardown ran" not in runs["predict"].stdout
  assert f"wrote {output}" in runs["predict"].stdout.splitlines()[-1]
  assert nib.load(output).shape == nib.load(case_dir / f"{case_dir.name}_flair.nii.gz").shape
  assert runs["version"].returncode == 0 and "teardown ran" in runs["version"].stdout
