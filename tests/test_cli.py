"""The command line: every kind of bad input ends in one line naming the file or key, exit 2."""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from uagan_jax.data import dataset

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


def test_changed_config_does_not_destroy_checkpoints(capsys, synth_data, tmp_path):
  code, _, _ = _train(capsys, synth_data, tmp_path, "--config.train.steps=2")
  assert code == 0
  before = sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir())
  config_before = (tmp_path / "work" / "config.json").read_text()
  code, _, err = _train(capsys, synth_data, tmp_path, "--config.train.steps=4",
                        "--config.model.segmentor_features=(4, 16)")
  assert_one_line_error(code, err, "checkpoints", "does not fit the current config")
  assert sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir()) == before
  assert (tmp_path / "work" / "config.json").read_text() == config_before


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
               "Segmentation of 1 test cases", "HD95 mm WT"):
    assert line in out
  for name in ("config.json", "splits.json", "metrics.jsonl", "eval_test/metrics.csv",
               "eval_test/summary.json", "figures/training_curves.png"):
    assert (work / name).is_file(), name
  assert list((work / "figures").glob("test_*.png"))
  code, out, err = run_cli(capsys, "evaluate", "--workdir", work, "--data", data)
  assert code == 0, err
  assert "Dice WT" in out and "flair" in out
  code, _, err = run_cli(capsys, "evaluate", "--workdir", tmp_path / "nothing", "--data", data)
  assert_one_line_error(code, err, "config.json", "not found")
