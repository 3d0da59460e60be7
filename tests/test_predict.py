"""``uagan-jax predict``: modes (file, case folder, data folder), labels, geometry and errors.

One segan model is trained per module, two steps through ``uagan-jax train`` (the real workflow,
seconds on a CPU). The other segmenting families (unet, uagan) are covered with checkpoints of
seeded random weights (`conftest.write_random_workdir`): what is checked for them, the plumbing,
the grid and the label values, does not depend on the weights. A stargan workdir is its config
alone: the family is refused before any checkpoint is read.
"""

import csv
import inspect
import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

import jax

from uagan_jax import (cli, evaluate, families, inference, metrics, postprocess, predict, timing,
                       train_state)
from uagan_jax import regions as regions_lib
from uagan_jax import config as config_lib
from uagan_jax.data import MODALITIES, preprocess, readers, resample, synthetic
from uagan_jax.errors import UserError

from conftest import (REAL_CASE, TEST_CONFIG, assert_one_line_error, load_test_config,
                      write_random_workdir, run_cli)

REAL_FLAIR = REAL_CASE / "UPENN-GBM-00003_11_FLAIR.nii.gz"
# BraTS label -> the same tissue in the msd (Task01) convention.
BRATS_TO_MSD = {0: 0, 1: 2, 2: 1, 4: 3}


@pytest.fixture(scope="module")
def workdirs(synth_data, tmp_path_factory):
  """Workdirs by name: segan (trained), unet (random, t1 and t2 only), uagan (random), stargan."""
  root = tmp_path_factory.mktemp("predict_work")
  out = {"segan": root / "segan"}
  assert cli.main(["train", "--config", TEST_CONFIG, "--data", str(synth_data), "--workdir",
                   str(out["segan"]), "--config.train.steps=2", "--no-eval"]) == 0
  config = load_test_config(variant="unet")
  with config.unlocked():
    config.data.modalities = ("t1", "t2")
  out["unet"] = write_random_workdir(root / "unet", config)
  out["uagan"] = write_random_workdir(root / "uagan", load_test_config(variant="uagan"))
  out["stargan"] = root / "stargan"
  out["stargan"].mkdir()
  (out["stargan"] / "config.json").write_text(
      config_lib.to_json(load_test_config(variant="stargan")))
  return out


def _predict(capsys, workdir, input_path, output, *extra, modality="flair"):
  code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", input_path,
                            "--modality", modality, "--output", output, *extra)
  assert code == 0, err
  return out


def _data(path):
  return np.asanyarray(nib.load(path).dataobj)


def _assert_same_grid(output_path, input_path):
  """The output has the input's spatial shape, affine, qform/sform (codes too), uint8 labels."""
  out, ref = nib.load(output_path), nib.load(input_path)
  assert out.shape == ref.shape[:3]
  np.testing.assert_array_equal(out.affine, ref.affine)
  for getter in ("get_qform", "get_sform"):
    got, got_code = getattr(out, getter)(coded=True)
    want, want_code = getattr(ref, getter)(coded=True)
    assert int(got_code) == int(want_code), getter
    if want is not None:
      np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(out.header["pixdim"][:4], ref.header["pixdim"][:4])
  assert out.header.get_xyzt_units() == ref.header.get_xyzt_units()
  assert out.get_data_dtype() == np.uint8
  assert _data(output_path).dtype == np.uint8  # no scaling: the stored values are the labels


def _reoriented_flair(case_dir, path):
  """The case's FLAIR cropped to 28x30x32 and stored with SAL axes (every axis moved)."""
  original = nib.load(case_dir / f"{case_dir.name}_flair.nii.gz")
  cropped = original.slicer[:, 1:31, 2:30]
  ornt = orientations.ornt_transform(orientations.io_orientation(cropped.affine),
                                     orientations.axcodes2ornt("SAL"))
  nib.save(cropped.as_reoriented(ornt), path)
  return path


def test_single_file_equals_segment_volume_on_the_source_grid(capsys, workdirs, case_dir,
                                                               tmp_path):
  source = _reoriented_flair(case_dir, tmp_path / "sal_flair.nii.gz")
  output = tmp_path / "new" / "seg.nii.gz"
  out = _predict(capsys, workdirs["segan"], source, output, modality="FLAIR")
  assert f"loading {source} (flair)" in out and "segmenting " in out
  assert f"wrote {output} (brats labels: 1: " in out and " s\n" in out
  _assert_same_grid(output, source)
  assert [p.name for p in output.parent.iterdir()] == ["seg.nii.gz"]  # no temporary file left

  # What evaluation computes, independently loaded, mapped back to the source voxel order.
  config = config_lib.from_json_file(workdirs["segan"] / "config.json")
  state, step = inference.load_state(config, workdirs["segan"])
  assert step == 2
  predictor = inference.SlicePredictor(config, inference.segmentation_variables(state, config),
                                      batch_size=config.eval.batch_size)
  volume = readers.load_case(
      readers.CaseFiles(case_id="sal", layout="brats2021", images={"flair": source}, label=None),
      modalities=("flair",), with_label=False)
  regions = inference.segment_volume(predictor, volume.images["flair"], modality="flair",
                                    config=config, tta=True)  # predict mirrors by default
  canonical = readers.regions_to_labels(regions, convention="brats")
  got = _data(output)
  np.testing.assert_array_equal(got, volume.to_source_orientation(canonical))
  np.testing.assert_array_equal(np.asanyarray(nib.as_closest_canonical(nib.load(output)).dataobj),
                                canonical)
  assert set(np.unique(got).tolist()) <= {0, 1, 2, 4} and np.any(got)

  # The same input again gives the same file, byte for byte.
  _predict(capsys, workdirs["segan"], source, tmp_path / "again.nii.gz")
  assert (tmp_path / "again.nii.gz").read_bytes() == output.read_bytes()


def test_case_folder_with_msd_labels(capsys, workdirs, case_dir, tmp_path):
  flair = case_dir / f"{case_dir.name}_flair.nii.gz"
  brats = predict.predict(flair, tmp_path / "brats.nii", modality="flair",
                          workdir=workdirs["segan"], log=lambda _: None)
  assert [r.labels for r in brats] == ["brats"] and brats[0].case_id == f"{case_dir.name}_flair"
  out = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "msd.nii.gz", "--labels", "msd")
  assert f"loading {flair} (flair)" in out and "(msd labels: 1: " in out
  _assert_same_grid(tmp_path / "msd.nii.gz", flair)
  _assert_same_grid(tmp_path / "brats.nii", flair)
  msd, brats_labels = _data(tmp_path / "msd.nii.gz"), _data(tmp_path / "brats.nii")
  assert set(np.unique(msd).tolist()) <= {0, 1, 2, 3}
  np.testing.assert_array_equal(msd, np.vectorize(BRATS_TO_MSD.get)(brats_labels))
  assert brats[0].voxels == {label: int(np.sum(brats_labels == label)) for label in (1, 2, 4)}


