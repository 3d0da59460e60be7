"""A constant background other than 0 (`checks.constant_background`): a skull-stripped brain
z-scored with its background left at the volume's minimum, or offset by a constant, is read with
that background set to 0 (`readers.load_case`), said in one ``note:`` line per file, and gives
the networks the slices of the same scan with a 0 background; heads with skull and scalp are not
changed and still get the skull-strip warning."""

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest

from uagan_jax import evaluate, inference, volume_io
from uagan_jax.data import cache, checks, preprocess, readers, synthetic

from conftest import REAL_CASE, SYNTH_SHAPE, load_test_config, run_cli, write_random_workdir
from test_input_checks import not_stripped

CLIP = load_test_config().data.clip


def zscored(image, *, background=None):
  """``image`` (0 outside the brain) as another pipeline leaves it: z-scored over the brain, the
  background the constant ``background`` (default: the brain's minimum, so the volume's)."""
  brain = image != 0
  values = image[brain].astype(np.float64)
  out = ((image - values.mean()) / values.std()).astype(np.float32)
  low = out[brain].min() if background is None else np.float32(background)
  out[~brain] = low
  return out


def _phantom(modality="flair", shape=SYNTH_SHAPE, case_index=0):
  images, _ = synthetic.make_phantom(seed=0, case_index=case_index, shape=shape)
  return images[modality]


def _save_like(path, data, like):
  """Writes ``data`` (source voxel order) with ``like``'s affine and header, in data's dtype."""
  header = like.header.copy()
  header.set_data_dtype(data.dtype)
  header.set_slope_inter(1.0, 0.0)
  nib.save(nib.Nifti1Image(data, like.affine, header), path)


def _notes(out):
  return [line for line in out.splitlines() if "note:" in line]


def _warnings(out):
  return [line for line in out.splitlines() if "warning:" in line]


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [SYNTH_SHAPE, (96, 96, 64)])
def test_a_zscored_brain_with_its_background_at_the_minimum_is_recognised(shape):
  for modality in ("t1", "flair"):
    image = _phantom(modality, shape)
    brain = image != 0
    for background in (None, -6.2):
      z = zscored(image, background=background)
      value = checks.constant_background(z)
      assert value == float(z.min()) and value < 0
      zeroed, found = checks.zero_background(z)
      assert found == value
      # Every background voxel is 0, and no brain voxel above the minimum was touched.
      assert np.all(zeroed[~brain] == 0)
      kept = brain & (z != value)
      assert np.array_equal(zeroed[kept], z[kept])
      if background is not None:  # below the brain: the brain mask is exactly the original's
        assert np.array_equal(zeroed != 0, brain)
      # The skull-strip check sees a stripped brain; as it was, it would have warned.
      assert checks.skull_strip_warning(zeroed, path="x") is None
      assert checks.skull_strip_warning(z, path="x") is not None


def test_a_volume_offset_by_a_constant_is_recognised():
  image = _phantom("t2")
  offset = (image.astype(np.int32) + 100).astype(np.int16)
  assert checks.constant_background(offset) == 100.0
  zeroed, value = checks.zero_background(offset.astype(np.float32))
  assert value == 100.0
  assert np.array_equal(zeroed != 0, image != 0)
  np.testing.assert_allclose(preprocess.zscore_brain(zeroed, clip=CLIP),
                             preprocess.zscore_brain(image, clip=CLIP), atol=1e-6)
  # A positive background above 0 too, and a float one a few float32 steps apart.
  shifted = image.astype(np.float32) + np.float32(2.5)
  shifted[0, 0, 0] = np.nextafter(np.float32(2.5), np.float32(3))
  assert checks.constant_background(shifted) == 2.5
  assert np.array_equal(checks.zero_background(shifted)[0] != 0, image != 0)


