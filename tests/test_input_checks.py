"""The skull-strip check (`uagan_jax.data.checks`): stripped volumes pass, others warn in one line,
once per file, in prepare, train (new and reused cache cases), evaluate, predict and translate."""

import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from uagan_jax.data import MODALITIES, checks, input_pipeline, readers, synthetic

from conftest import (REAL_CASE, SYNTH_SHAPE, TEST_CONFIG, load_test_config, run_cli,
                      write_random_workdir)


def not_stripped(image, *, seed=0, noise=0.02):
  """``image`` as a scan that was not skull-stripped: a bright scalp shell three voxels thick
  around the non-zero voxels and Rician background noise (sigma ``noise`` times the median
  non-zero intensity) everywhere else, rounded as the scanner's integers would be."""
  rng = np.random.default_rng(seed)
  head = image != 0
  median = float(np.median(image[head]))
  scalp = ndimage.binary_dilation(head, iterations=3) & ~head
  sigma = noise * median
  background = np.hypot(rng.normal(0.0, sigma, image.shape), rng.normal(0.0, sigma, image.shape))
  out = np.where(head, image, np.rint(background)).astype(np.float32)
  out[scalp] = 1.5 * median
  return out


def _lines(out, needle="warning:"):
  return [line for line in out.splitlines() if needle in line]


# ------------------------------------------------------------------------------------------------
# The function
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, cases", [(SYNTH_SHAPE, 3), ((96, 96, 64), 2),
                                          ((240, 240, 155), 1)])
def test_phantoms_pass_and_warn_once_not_stripped(shape, cases):
  for case_index in range(cases):
    images, _ = synthetic.make_phantom(seed=0, case_index=case_index, shape=shape)
    for modality, image in images.items():
      assert checks.skull_strip_warning(image, path=f"{modality}.nii.gz") is None, modality
      warning = checks.skull_strip_warning(not_stripped(image, seed=case_index),
                                           path=f"/data/{modality}.nii.gz")
      assert warning is not None and warning.startswith(f"/data/{modality}.nii.gz: ")
      assert "\n" not in warning
      for needle in ("does not look skull-stripped", "of the voxels non-zero",
                     "of the border non-zero", "HD-BET", "SynthStrip"):
        assert needle in warning


def test_what_was_seen_is_in_the_warning():
  image = np.zeros((40, 40, 40), np.float32)
  image[5:35, 5:35, 5:35] = 3.0  # 42% non-zero, none at the border: stripped
  assert checks.skull_strip_warning(image, path="a.nii") is None
  seen = checks.occupancy(image)
  assert seen.nonzero == pytest.approx(30**3 / 40**3) and seen.border_nonzero == 0.0
  image += 1.0  # every voxel non-zero
  seen = checks.occupancy(image)
  assert seen == checks.Occupancy(nonzero=1.0, border_nonzero=1.0)
  assert "(100% of the voxels non-zero, 100% of the border non-zero)" in (
      checks.skull_strip_warning(image, path="a.nii"))


@pytest.mark.skipif(not REAL_CASE.is_dir(), reason="the real UPENN-GBM case is not present")
def test_the_real_skull_stripped_case_passes_even_cropped_to_its_brain():
  case = readers.find_cases(REAL_CASE)[0]
  volume = readers.load_case(case, with_label=False)
  for modality, image in volume.images.items():
    assert checks.skull_strip_warning(image, path=case.images[modality]) is None, modality
    xs, ys, zs = (np.flatnonzero(np.any(image != 0, axis=axes)) for axes in
                  ((1, 2), (0, 2), (0, 1)))
    brain_box = image[xs[0]:xs[-1] + 1, ys[0]:ys[-1] + 1, zs[0]:zs[-1] + 1]
    assert checks.skull_strip_warning(brain_box, path=case.images[modality]) is None, modality
    warning = checks.skull_strip_warning(not_stripped(image), path=case.images[modality])
    assert warning is not None and warning.startswith(f"{case.images[modality]}: ")


def _with_nonzero(shape, count, where):
  """A zero volume of ``shape`` with ``count`` voxels set to 1, taken in order from ``where``
  (a boolean mask of candidate voxels)."""
  flat = np.zeros(int(np.prod(shape)), np.float32)
  flat[np.flatnonzero(where.ravel())[:count]] = 1.0
  return flat.reshape(shape)