def test_folder_of_cases(capsys, workdirs, synth_data, case_dir, tmp_path):
  output = tmp_path / "segmentations"
  out = _predict(capsys, workdirs["segan"], synth_data, output)
  case_ids = sorted(p.name for p in synth_data.iterdir() if p.is_dir())
  assert sorted(p.name for p in output.iterdir()) == [f"{c}.nii.gz" for c in case_ids]
  assert f"predicted 1/8 cases ({case_ids[0]}: " in out and "ETA " in out
  assert f"predicted 8/8 cases ({case_ids[-1]}: " in out
  assert f"wrote 8 segmentations (brats labels) to {output}" in out
  assert "segmenting 32 slices" not in out  # one line per case, not one per step
  for case_id in case_ids:
    _assert_same_grid(output / f"{case_id}.nii.gz",
                      synth_data / case_id / f"{case_id}_flair.nii.gz")
  # A case of the folder gives the same file as the case alone.
  _predict(capsys, workdirs["segan"], case_dir, tmp_path / "alone.nii.gz")
  alone = (tmp_path / "alone.nii.gz").read_bytes()
  assert alone == (output / f"{case_dir.name}.nii.gz").read_bytes()


def test_msd_task_folder_gives_3d_segmentations_of_the_4d_images(capsys, workdirs, synth_data,
                                                                  tmp_path):
  """An msd folder: 4D images (channel order from dataset.json), one 3D segmentation per case."""
  root = tmp_path / "Task01_BrainTumour"
  order = ("flair", "t1", "t1ce", "t2")
  (root / "imagesTs").mkdir(parents=True)
  (root / "dataset.json").write_text(json.dumps(
      {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
  cases = sorted(p for p in synth_data.iterdir() if p.is_dir())[:2]
  for number, case in enumerate(cases):
    images = [nib.load(case / f"{case.name}_{m}.nii.gz") for m in order]
    stacked = np.stack([np.asanyarray(i.dataobj) for i in images], axis=-1)
    nib.save(nib.Nifti1Image(stacked, images[0].affine),
             root / "imagesTs" / f"BRATS_{number}.nii.gz")
  output = tmp_path / "predictions"
  _predict(capsys, workdirs["segan"], root, output, "--labels", "msd", modality="t1")
  for number, case in enumerate(cases):
    got = output / f"BRATS_{number}.nii.gz"
    _assert_same_grid(got, root / "imagesTs" / got.name)
    assert nib.load(got).ndim == 3 and int(nib.load(got).header["dim"][0]) == 3
    # The t1 channel of the 4D file segments as the case's own t1 file does.
    _predict(capsys, workdirs["segan"], case / f"{case.name}_t1.nii.gz", tmp_path / "t1.nii.gz",
             "--labels", "msd", modality="t1")
    np.testing.assert_array_equal(_data(got), _data(tmp_path / "t1.nii.gz"))


@pytest.mark.parametrize("family,modality", [("unet", "t2"), ("uagan", "t1ce")])
def test_every_segmenting_family(capsys, workdirs, case_dir, tmp_path, family, modality):
  source = case_dir / f"{case_dir.name}_{modality}.nii.gz"
  output = tmp_path / "seg.nii.gz"
  out = _predict(capsys, workdirs[family], source, output, "--batch-size", "5",
                 modality=modality)
  assert f"model: {family}, checkpoint step 1" in out
  _assert_same_grid(output, source)
  assert set(np.unique(_data(output)).tolist()) <= {0, 1, 2, 4}


@pytest.mark.skipif(not REAL_FLAIR.is_file(), reason=f"real UPENN-GBM case absent ({REAL_FLAIR})")
def test_real_upenn_case_keeps_its_geometry(capsys, workdirs, tmp_path):
  """The real case folder (UPENN names, LPS, qform only, int16): the header survives."""
  output = tmp_path / "UPENN-GBM-00003_11_pred.nii.gz"
  out = _predict(capsys, workdirs["segan"], REAL_CASE, output)
  assert f"loading {REAL_FLAIR} (flair)" in out
  assert "resampling" not in out  # 1 mm, as the model
  ref, got = nib.load(REAL_FLAIR), nib.load(output)
  assert got.shape == ref.shape == (240, 240, 155)
  np.testing.assert_array_equal(got.affine, ref.affine)
  assert nib.aff2axcodes(got.affine) == ("L", "P", "S")
  assert int(got.get_qform(coded=True)[1]) == int(ref.get_qform(coded=True)[1]) == 1
  assert int(got.get_sform(coded=True)[1]) == int(ref.get_sform(coded=True)[1]) == 0
  _assert_same_grid(output, REAL_FLAIR)
  labels = _data(output)
  assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
  # Axial slices without brain stay background (axis 2 is S in this LPS file too).
  empty_slices = ~np.any(_data(REAL_FLAIR) != 0, axis=(0, 1))
  assert empty_slices.sum() == 8 and not np.any(labels[:, :, empty_slices])


def _replace_the_network(monkeypatch, probabilities, seen=None):
  """Every SlicePredictor answers ``probabilities(slices)`` for WT (TC, ET empty) and records the
  shapes of the slice stacks it is given in ``seen``: what the geometry does is then checked
  against a known answer instead of a two-step model's noise."""
  def call(self, slices, modality_id):  # pylint: disable=unused-argument
    if seen is not None:
      seen.append(slices.shape)
    probs = np.zeros(slices.shape + (3,), np.float32)
    probs[..., 0] = probabilities(slices)
    return probs
  monkeypatch.setattr(inference.SlicePredictor, "__call__", call)


def _bright(slices):
  """The phantoms' FLAIR tumour is its brightest tissue: z-score above 2 (WT Dice 0.94-0.98 on
  64x64x48 phantoms at their own spacing)."""
  return (slices > 2.0).astype(np.float32)


def _write_flair(path, image, spacing):
  affine = synthetic.brats_affine(image.shape, spacing)
  nifti = nib.Nifti1Image(image.astype(np.float32), affine)
  nifti.set_qform(affine, code=1)
  nifti.set_sform(affine, code=2)
  nib.save(nifti, path)
  return path


@pytest.mark.parametrize("spacing", [(0.9, 0.9, 0.9), (1.0, 1.0, 3.0)])
def test_another_spacing_is_resampled_to_the_models_and_back(capsys, workdirs, tmp_path,
                                                              monkeypatch, spacing):
  """A 1 mm model (configs/test.py) on a phantom resampled to ``spacing``: the labels land on the
  tumour, on the input's grid."""
  images, label = synthetic.make_phantom(seed=0, case_index=0, shape=(64, 64, 48))
  flair = resample.image_to_spacing(images["flair"], (1.0, 1.0, 1.0), spacing)
  truth = resample.labels_to_shape(label, flair.shape) > 0
  source = _write_flair(tmp_path / "flair.nii.gz", flair, spacing)
  seen = []
  _replace_the_network(monkeypatch, _bright, seen)
  out = _predict(capsys, workdirs["segan"], source, tmp_path / "seg.nii.gz")
  shown = "x".join(f"{v:g}" for v in spacing)
  assert f"resampling from {shown} mm to the model's 1x1x1 mm voxels" in out
  _assert_same_grid(tmp_path / "seg.nii.gz", source)
  predicted = _data(tmp_path / "seg.nii.gz") > 0
  # The same detector at the phantom's own 1 mm, for reference.
  reference = metrics.dice(_bright(preprocess.zscore_brain(images["flair"], clip=5.0)) > 0,
                           label > 0)
  # Two linear resamplings blur the tumour's rim by about a voxel: a few points of Dice off the
  # reference (an unresampled or misplaced result loses far more, see below).
  dice = metrics.dice(predicted, truth)
  print(f"WT Dice at {spacing} mm: {dice:.3f}, reference at 1 mm: {reference:.3f}")
  assert dice > reference - 0.08
  # The network saw the volume at 1 mm: the slices of the resampled image, its whole brain
  # (each slice four times: as it is and its three mirrorings, the default test-time augmentation).
  at_model = resample.image_to_spacing(flair, spacing, (1.0, 1.0, 1.0))
  window = preprocess.brain_window(np.any(at_model != 0, axis=2), size=(32, 32), stride=4)
  brain_slices = np.count_nonzero(np.any(at_model != 0, axis=(0, 1)))
  assert [n for n, _, _ in seen] == [brain_slices, 3 * brain_slices]
  assert {(h, w) for _, h, w in seen} == {window.size}
  # Shifted by two voxels (of about 20 across the tumour), the same mask fails that threshold.
  assert metrics.dice(np.roll(predicted, 2, axis=0), truth) < reference - 0.08


def test_a_spacing_within_one_percent_is_not_resampled(workdirs, case_dir):
  segmentor = predict.load_segmentor(workdirs["segan"])
  image = readers.load_case(readers.find_cases(case_dir)[0], modalities=("flair",),
                            with_label=False).images["flair"]
  at_model = segmentor.segment(image, modality="flair")
  assert not segmentor.needs_resampling((1.009, 0.992, 1.0))
  np.testing.assert_array_equal(segmentor.segment(image, modality="flair",
                                                  spacing=(1.009, 0.992, 1.0)), at_model)
  assert segmentor.needs_resampling((1.02, 1.0, 1.0))


def test_a_brain_larger_than_the_slices_is_seen_whole(capsys, workdirs, tmp_path, monkeypatch):
  """A 64x64 phantom brain against the test model's 32x32 slices, a tumour at its edge."""
  images, label = synthetic.make_phantom(seed=0, case_index=1, shape=(64, 64, 48))
  flair = images["flair"].astype(np.float32)
  brain = flair != 0
  xs = np.flatnonzero(brain.any(axis=(1, 2)))
  assert xs[-1] - xs[0] + 1 > 32  # the centred 32x32 crop would cut the brain
  edge = np.zeros_like(brain)
  z = 24
  ys = np.flatnonzero(brain[xs[0] + 3, :, z])
  edge[xs[0] + 1:xs[0] + 5, ys[len(ys) // 2] - 2:ys[len(ys) // 2] + 2, z - 2:z + 2] = True
  edge &= brain
  flair[edge] = flair.max() * 3  # a bright tumour at the brain's edge, outside the centre
  source = _write_flair(tmp_path / "flair.nii.gz", flair, (1.0, 1.0, 1.0))

  _replace_the_network(monkeypatch, lambda slices: (slices != 0).astype(np.float32))
  _predict(capsys, workdirs["segan"], source, tmp_path / "brain.nii.gz")
  np.testing.assert_array_equal(_data(tmp_path / "brain.nii.gz") > 0, brain)  # every voxel seen

  _replace_the_network(monkeypatch, _bright)
  _predict(capsys, workdirs["segan"], source, tmp_path / "seg.nii.gz")
  assert np.all(_data(tmp_path / "seg.nii.gz")[edge] > 0)


@pytest.mark.skipif(not REAL_FLAIR.is_file(), reason=f"real UPENN-GBM case absent ({REAL_FLAIR})")
def test_every_brain_voxel_of_the_real_case_is_seen(capsys, workdirs, tmp_path, monkeypatch):
  _replace_the_network(monkeypatch, lambda slices: (slices != 0).astype(np.float32))
  _predict(capsys, workdirs["segan"], REAL_FLAIR, tmp_path / "brain.nii.gz")
  np.testing.assert_array_equal(_data(tmp_path / "brain.nii.gz") > 0, _data(REAL_FLAIR) != 0)


def test_bad_inputs_end_in_one_line(capsys, workdirs, case_dir, synth_data, tmp_path):
  flair = case_dir / f"{case_dir.name}_flair.nii.gz"
  label = case_dir / f"{case_dir.name}_seg.nii.gz"
  output = tmp_path / "out.nii.gz"
  output.write_bytes(b"an earlier result")

  def run(workdir=workdirs["segan"], input_path=flair, modality="flair", output_path=output,
          extra=()):
    return run_cli(capsys, "predict", "--workdir", workdir, "--input", input_path,
                    "--modality", modality, "--output", output_path, *extra)

  code, _, err = run(input_path=tmp_path / "missing_flair.nii.gz")
  assert_one_line_error(code, err, tmp_path / "missing_flair.nii.gz", "no such file")
  (tmp_path / "notes.txt").write_text("not an image")
  code, _, err = run(input_path=tmp_path / "notes.txt")
  assert_one_line_error(code, err, tmp_path / "notes.txt", "not a NIfTI file")
  code, _, err = run(modality="pd")
  assert_one_line_error(code, err, "--modality", "'pd'", "unknown modality", ", ".join(MODALITIES))
  code, _, err = run(extra=("--labels", "brats2021"))
  assert_one_line_error(code, err, "--labels", "invalid choice", "'brats2021'")
  code, _, err = run(extra=("--batch-size", "0"))
  assert_one_line_error(code, err, "--batch-size 0", "at least 1")
  code, _, err = run(workdir=workdirs["stargan"])
  assert_one_line_error(code, err, workdirs["stargan"], "stargan does not segment",
                        "unet, segan and uagan")
  code, _, err = run(workdir=workdirs["unet"])
  assert_one_line_error(code, err, "--modality flair", "trained on t1, t2 only")
  code, _, err = run(workdir=tmp_path)
  assert_one_line_error(code, err, tmp_path / "config.json", "not found")

  # Output problems, found before the model is loaded (a workdir that could not load anyway).
  folder = tmp_path / "folder.nii.gz"
  folder.mkdir()
  for bad_output, needles in (
      (tmp_path / "out.png", (".nii.gz",)),
      (folder, ("is a folder",)),
      (flair, ("is the input file",)),
      (case_dir / ".." / case_dir.name / flair.name, ("is the input file",)),
      (output / "seg.nii.gz", (output, "not a folder"))):
    code, _, err = run(workdir=tmp_path, output_path=bad_output)
    assert_one_line_error(code, err, bad_output, *needles)
  # A case folder's other files are input files too: its label is never overwritten.
  code, _, err = run(workdir=tmp_path, input_path=case_dir, output_path=label)
  assert_one_line_error(code, err, label, "is the input label file")
  code, _, err = run(workdir=tmp_path, input_path=synth_data, output_path=tmp_path / "x.nii.gz")
  assert_one_line_error(code, err, "x.nii.gz", "data folder (8 cases)", "not a NIfTI file")
  code, _, err = run(workdir=tmp_path, input_path=synth_data, output_path=tmp_path / "notes.txt")
  assert_one_line_error(code, err, tmp_path / "notes.txt", "not a folder")
  code, _, err = run(workdir=tmp_path, input_path=synth_data, output_path=synth_data / "preds")
  assert_one_line_error(code, err, synth_data / "preds", "inside the input folder")
  assert not (synth_data / "preds").exists()

  # Nothing already there was touched.
  assert output.read_bytes() == b"an earlier result"
  before = {p: p.read_bytes() for p in (flair, label)}
  assert all(p.read_bytes() == b for p, b in before.items())


def test_all_zero_image_and_corrupt_case_keep_what_was_written(capsys, workdirs, synth_data,
                                                               tmp_path):
  data = tmp_path / "data"
  cases = sorted(p for p in synth_data.iterdir() if p.is_dir())[:3]
  for case in cases:
    shutil.copytree(case, data / case.name)
  # The second case's FLAIR is all zeros, then (another run) the third one's is truncated.
  zero = data / cases[1].name / f"{cases[1].name}_flair.nii.gz"
  image = nib.load(zero)
  nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine, image.header), zero)
  output = tmp_path / "out"
  code, out, err = run_cli(capsys, "predict", "--workdir", workdirs["segan"], "--input", data,
                            "--modality", "flair", "--output", output)
  assert_one_line_error(code, err, zero, "every voxel is 0")
  assert f"predicted 1/3 cases ({cases[0].name}" in out
  assert [p.name for p in output.iterdir()] == [f"{cases[0].name}.nii.gz"]
  first = (output / f"{cases[0].name}.nii.gz").read_bytes()

  shutil.copy(cases[1] / f"{cases[1].name}_flair.nii.gz", zero)
  truncated = data / cases[2].name / f"{cases[2].name}_flair.nii.gz"
  truncated.write_bytes(truncated.read_bytes()[:500])
  code, _, err = run_cli(capsys, "predict", "--workdir", workdirs["segan"], "--input", data,
                          "--modality", "flair", "--output", output)
  assert_one_line_error(code, err, truncated, "truncated or corrupt")
  assert sorted(p.name for p in output.iterdir()) == [f"{c.name}.nii.gz" for c in cases[:2]]
  assert (output / f"{cases[0].name}.nii.gz").read_bytes() == first


def test_a_failed_write_keeps_the_previous_output(workdirs, case_dir, tmp_path, monkeypatch):
  output = tmp_path / "seg.nii.gz"
  output.write_bytes(b"the previous result")

  def fail(*_):
    raise OSError("disk full")

  segmentor = predict.load_segmentor(workdirs["segan"])
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(UserError, match="cannot write.*disk full"):
    predict.predict(case_dir, output, modality="t1", segmentor=segmentor, log=lambda _: None)
  assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
  assert output.read_bytes() == b"the previous result"


def test_predict_help_lists_the_options(capsys):
  with pytest.raises(SystemExit):
    cli.main(["predict", "--help"])
  out = capsys.readouterr().out
  for option in ("--workdir", "--input", "--modality", "--output", "--labels", "--batch-size",
                 "brats,brats2023,msd", "--no-tta", "--save-probabilities",
                 "_probabilities.nii.gz", "paired in order"):
    assert option in out
  assert tuple(predict.LABEL_CONVENTIONS) == ("brats", "brats2023", "msd")
  # The library's default is the command's.
  assert inspect.signature(predict.predict).parameters["tta"].default is cli.TTA_DEFAULT


def test_a_modality_training_never_saw_is_refused(capsys, case_dir, tmp_path):
  """One training case under the unpaired protocol trains one modality (splits.json
  trained_modalities); predict refuses the others, though config data.modalities lists them."""
  workdir = write_random_workdir(tmp_path / "w", load_test_config(variant="unet"))
  (workdir / "splits.json").write_text(json.dumps(
      {"train": ["a"], "val": [], "test": [], "protocol": "unpaired", "train_modality": {"a": "t2"},
       "trained_modalities": ["t2"]}))
  assert predict.load_segmentor(workdir).modalities == ("t2",)
  output = tmp_path / "seg.nii.gz"
  code, _, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                         "--modality", "flair", "--output", output)
  assert_one_line_error(code, err, "--modality flair", "trained on t2 only", "splits.json",
                        "each of its 1 training case(s) contributed one modality")
  assert not output.exists()
  # Refused before any checkpoint is read.
  def no_load(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the modality was refused")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(inference, "load_state", no_load)
    code, _, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                           "--modality", "flair", "--output", output)
  assert_one_line_error(code, err, "--modality flair", "trained on t2 only")
  _predict(capsys, workdir, case_dir, output, modality="t2")
  assert output.is_file()


# --- Timing (--timing) and the compiled program ----------------------------------------------


def test_stopwatch_counts_each_second_once_for_the_innermost_phase(monkeypatch):
  clock = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])  # every perf_counter call, in order
  monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
  stopwatch = timing.Stopwatch()
  stopwatch.add("before", 0.5)
  with stopwatch.phase("segment"):  # 0
    with stopwatch.phase("compile"):  # 1
      pass  # 3
    with stopwatch.phase("compile"):  # 6
      pass  # 10
  # 15
  assert stopwatch.seconds == {"before": 0.5, "segment": 1.0 + 3.0 + 5.0, "compile": 2.0 + 4.0}
  assert stopwatch.summary() == ("timing: before 0.50 s, segment 9.00 s, compile 6.00 s, "
                                 "total 15.50 s")