def test_heads_with_skull_and_scalp_are_not_recognised_and_still_warned():
  for case_index, modality in enumerate(("t1", "flair", "t2")):
    head = not_stripped(_phantom(modality, (96, 96, 64), case_index), seed=case_index)
    for volume in (head, head + np.float32(100.0), head - np.float32(3.0)):
      assert checks.constant_background(volume) is None
      zeroed, value = checks.zero_background(volume)
      assert value is None and zeroed is volume  # untouched, not even copied
      assert "does not look skull-stripped" in checks.skull_strip_warning(volume, path="x")


def test_what_is_left_alone():
  image = _phantom("flair").astype(np.float32)
  # A background already 0: every skull-stripped scan and phantom.
  assert checks.constant_background(image) is None
  assert checks.zero_background(image)[0] is image
  # A z-scored brain whose background is 0: the minimum is inside the brain, not at the border.
  brain = image != 0
  inside_minimum = np.where(brain, zscored(image), 0).astype(np.float32)
  assert inside_minimum.min() < 0
  assert checks.constant_background(inside_minimum) is None
  # A border mostly, but not mostly enough, at the minimum.
  block = np.ones((40, 40, 40), np.float32)
  block[10:30, 10:30, 10:30] = 5.0
  assert checks.constant_background(block) == 1.0
  border = np.ones(block.shape, bool)
  border[3:-3, 3:-3, 3:-3] = False
  index = np.flatnonzero(border.ravel())
  need = math.ceil(checks.BACKGROUND_BORDER_FRACTION * index.size)  # border voxels at the minimum
  assert need - 1 < checks.BACKGROUND_BORDER_FRACTION * index.size <= need
  noisy = block.copy()
  noisy.ravel()[index[:index.size - need + 1]] = 2.0  # one short
  assert checks.constant_background(noisy) is None
  noisy.ravel()[index[0]] = 1.0
  assert checks.constant_background(noisy) == 1.0
  # No border faces (every axis at most 6 long), an empty volume, a constant volume.
  assert checks.constant_background(np.full((6, 6, 6), 3.0, np.float32)) is None
  assert checks.constant_background(np.zeros((0, 3, 3), np.float32)) is None
  assert checks.constant_background(np.full((8, 8, 8), 3.0, np.float32)) == 3.0


def test_the_note_is_one_line_naming_the_file():
  note = checks.background_note(-2.678584, path="/data/c/c_flair.nii.gz")
  assert note == ("/data/c/c_flair.nii.gz: background is a constant -2.679 (the volume's "
                  "minimum), not 0; treated as background (0)")


# ------------------------------------------------------------------------------------------------
# Reading: load_case, the one place every command reads through
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def altered_data(synth_data, tmp_path_factory):
  """A copy of the synthetic data with case 0's FLAIR z-scored (float32, its background the
  volume's minimum, half a unit below the brain's, so the brain is exactly the original's) and
  case 1's T1 offset by 100 (int16): (data folder, {(case id, modality): file})."""
  data = tmp_path_factory.mktemp("background") / "data"
  shutil.copytree(synth_data, data)
  cases = readers.find_cases(data)
  altered = {}
  below = lambda a: zscored(a, background=zscored(a)[a != 0].min() - 0.5)
  for case, modality, change in ((cases[0], "flair", below),
                                 (cases[1], "t1", lambda a: (a + 100).astype(np.int16))):
    path = case.images[modality]
    original = nib.load(path)
    _save_like(path, change(np.asanyarray(original.dataobj)), original)
    altered[(case.case_id, modality)] = path
  return data, altered


def test_load_case_sets_the_background_to_0_and_records_it(synth_data, altered_data):
  data, altered = altered_data
  originals = {c.case_id: c for c in readers.find_cases(synth_data)}
  for case in readers.find_cases(data):
    volume = readers.load_case(case, with_label=False)
    before = readers.load_case(originals[case.case_id], with_label=False)
    for modality, image in volume.images.items():
      lines = []
      checks.log_background_note(volume, case, modality, log=lines.append)
      if (case.case_id, modality) not in altered:
        assert np.array_equal(image, before.images[modality])  # bit for bit
        assert modality not in volume.backgrounds and not lines
        continue
      assert np.array_equal(image != 0, before.images[modality] != 0)
      np.testing.assert_allclose(preprocess.zscore_brain(image, clip=CLIP),
                                 preprocess.zscore_brain(before.images[modality], clip=CLIP),
                                 atol=1e-5)
      assert checks.skull_strip_warning(image, path="x") is None
      value = volume.backgrounds[modality]
      assert lines == [f"note: {altered[(case.case_id, modality)]}: background is a constant "
                       f"{value:.4g} (the volume's minimum), not 0; treated as background (0)"]