def _smallest_count_at(threshold, size):
  """The least number of voxels out of ``size`` whose fraction is at least ``threshold``."""
  count = math.ceil(threshold * size)
  while count > 0 and (count - 1) / size >= threshold:
    count -= 1
  while count / size < threshold:
    count += 1
  return count


def test_thresholds_at_the_boundary():
  # 80^3: the inside (3 layers off every face) holds 79% of the voxels, more than the overall
  # threshold, so each threshold can be crossed with the other criterion far below its own.
  shape = (80, 80, 80)
  k = checks.BORDER_LAYERS
  inside = np.zeros(shape, bool)
  inside[k:-k, k:-k, k:-k] = True
  assert inside.mean() > checks.NONZERO_THRESHOLD
  border = ~inside

  at = _smallest_count_at(checks.BORDER_NONZERO_THRESHOLD, int(border.sum()))
  below = checks.occupancy(_with_nonzero(shape, at - 1, border))
  assert below.border_nonzero < checks.BORDER_NONZERO_THRESHOLD and below.looks_skull_stripped()
  assert checks.skull_strip_warning(_with_nonzero(shape, at - 1, border), path="x") is None
  reached = checks.occupancy(_with_nonzero(shape, at, border))
  assert reached.border_nonzero >= checks.BORDER_NONZERO_THRESHOLD
  assert reached.nonzero < checks.NONZERO_THRESHOLD  # the border alone warns
  assert checks.skull_strip_warning(_with_nonzero(shape, at, border), path="x") is not None

  at = _smallest_count_at(checks.NONZERO_THRESHOLD, inside.size)
  assert checks.skull_strip_warning(_with_nonzero(shape, at - 1, inside), path="x") is None
  reached = checks.occupancy(_with_nonzero(shape, at, inside))
  assert reached.nonzero >= checks.NONZERO_THRESHOLD and reached.border_nonzero == 0.0
  assert checks.skull_strip_warning(_with_nonzero(shape, at, inside), path="x") is not None


def test_a_thin_axis_has_no_border_faces():
  images, _ = synthetic.make_phantom(seed=0, case_index=0, shape=(96, 96, 64))
  one_slice = images["flair"][:, :, 32:33]  # a stripped slice: nearly half of it brain
  seen = checks.occupancy(one_slice)
  assert seen.border_nonzero == 0.0 and seen.nonzero > checks.BORDER_NONZERO_THRESHOLD
  assert checks.skull_strip_warning(one_slice, path="x") is None
  assert checks.occupancy(np.ones((4, 4, 4))) == checks.Occupancy(nonzero=1.0, border_nonzero=0.0)
  assert checks.occupancy(np.zeros((0, 3))) == checks.Occupancy(0.0, 0.0)


def test_an_msd_image_is_named_with_its_channel(tmp_path):
  case = readers.CaseFiles(case_id="BRATS_001", layout="msd",
                           images={m: tmp_path / "BRATS_001.nii.gz" for m in MODALITIES},
                           label=None, channels={m: i for i, m in enumerate(MODALITIES)})
  assert checks.image_name(case, "flair") == f"{tmp_path / 'BRATS_001.nii.gz'} (channel 3, flair)"
  folder_case = readers.CaseFiles(case_id="c", layout="brats2021",
                                  images={"t1": tmp_path / "c_t1.nii.gz"}, label=None)
  assert checks.image_name(folder_case, "t1") == str(tmp_path / "c_t1.nii.gz")


# ------------------------------------------------------------------------------------------------
# The commands: one warning line per file that is not skull-stripped
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unstripped_data(synth_data, tmp_path_factory):
  """A copy of the synthetic data whose one test-split case (of configs/test.py's split) has a
  FLAIR that is not skull-stripped: (data folder, that case's id, the FLAIR file)."""
  data = tmp_path_factory.mktemp("unstripped") / "data"
  shutil.copytree(synth_data, data)
  split = input_pipeline.find_training_data(load_test_config(), data).splits
  case = readers.find_cases(data)[[c.case_id for c in readers.find_cases(data)].index(
      split["test"][0])]
  flair = case.images["flair"]
  original = nib.load(flair)
  image = not_stripped(np.asanyarray(original.dataobj))
  nib.save(nib.Nifti1Image(image, original.affine, original.header), flair)
  return data, case.case_id, flair