def test_timing_names_every_phase_and_they_add_up(capsys, workdirs, case_dir, tmp_path):
  out = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "seg.nii.gz", "--timing")
  lines = [line for line in out.splitlines() if "timing:" in line]
  assert len(lines) == 1 and lines[0] == out.rstrip().splitlines()[-1], out
  parts = re.findall(r"([a-z][a-z ]*?) ([0-9.]+) s", lines[0].split("timing: ")[1])
  names = [name for name, _ in parts]
  assert names == ["command line", "import", "load model", "read", "segment", "compile", "tta",
                   "write", "total"], lines[0]
  assert seconds_of(lines[0], "tta") > 0  # the mirrored passes, apart from the first one
  seconds = [float(value) for _, value in parts]
  assert seconds[names.index("compile")] > 0  # a new segmentor compiles its program once
  assert abs(sum(seconds[:-1]) - seconds[-1]) <= 0.01 * len(seconds)  # rounding of each part
  # Without the flag there is no such line, and the file is the same.
  quiet = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "again.nii.gz")
  assert "timing:" not in quiet
  assert (tmp_path / "again.nii.gz").read_bytes() == (tmp_path / "seg.nii.gz").read_bytes()
  # Without TTA there is no mirrored pass to count.
  out = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "plain.nii.gz", "--timing",
                 "--no-tta")
  assert " tta " not in out.rstrip().splitlines()[-1]