def test_prepare_applies_it_and_notes_each_file_once_also_when_reused(synth_data, altered_data,
                                                                      tmp_path):
  data, altered = altered_data
  lines = []
  cache.prepare(data, tmp_path / "cache", workers=1, log=lines.append)
  notes = [line for line in lines if line.startswith("note:")]
  assert len(notes) == len(altered) and not [l for l in lines if "warning" in l], lines
  for path in altered.values():
    assert sum(f"note: {path}: background is a constant" in line for line in notes) == 1
  reused = []
  cache.prepare(data, tmp_path / "cache", workers=1, log=reused.append)
  assert "all 8 cases prepared and up to date" in reused[-1]
  assert sorted(l for l in reused if l.startswith("note:")) == sorted(notes)

  cache.prepare(synth_data, tmp_path / "original", workers=1, log=lambda _: None)
  cases = {c.case_id: c for c in readers.find_cases(data)}
  originals = {c.case_id: c for c in readers.find_cases(synth_data)}
  for case_id, modality in altered:
    mine = cache.open_case(tmp_path / "cache", cases[case_id])
    theirs = cache.open_case(tmp_path / "original", originals[case_id])
    assert mine.meta["modalities"][modality]["background"] is not None
    assert theirs.meta["modalities"][modality]["background"] is None
    assert np.array_equal(mine.has_brain(modality), theirs.has_brain(modality))
    for z in np.flatnonzero(theirs.has_brain(modality)):
      np.testing.assert_allclose(mine.image_slice(modality, z, size=(32, 32), clip=CLIP),
                                 theirs.image_slice(modality, z, size=(32, 32), clip=CLIP),
                                 atol=1e-5)


def test_translate_notes_it_once_and_does_not_warn(altered_data, tmp_path, capsys):
  data, altered = altered_data
  (case_id, modality), path = next(iter(altered.items()))
  workdir = write_random_workdir(tmp_path / "uagan", load_test_config(variant="uagan"))
  code, out, err = run_cli(capsys, "translate", "--workdir", workdir, "--input", path,
                           "--source", modality, "--target", "t2", "--output",
                           tmp_path / "t2.nii")
  assert code == 0, err
  assert _notes(out) == [line for line in out.splitlines()
                         if f"note: {path}: background is a constant" in line]
  assert len(_notes(out)) == 1 and not _warnings(out), out


def test_predict_notes_it_once_and_segments_as_the_original(synth_data, tmp_path, capsys):
  case = readers.find_cases(synth_data)[0]
  original = nib.load(case.images["flair"])
  moved = tmp_path / "zscored_flair.nii.gz"
  # The background below the brain's minimum: the brain is exactly the original's.
  _save_like(moved, zscored(np.asanyarray(original.dataobj), background=-6.2), original)
  # Seeded random unet weights that segment part of this phantom (4127 voxels of label 4): the
  # labels depend on the input.
  workdir = write_random_workdir(tmp_path / "unet", load_test_config(variant="unet"), seed=2)
  outputs = {}
  for name, path in (("original", case.images["flair"]), ("zscored", moved)):
    code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", path,
                             "--modality", "flair", "--output", tmp_path / f"{name}.nii.gz")
    assert code == 0, err
    assert not _warnings(out), out
    assert len(_notes(out)) == (name == "zscored"), out
    outputs[name] = np.asanyarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj)
  assert 0 < np.count_nonzero(outputs["original"]) < np.count_nonzero(original.dataobj)
  assert np.array_equal(outputs["zscored"], outputs["original"])