def _assert_one_warning(out, flair):
  warnings = _lines(out)
  assert len(warnings) == 1, out
  assert f"warning: {flair}: does not look skull-stripped" in warnings[0]
  assert "SynthStrip" in warnings[0]


@pytest.fixture(scope="module")
def trained(unstripped_data, tmp_path_factory):
  """``uagan-jax prepare`` (2 workers) then ``train`` on the prepared cache: their outputs."""
  data, _, _ = unstripped_data
  root = tmp_path_factory.mktemp("trained")
  outputs = {}
  cli = _Cli()
  outputs["prepare"] = cli.run("prepare", "--data", data, "--out", root / "cache",
                                  "--workers", "2")
  outputs["prepare again"] = cli.run("prepare", "--data", data, "--out", root / "cache")
  outputs["train"] = cli.run("train", "--config", TEST_CONFIG,
                                "--data", data, "--cache", root / "cache", "--workdir",
                                root / "work", "--config.train.steps=1", "--no-eval")
  return root / "work", outputs


class _Cli:
  """Runs the command line in-process with stdout captured (module-scoped fixtures cannot use
  capsys): the output of a run that exited 0."""

  def run(self, *argv):
    # pylint: disable=g-import-not-at-top
    import contextlib
    import io
    from uagan_jax import cli
    # pylint: enable=g-import-not-at-top
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = cli.main([str(a) for a in argv])
    assert code == 0, err.getvalue()
    return out.getvalue()


def test_prepare_warns_once_from_its_workers_and_again_when_it_reuses_the_case(unstripped_data,
                                                                             trained):
  _, _, flair = unstripped_data
  _, outputs = trained
  assert "with 2 workers" in outputs["prepare"]
  _assert_one_warning(outputs["prepare"], flair)
  assert "all 8 cases prepared and up to date" in outputs["prepare again"]
  _assert_one_warning(outputs["prepare again"], flair)


def test_train_on_a_reused_cache_warns_once(unstripped_data, trained):
  _, _, flair = unstripped_data
  _, outputs = trained
  assert "all 8 cases prepared and up to date" in outputs["train"]
  _assert_one_warning(outputs["train"], flair)


def test_train_preparing_its_own_cache_warns_once(unstripped_data, tmp_path, capsys):
  """Once over the training and its final evaluation, which reads the file again."""
  data, case_id, flair = unstripped_data
  code, out, err = run_cli(capsys, "train", "--config", TEST_CONFIG,
                           "--data", data, "--cache", tmp_path / "cache", "--workdir",
                           tmp_path / "work", "--config.train.steps=1")
  assert code == 0, err
  assert "preparing 8 of 8 cases" in out
  assert f"({case_id})" in out  # the final evaluation read the case
  _assert_one_warning(out, flair)


def test_evaluate_warns_once(unstripped_data, trained, capsys):
  data, case_id, flair = unstripped_data
  workdir, _ = trained
  code, out, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--data", data)
  assert code == 0, err
  assert f"({case_id})" in out  # the case was evaluated
  _assert_one_warning(out, flair)


def test_predict_warns_once_for_that_file_only(unstripped_data, trained, tmp_path, capsys):
  data, _, flair = unstripped_data
  workdir, _ = trained
  code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", data,
                           "--modality", "flair", "--output", tmp_path / "flair")
  assert code == 0, err
  assert "predicted 8/8 cases" in out
  _assert_one_warning(out, flair)
  code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", data,
                           "--modality", "t1", "--output", tmp_path / "t1")
  assert code == 0, err
  assert not _lines(out), out
  code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", flair,
                           "--modality", "flair", "--output", tmp_path / "one.nii.gz")
  assert code == 0, err
  _assert_one_warning(out, flair)


def test_translate_warns_once(unstripped_data, tmp_path, capsys):
  data, case_id, flair = unstripped_data
  workdir = write_random_workdir(tmp_path / "uagan", load_test_config(variant="uagan"))
  code, out, err = run_cli(capsys, "translate", "--workdir", workdir, "--input", flair,
                           "--source", "flair", "--target", "t1", "--output", tmp_path / "t1.nii")
  assert code == 0, err
  _assert_one_warning(out, flair)
  t2 = data / case_id / f"{case_id}_t2.nii.gz"
  code, out, err = run_cli(capsys, "translate", "--workdir", workdir, "--input", t2,
                           "--source", "t2", "--target", "t1", "--output", tmp_path / "t1b.nii")
  assert code == 0, err
  assert not _lines(out), out