def seconds_of(line, phase):
  """The seconds of ``phase`` in a ``timing:`` line."""
  return float(re.search(rf"[:,] {phase} ([0-9.]+) s", line).group(1))


@pytest.mark.parametrize("family", ["segan", "uagan"])
def test_the_predictor_runs_the_program_jit_compiles_once_per_shape(workdirs, family):
  config = config_lib.from_json_file(workdirs[family] / "config.json")
  state, _ = inference.load_state(config, workdirs[family])
  variables = inference.segmentation_variables(state, config)
  stopwatch = timing.Stopwatch()
  predictor = inference.SlicePredictor(config, variables, batch_size=4, stopwatch=stopwatch)
  jitted = jax.jit(families.implementation(config.model.name).segment_fn(
      train_state.build_networks(config, bn_axis_name=None), config))
  rng = np.random.default_rng(0)
  size = tuple(config.data.image_size)
  modality = MODALITIES.index(config.data.modalities[0])
  for count, shape in ((6, size), (3, size), (2, (size[0] + 16, size[1]))):
    slices = rng.normal(size=(count,) + shape).astype(np.float32)
    padded = np.concatenate([slices, np.zeros((8 - count,) + shape, np.float32)])[..., None]
    ids = np.full((4,), modality, np.int32)
    expected = np.concatenate([np.asarray(jitted(jax.device_put(variables), padded[i:i + 4], ids))
                               for i in (0, 4)])[:count]
    np.testing.assert_array_equal(predictor(slices, modality), expected)  # bit for bit
  # One compilation per slice shape: the first two stacks share theirs.
  compiles = []
  predictor_again = inference.SlicePredictor(config, variables, batch_size=4,
                                             stopwatch=_CountingStopwatch(compiles))
  predictor_again(rng.normal(size=(5,) + size).astype(np.float32), modality)
  predictor_again(rng.normal(size=(1,) + size).astype(np.float32), modality)
  assert compiles == ["compile"]
  assert stopwatch.seconds["compile"] > 0