def test_evaluate_notes_each_file_once_and_scores_as_the_original(synth_data, altered_data,
                                                                  tmp_path):
  data, altered = altered_data
  workdir = write_random_workdir(tmp_path / "unet", load_test_config(variant="unet"), seed=2)
  (workdir / "splits.json").write_text(json.dumps({"data": str(tmp_path / "elsewhere"),
                                                   "train": [], "val": [], "test": []}))
  config = load_test_config(variant="unet")
  with config.unlocked():
    config.eval.panels = 0
  ids = sorted({case_id for case_id, _ in altered})
  results = {}
  for name, folder in (("original", synth_data), ("altered", data)):
    subset = tmp_path / name
    for case_id in ids:
      shutil.copytree(folder / case_id, subset / case_id)
    lines = []
    results[name] = evaluate.evaluate_split(config, workdir=workdir, data_dir=subset,
                                            split="all", curves=False, log=lines.append)
    assert not [line for line in lines if "warning:" in line], lines
    notes = [line for line in lines if line.startswith("note:")]
    if name == "original":
      assert not notes
    else:
      assert len(notes) == len(altered), lines
      for (case_id, modality), path in altered.items():
        assert sum(line.startswith(f"note: {subset / case_id / path.name}: background is a "
                                   "constant") for line in notes) == 1
  assert results["altered"]["rows"] == results["original"]["rows"]


# ------------------------------------------------------------------------------------------------
# The real UPENN-GBM case
# ------------------------------------------------------------------------------------------------

real = pytest.mark.skipif(not REAL_CASE.is_dir(), reason="the real UPENN-GBM case is not present")


@real
def test_the_real_case_as_it_is_is_unchanged():
  case = readers.find_cases(REAL_CASE)[0]
  volume = readers.load_case(case, with_label=False)
  assert volume.backgrounds == {}
  for modality, image in volume.images.items():
    raw = nib.as_closest_canonical(nib.load(case.images[modality]))
    assert np.array_equal(image, np.asanyarray(raw.dataobj).astype(np.float32)), modality
    lines = []
    checks.log_background_note(volume, case, modality, log=lines.append)
    assert not lines
    assert checks.skull_strip_warning(image, path="x") is None


@real
@pytest.mark.parametrize("background", [None, -6.2])
def test_the_real_flair_zscored_gives_the_network_the_same_slices(background, tmp_path):
  case = readers.find_cases(REAL_CASE)[0]
  original = nib.load(case.images["flair"])
  path = tmp_path / "UPENN-GBM-00003_11_FLAIR.nii.gz"
  data = np.asanyarray(original.dataobj)
  _save_like(path, zscored(data, background=background), original)
  zscored_case = volume_io.case_of_file(path, modality="flair")
  lines = []
  volume, _ = volume_io.load_brain_image(zscored_case, "flair", verb="segment",
                                         log=lambda _: None)
  checks.log_background_note(volume, zscored_case, "flair", log=lines.append)
  assert len(lines) == 1 and lines[0].startswith(f"note: {path}: background is a constant ")
  assert checks.skull_strip_warning(volume.images["flair"], path=path) is None
  before = readers.load_case(case, modalities=("flair",), with_label=False)
  config = load_test_config()
  with config.unlocked():
    config.data.image_size = (240, 240)
  (mine,), (mine_brain,), window = inference.whole_brain_slices([volume.images["flair"]], config)
  (theirs,), (theirs_brain,), their_window = inference.whole_brain_slices(
      [before.images["flair"]], config)
  assert window == their_window and np.array_equal(mine_brain, theirs_brain)
  if background is not None:  # below the brain: the same input to float rounding
    np.testing.assert_allclose(mine, theirs, atol=1e-5)
  else:
    # At the brain's own minimum, its 59 darkest voxels (of 1.6 million) become background
    # with it; every other voxel is the same to 5e-4 (the statistics without those 59).
    dropped = (mine == 0) & (theirs != 0)
    assert dropped.sum() == 59
    np.testing.assert_allclose(mine[~dropped], theirs[~dropped], atol=5e-4)