class _CountingStopwatch(timing.Stopwatch):
  """Records the name of every phase entered."""

  def __init__(self, entered):
    super().__init__()
    self.entered = entered

  def phase(self, name):
    self.entered.append(name)
    return super().phase(name)


# --- The segmentor alone from the checkpoint ---------------------------------------------------


def _digest_file(workdir, step=None):
  """The digest item (JSON) of a workdir's checkpoint ``step``, default the newest."""
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  return workdir / "checkpoints" / str(steps[-1] if step is None else step) / "digest" / "metadata"


def _change_leaf_digest(workdir, prefix, step=None):
  """Sets the digest of the first leaf under ``prefix`` to zeros; returns the leaf's name."""
  digest = json.loads(_digest_file(workdir, step).read_text())
  name = next(n for n in sorted(digest["leaves"]) if n.startswith(prefix))
  digest["leaves"][name] = "0" * 64
  _digest_file(workdir, step).write_text(json.dumps(digest))
  return name


@pytest.mark.parametrize("family", ["segan", "unet", "uagan"])
def test_the_segmentor_alone_equals_it_in_the_whole_restored_state(workdirs, family):
  config = config_lib.from_json_file(workdirs[family] / "config.json")
  role = families.implementation(config.model.name).SEGMENTATION_ROLE
  # The checkpoint holds more than the segmentor: a part is what is restored here.
  stored = json.loads(_digest_file(workdirs[family]).read_text())["leaves"]
  assert any(not name.startswith(f"nets/{role}/") for name in stored)
  assert any("opt_state" in name for name in stored)
  variables, step = inference.load_network(config, workdirs[family], role=role)
  state, full_step = inference.load_state(config, workdirs[family])
  whole = inference.segmentation_variables(state, config)
  assert step == full_step
  assert jax.tree.structure(variables) == jax.tree.structure(whole)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(whole)):
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  assert predict.load_segmentor(workdirs[family]).step == step


def test_a_segmentor_leaf_that_changed_on_disk_is_refused_one_elsewhere_is_not_read(
    capsys, workdirs, case_dir, tmp_path):
  # A digest that no longer matches stands in for data changed on disk (as tests/test_faults.py).
  config = config_lib.from_json_file(workdirs["segan"] / "config.json")
  steps = sorted(int(p.name) for p in (workdirs["segan"] / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [1, 2]
  # Elsewhere (the critic): not read, so not verified; the newest checkpoint segments as before.
  workdir = tmp_path / "critic"
  shutil.copytree(workdirs["segan"], workdir)
  _change_leaf_digest(workdir, "nets/critic/params/")
  for name, source in (("critic", workdir), ("unchanged", workdirs["segan"])):
    code, out, err = run_cli(capsys, "predict", "--workdir", source, "--input", case_dir,
                             "--modality", "flair", "--output", tmp_path / f"{name}.nii.gz")
    assert code == 0 and not err.strip() and "checkpoint step 2" in out, err
  assert ((tmp_path / "critic.nii.gz").read_bytes()
          == (tmp_path / "unchanged.nii.gz").read_bytes())
  # In the segmentor: the newest checkpoint is unreadable (one warning naming the leaf) and the
  # one before it segments; with both changed, one error line.
  workdir = tmp_path / "segmentor"
  shutil.copytree(workdirs["segan"], workdir)
  name = _change_leaf_digest(workdir, "nets/segmentor/params/")
  output = tmp_path / "segmentor.nii.gz"
  code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                           "--modality", "flair", "--output", output)
  assert code == 0, err
  warnings = [line for line in err.splitlines() if line.strip()]
  assert len(warnings) == 1 and warnings[0].startswith("warning: "), err
  for needle in (workdir / "checkpoints" / "2", name, "does not match the digest",
                 "using the one of step 1 instead"):
    assert str(needle) in warnings[0], warnings[0]
  assert "checkpoint step 1" in out
  _change_leaf_digest(workdir, "nets/segmentor/batch_stats/", step=1)
  output.unlink()
  code, _, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                         "--modality", "flair", "--output", output)
  assert_one_line_error(code, err, workdir / "checkpoints", "no readable checkpoint", name,
                        "does not match the digest")
  assert not output.exists()
  with pytest.raises(UserError, match="no readable checkpoint"):
    inference.load_network(config, workdir, role="segmentor")


def test_a_checkpoint_without_leaf_digests_is_restored_and_verified_whole(workdirs, tmp_path):
  config = config_lib.from_json_file(workdirs["segan"] / "config.json")
  workdir = tmp_path / "old"
  shutil.copytree(workdirs["segan"], workdir)
  digest = json.loads(_digest_file(workdir).read_text())
  digest.pop("leaves")  # as written before leaf digests existed
  _digest_file(workdir).write_text(json.dumps(digest))
  variables, _ = inference.load_network(config, workdir, role="segmentor")
  want, _ = inference.load_network(config, workdirs["segan"], role="segmentor")
  for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, expected)
  variables, step = inference.load_network(config, workdir, role="segmentor")
  assert step == 2
  digest["sha256"] = "0" * 64  # and whole means the whole digest is checked: step 1 is used
  _digest_file(workdir).write_text(json.dumps(digest))
  notes = []
  _, step = inference.load_network(config, workdir, role="segmentor", log=notes.append)
  assert step == 1
  assert len(notes) == 1 and "does not match the digest" in notes[0], notes


# --- One segmentation, scored as written --------------------------------------------------------


def _disagreeing_channels(slices, modality_id):  # pylint: disable=unused-argument
  """Region channels that do not nest: TC wider than WT, ET partly outside both."""
  probs = np.zeros(slices.shape + (3,), np.float32)
  probs[..., 0] = slices > 2.0
  probs[..., 1] = slices > 1.5
  probs[..., 2] = (slices > 0.3) & (slices < 0.6) | (slices > 2.5)
  return probs


def _leaning_channels(slices, modality_id):
  """`_disagreeing_channels` fading along H and W: the mirrorings of test-time augmentation see
  other probabilities, so their mean thresholds differently from the one pass."""
  probs = _disagreeing_channels(slices, modality_id)
  height, width = slices.shape[1:3]
  ramp = (np.linspace(0.2, 1.0, height)[:, None] * np.linspace(0.5, 1.0, width)[None, :])
  return (probs * ramp[None, :, :, None]).astype(np.float32)


@pytest.mark.parametrize("nesting,tta,postprocessing", [("inner_wins", False, True),
                                                         ("outer_gates", False, False),
                                                         ("inner_wins", True, False),
                                                         ("outer_gates", True, False)])
def test_evaluate_scores_the_label_map_predict_writes(capsys, workdirs, synth_data, tmp_path,
                                                      monkeypatch, nesting, tta, postprocessing):
  """Every row of evaluate's metrics.csv equals the metrics of predict's file for that case and
  modality, read back from disk and scored against the label file: one segmentation, whatever
  the channels say (here they disagree, as an undertrained model's do), with test-time
  augmentation (eval_test_tta/) or without (--no-tta, eval_test/), post-processed or not (a
  postprocessing.json in the workdir, whose every rule changes these masks)."""
  channels = _leaning_channels if tta else _disagreeing_channels
  monkeypatch.setattr(inference.SlicePredictor, "__call__",
                      lambda self, slices, modality_id: channels(slices, modality_id))
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["segan"], workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["eval"]["nesting"] = nesting
  (workdir / "config.json").write_text(json.dumps(config))
  flag = "--tta" if tta else "--no-tta"
  folder = workdir / ("eval_test_tta" if tta else "eval_test")
  if postprocessing:
    rule = postprocess.Rule((20, 10, 5), 150)
    postprocess.write(workdir / postprocess.FILE_NAME, {
        "format": postprocess.FORMAT, "step": 2, "cases": 1,
        "modalities": {m: {"rule": rule.to_json()} for m in MODALITIES}})
    code, _, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--data", synth_data,
                           "--split", "test", flag, "--no-postprocessing")
    assert code == 0, err
    unprocessed = (folder / "metrics.csv").read_text()
  code, out, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--data", synth_data,
                           "--split", "test", flag)
  assert code == 0, err
  assert ("post-processing (" in out) == postprocessing
  if postprocessing:  # the rules change what is scored
    assert (folder / "metrics.csv").read_text() != unprocessed
  assert json.loads((folder / "summary.json").read_text())["tta"] is tta
  assert not (workdir / ("eval_test" if tta else "eval_test_tta")).exists()
  with (folder / "metrics.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert rows
  cases = {c.case_id: c for c in readers.find_cases(synth_data)}
  for row in rows:
    case = cases[row["case"]]
    output = tmp_path / f"{row['case']}_{row['modality']}.nii.gz"
    _predict(capsys, workdir, case.images[row["modality"]], output, flag,
             modality=row["modality"])
    written = nib.as_closest_canonical(nib.load(output))
    predicted = readers.labels_to_regions(np.asanyarray(written.dataobj), convention="brats")
    truth = readers.labels_to_regions(
        np.asanyarray(nib.as_closest_canonical(nib.load(case.label)).dataobj),
        convention=case.label_convention)
    scores = evaluate.score_case(predicted, truth, spacing=written.header.get_zooms()[:3])
    for key, value in scores.items():
      assert float(row[key]) == pytest.approx(value, rel=1e-9, abs=1e-12), (row["case"],
                                                                           row["modality"], key)


def test_checkpoint_chooses_the_step_and_a_missing_one_is_one_line(capsys, workdirs, case_dir,
                                                                 tmp_path):
  """``--checkpoint latest|best|STEP``: a kept step segments with its own weights; a step not
  kept, a best checkpoint never kept and a word that is neither are each one line."""
  workdir = workdirs["segan"]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 2
  out = _predict(capsys, workdir, case_dir, tmp_path / "latest.nii.gz", "--checkpoint", "latest")
  assert "checkpoint step 2 (the newest)" in out
  out = _predict(capsys, workdir, case_dir, tmp_path / "step.nii.gz", "--checkpoint",
                 str(steps[-1]))
  assert "checkpoint step 2 (--checkpoint)" in out
  assert (tmp_path / "step.nii.gz").read_bytes() == (tmp_path / "latest.nii.gz").read_bytes()
  for checkpoint, needles in (("7", ("no checkpoint of step 7", "the kept steps are")),
                              ("best", ("no best checkpoint",)),
                              ("newest", ("--checkpoint newest", "a step number"))):
    code, _, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                           "--modality", "flair", "--output", tmp_path / "x.nii.gz",
                           "--checkpoint", checkpoint)
    assert_one_line_error(code, err, *needles)
  assert not (tmp_path / "x.nii.gz").exists()


# --- Test-time augmentation, probability maps, ensembles -----------------------------------------


def _segan_predictor(workdirs, checkpoint="latest"):
  config = config_lib.from_json_file(workdirs["segan"] / "config.json")
  state, _ = inference.load_state(config, workdirs["segan"], checkpoint=checkpoint)
  return config, inference.SlicePredictor(config, inference.segmentation_variables(state, config),
                                          batch_size=config.eval.batch_size)


def _single_pass_segmentation(predictor, image, *, modality, config):
  """`inference.segment_volume` as it was before test-time augmentation, from the predictor's
  one pass: the network's probabilities thresholded per slice, put back, nested."""
  (slices,), (has_brain,), window = inference.whole_brain_slices([image], config)
  probs = np.zeros(slices.shape + (3,), np.float32)
  probs[has_brain] = predictor(slices[has_brain], MODALITIES.index(modality))
  masks = preprocess.slices_to_volume(probs > 0.5, window, fill=False)
  return regions_lib.nest(masks, rule=config.eval.nesting)


def _canonical_flair(case_dir):
  return readers.load_case(readers.find_cases(case_dir)[0], modalities=("flair",),
                           with_label=False)


def test_tta_is_the_mean_of_the_four_mirrored_passes(workdirs, case_dir):
  config, predictor = _segan_predictor(workdirs)
  image = _canonical_flair(case_dir).images["flair"]
  (slices,), (has_brain,), _ = inference.whole_brain_slices([image], config)
  slices = slices[has_brain]
  assert slices.shape[0] % predictor.batch_size != 0  # the last batch is a padded one
  flair = MODALITIES.index("flair")
  # By hand: each mirroring (none, H, W, both) through the network, mirrored back, the mean.
  passes = [np.flip(predictor(np.flip(slices, axes), flair), axes)
            for axes in ((), (1,), (2,), (1, 2))]
  by_hand = (passes[0] + passes[1] + passes[2] + passes[3]) / np.float32(4)
  got = predictor.probabilities(slices, flair, tta=True)
  assert got.dtype == np.float32 and got.shape == slices.shape + (3,)
  np.testing.assert_allclose(got, by_hand, rtol=1e-6, atol=1e-7)
  assert not np.allclose(got, passes[0], atol=1e-4)  # the mirrorings do change the answer
  np.testing.assert_array_equal(predictor.probabilities(slices, flair), passes[0])
  # On a volume: the mirrored mean on the brain slices, thresholded and nested.
  volume = inference.segment_probabilities(predictor, image, modality="flair", config=config,
                                           tta=True)
  assert volume.dtype == np.float32 and volume.shape == image.shape + (3,)
  np.testing.assert_array_equal(inference.segment_volume(predictor, image, modality="flair",
                                                         config=config, tta=True),
                                inference.to_regions(volume, config=config))


def test_no_tta_writes_the_single_pass_segmentation(capsys, workdirs, case_dir, tmp_path):
  """--no-tta is the segmentation of before test-time augmentation, voxel for voxel; the default
  (TTA) is the mirrored one."""
  config, predictor = _segan_predictor(workdirs)
  volume = _canonical_flair(case_dir)
  single = _single_pass_segmentation(predictor, volume.images["flair"], modality="flair",
                                     config=config)
  out = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "plain.nii.gz", "--no-tta")
  assert "test-time augmentation" not in out
  np.testing.assert_array_equal(
      _data(tmp_path / "plain.nii.gz"),
      volume.to_source_orientation(readers.regions_to_labels(single, convention="brats")))
  out = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "tta.nii.gz")
  assert "test-time augmentation: the mean over the 4 in-plane mirrorings" in out
  mirrored = inference.segment_volume(predictor, volume.images["flair"], modality="flair",
                                      config=config, tta=True)
  np.testing.assert_array_equal(
      _data(tmp_path / "tta.nii.gz"),
      volume.to_source_orientation(readers.regions_to_labels(mirrored, convention="brats")))


def test_saved_probabilities_threshold_to_the_label_map(capsys, workdirs, case_dir, tmp_path):
  """--save-probabilities: float32 X x Y x Z x 3 (WT, TC, ET) beside the label file, on the
  input's grid and affine; thresholded at 0.5 and nested they are the label map's regions."""
  source = _reoriented_flair(case_dir, tmp_path / "sal_flair.nii.gz")
  output = tmp_path / "out" / "seg.nii"
  out = _predict(capsys, workdirs["segan"], source, output, "--save-probabilities")
  saved = tmp_path / "out" / "seg_probabilities.nii.gz"
  assert f"writing {saved}" in out
  assert sorted(p.name for p in output.parent.iterdir()) == ["seg.nii", saved.name]
  assert saved.read_bytes()[:2] == b"\x1f\x8b"  # gzip-compressed
  image, ref = nib.load(saved), nib.load(source)
  assert image.shape == ref.shape + (3,) and image.get_data_dtype() == np.float32
  np.testing.assert_array_equal(image.affine, ref.affine)
  assert int(image.get_qform(coded=True)[1]) == int(ref.get_qform(coded=True)[1])
  assert int(image.get_sform(coded=True)[1]) == int(ref.get_sform(coded=True)[1])
  assert b"WT, TC, ET" in image.header["descrip"].tobytes()
  assert image.header["intent_name"].tobytes().rstrip(b"\0") == b"WT,TC,ET"
  probabilities = np.asanyarray(image.dataobj)
  assert probabilities.dtype == np.float32 and 0 <= probabilities.min() <= probabilities.max() <= 1
  config = config_lib.from_json_file(workdirs["segan"] / "config.json")
  labels = readers.regions_to_labels(inference.to_regions(probabilities, config=config),
                                     convention="brats")
  np.testing.assert_array_equal(labels, _data(output))
  assert np.any(labels)
  # The data folder: <case_id>_probabilities.nii.gz beside each <case_id>.nii.gz.
  folder = tmp_path / "folder"
  predict.predict(case_dir.parent, folder, modality="t2", workdir=workdirs["segan"],
                  save_probabilities=True, tta=True, log=lambda _: None)
  names = sorted(p.name for p in folder.iterdir())
  case_ids = sorted(p.name for p in case_dir.parent.iterdir() if p.is_dir())
  assert names == sorted([f"{c}.nii.gz" for c in case_ids]
                         + [f"{c}_probabilities.nii.gz" for c in case_ids])


def test_an_ensemble_of_one_workdir_twice_equals_the_workdir_alone(capsys, workdirs, case_dir,
                                                                   tmp_path):
  _predict(capsys, workdirs["segan"], case_dir, tmp_path / "alone.nii.gz",
           "--save-probabilities")
  out = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "twice.nii.gz",
                 "--workdir", workdirs["segan"], "--save-probabilities")
  assert "loading 2 models" in out and "an ensemble of 2 models" in out
  assert "nested by the first's eval.nesting inner_wins" in out
  for name in ("alone", "twice"):
    assert (tmp_path / f"{name}.nii.gz").is_file()
  assert (tmp_path / "twice.nii.gz").read_bytes() == (tmp_path / "alone.nii.gz").read_bytes()
  assert ((tmp_path / "twice_probabilities.nii.gz").read_bytes()
          == (tmp_path / "alone_probabilities.nii.gz").read_bytes())


def test_an_ensemble_of_two_checkpoints_thresholds_their_mean(capsys, workdirs, case_dir,
                                                              tmp_path):
  """One workdir, --checkpoint 1 --checkpoint 2: the mean of the two models' (mirrored)
  probabilities, thresholded once and nested; each model alone differs."""
  volume = _canonical_flair(case_dir)
  image = volume.images["flair"]
  segmentors = [predict.load_segmentor(workdirs["segan"], checkpoint=c) for c in ("1", "2")]
  probabilities = [s.probabilities(image, modality="flair", spacing=volume.spacing, tta=True)
                   for s in segmentors]
  mean = (probabilities[0] + probabilities[1]) / np.float32(2)
  expected = readers.regions_to_labels(
      inference.to_regions(mean, config=segmentors[0].config), convention="brats")
  out = _predict(capsys, workdirs["segan"], case_dir, tmp_path / "ensemble.nii.gz",
                 "--checkpoint", "1", "--checkpoint", "2", "--save-probabilities")
  assert "segan step 1 of" in out and "segan step 2 of" in out
  np.testing.assert_array_equal(_data(tmp_path / "ensemble.nii.gz"),
                                volume.to_source_orientation(expected))
  np.testing.assert_allclose(
      np.asanyarray(nib.load(tmp_path / "ensemble_probabilities.nii.gz").dataobj),
      volume.to_source_orientation(mean), rtol=0, atol=1e-7)
  assert not np.array_equal(probabilities[0], probabilities[1])
  # Two workdirs paired with two checkpoints are the same models.
  _predict(capsys, workdirs["segan"], case_dir, tmp_path / "paired.nii.gz", "--workdir",
           workdirs["segan"], "--checkpoint", "1", "--checkpoint", "2")
  assert ((tmp_path / "paired.nii.gz").read_bytes()
          == (tmp_path / "ensemble.nii.gz").read_bytes())


def test_bad_ensembles_are_one_line(capsys, workdirs, case_dir, tmp_path):
  output = tmp_path / "seg.nii.gz"

  def run(*extra, modality="flair"):
    return run_cli(capsys, "predict", "--workdir", workdirs["segan"], "--input", case_dir,
                   "--modality", modality, "--output", output, *extra)

  code, _, err = run("--workdir", workdirs["segan"], "--checkpoint", "1", "--checkpoint", "2",
                     "--checkpoint", "latest")
  assert_one_line_error(code, err, "2 --workdir and 3 --checkpoint", "paired in order")
  code, _, err = run("--checkpoint", "1", "--checkpoint", "sometime")
  assert_one_line_error(code, err, "--checkpoint sometime")
  # A model that never trained on the modality is named, before any checkpoint is read.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(inference, "load_state", lambda *a, **k: pytest.fail("a checkpoint was read"))
    code, _, err = run("--workdir", workdirs["unet"])
  assert_one_line_error(code, err, "--modality flair", f"the model in {workdirs['unet']}",
                        "trained on t1, t2 only")
  code, _, err = run("--workdir", workdirs["stargan"])
  assert_one_line_error(code, err, workdirs["stargan"], "stargan does not segment")
  assert not output.exists()
  # Models of other configs: each at its own (unet: t1 and t2 only, random weights).
  _predict(capsys, workdirs["segan"], case_dir, output, "--workdir", workdirs["unet"],
           modality="t2")
  _assert_same_grid(output, case_dir / f"{case_dir.name}_t2.nii.gz")


def test_validation_never_mirrors(workdirs, synth_data, monkeypatch):
  """Validation during training segments one pass per slice, as before TTA existed."""
  from uagan_jax import validation  # pylint: disable=g-import-not-at-top
  config = config_lib.from_json_file(workdirs["segan"] / "config.json")
  state, _ = inference.load_state(config, workdirs["segan"])
  seen = []
  original = inference.SlicePredictor.probabilities

  def spy(self, slices, modality_id, *, tta=False):
    seen.append(tta)
    return original(self, slices, modality_id, tta=tta)

  monkeypatch.setattr(inference.SlicePredictor, "probabilities", spy)
  case = readers.find_cases(synth_data)[0]
  row = validation.Validator(config, [case])(state)
  assert seen and not any(seen)
  _, predictor = _segan_predictor(workdirs)
  volume = readers.load_case(case, modalities=MODALITIES, with_label=True)
  truth = evaluate.truth_regions(volume, case)
  for modality in MODALITIES:
    single = _single_pass_segmentation(predictor, volume.images[modality], modality=modality,
                                       config=config)
    dice = evaluate.dice_per_region(single, truth)
    assert row[f"dice/{modality}/WT"] == pytest.approx(float(dice[0]), abs=0)
