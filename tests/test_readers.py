"""Tests for uagan_jax.data.readers on tiny NIfTI fixtures of all four layouts and one real case."""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from uagan_jax.data import MODALITIES
from uagan_jax.data import preprocess
from uagan_jax.data import readers
from uagan_jax.errors import UserError

SHAPE = (12, 10, 6)
# 1 x 1 x 2 mm voxels; RAS, LPS (the BraTS/UPENN convention) and a permuted oblique-free grid.
RAS = np.array([[1.0, 0, 0, -6], [0, 1, 0, -5], [0, 0, 2, -6], [0, 0, 0, 1]])
LPS = np.array([[-1.0, 0, 0, 6], [0, -1, 0, 5], [0, 0, 2, -6], [0, 0, 0, 1]])
# Voxel axes (i, j, k) point along (S, R, P): every axis moves and one flips.
PERMUTED = np.array([[0, 1.0, 0, -5], [0, 0, -1, 3], [2.0, 0, 0, -12], [0, 0, 0, 1]])

# Per layout: separator, modality -> suffix, label suffix.
FOLDER_NAMES = {
    "brats2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "seg"),
    "brats2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, "seg"),
    "upenn": ("_", {"t1": "T1", "t1ce": "T1GD", "t2": "T2", "flair": "FLAIR"}, "segm"),
}
# Raw label values of (necrotic/non-enhancing core, oedema, enhancing) per convention.
LABEL_VALUES = {"brats": (1, 2, 4), "brats2023": (1, 2, 3), "msd": (2, 1, 3)}
# Voxels written per tissue by make_label: core 6, oedema 8, enhancing 5.
EXPECTED_REGION_COUNTS = {"WT": 19, "TC": 11, "ET": 5}

REAL_CASE = (pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
             / "upenn_gbm_00003_11")


def make_label(convention: str) -> np.ndarray:
  """A label volume with tumour in slices 1-3 only."""
  core, oedema, enhancing = LABEL_VALUES[convention]
  label = np.zeros(SHAPE, np.uint8)
  label[1:4, 1:3, 1] = core  # 6 voxels
  label[5:7, 0:4, 2] = oedema  # 8 voxels
  label[8, 0:5, 3] = enhancing  # 5 voxels
  return label


def make_image(modality: str, seed: int = 0) -> np.ndarray:
  """Positive intensities around 10 * (modality id + 1); zero border and an empty slice 5."""
  rng = np.random.default_rng([seed, MODALITIES.index(modality)])
  image = (10.0 * (MODALITIES.index(modality) + 1) + rng.random(SHAPE)).astype(np.float32)
  image[0] = image[-1] = 0
  image[:, :, 5] = 0
  return image


def save(path: pathlib.Path, data: np.ndarray, affine: np.ndarray = RAS) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), path)
  return path


def write_folder_case(folder: pathlib.Path, layout: str, *, prefix: str | None = None,
                      affine: np.ndarray = RAS, with_label: bool = True, seed: int = 0,
                      ext: str = ".nii.gz") -> dict[str, pathlib.Path]:
  """Writes one case folder; returns role -> path."""
  separator, suffixes, label_suffix = FOLDER_NAMES[layout]
  prefix = prefix or folder.name
  paths = {}
  for modality, suffix in suffixes.items():
    paths[modality] = save(folder / f"{prefix}{separator}{suffix}{ext}",
                           make_image(modality, seed), affine)
  if with_label:
    paths["label"] = save(folder / f"{prefix}{separator}{label_suffix}{ext}",
                          make_label(readers.LAYOUT_CONVENTIONS[layout]), affine)
  return paths


MSD_ORDER = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_CANONICAL = {"FLAIR": "flair", "T1w": "t1", "t1gd": "t1ce", "T2w": "t2"}


def write_msd(root: pathlib.Path, *, affine: np.ndarray = PERMUTED) -> None:
  """An msd task folder: 2 training cases, 1 label-free test case, macOS junk files."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "dataset.json").write_text(json.dumps({"name": "BRATS", "modality": MSD_ORDER}))
  for name, folder, seed in (("BRATS_002", "imagesTr", 2), ("BRATS_001", "imagesTr", 1),
                             ("BRATS_010", "imagesTs", 10)):
    channels = [make_image(MSD_CANONICAL[MSD_ORDER[str(c)]], seed) for c in range(4)]
    save(root / folder / f"{name}.nii.gz", np.stack(channels, axis=-1), affine)
    if folder == "imagesTr":
      save(root / "labelsTr" / f"{name}.nii.gz", make_label("msd"), affine)
  for folder in ("imagesTr", "labelsTr"):
    (root / folder / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")


def write_dataset(root: pathlib.Path, layout: str) -> None:
  """Two cases of a layout under root (for msd, the task folder)."""
  if layout == "msd":
    write_msd(root)
    return
  for index, case in enumerate(("case_b", "case_a")):
    prefix = f"UPENN-GBM-0000{index}_11" if layout == "upenn" else None
    write_folder_case(root / case, layout, prefix=prefix, seed=index)


# ---------------------------------------------------------------------------------------------
# Detection and listing.


@pytest.mark.parametrize("layout", readers.LAYOUTS)
def test_detect_and_find_each_layout(tmp_path, layout):
  write_dataset(tmp_path / "data", layout)
  # Root-level files such as BraTS 2020's name_mapping.csv must not confuse detection.
  (tmp_path / "data" / "name_mapping.csv").write_text("a,b\n")
  assert readers.detect_layout(tmp_path / "data") == layout
  cases = readers.find_cases(tmp_path / "data")
  expected_ids = ["BRATS_001", "BRATS_002", "BRATS_010"] if layout == "msd" else [
      "case_a", "case_b"]
  assert [case.case_id for case in cases] == expected_ids
  for case in cases:
    assert case.layout == layout
    assert set(case.images) == set(MODALITIES)
    assert all(path.is_file() for path in case.images.values())
    assert case.label_convention == readers.LAYOUT_CONVENTIONS[layout]
  if layout == "msd":
    assert cases[0].channels == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    assert cases[0].label.name == "BRATS_001.nii.gz"
    assert cases[2].label is None  # imagesTs
  else:
    assert all(case.label is not None for case in cases)
    assert cases[0].channels is None


def test_upenn_matches_suffixes_not_folder_name(tmp_path):
  paths = write_folder_case(tmp_path / "upenn_gbm_00001_11", "upenn", prefix="UPENN-GBM-00001_11")
  (case,) = readers.find_cases(tmp_path)
  assert case.case_id == "upenn_gbm_00001_11"
  assert case.images["t1ce"] == paths["t1ce"]
  assert case.images["t1"] == paths["t1"]  # _T1 and _T1GD must not be confused
  assert case.label == paths["label"]


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "upenn"])
def test_single_case_folder(tmp_path, layout):
  write_folder_case(tmp_path / "only_case", layout, ext=".nii")
  assert readers.detect_layout(tmp_path / "only_case") == layout
  (case,) = readers.find_cases(tmp_path / "only_case")
  assert case.case_id == "only_case"
  assert case.images["flair"].name.endswith(".nii")


def test_label_is_optional(tmp_path):
  write_folder_case(tmp_path / "c1", "brats2021", with_label=False)
  (case,) = readers.find_cases(tmp_path)
  assert case.label is None
  volume = readers.load_case(case)
  assert volume.label is None
  assert set(volume.images) == set(MODALITIES)


# ---------------------------------------------------------------------------------------------
# Loading.


@pytest.mark.parametrize("layout", readers.LAYOUTS)
def test_load_case_maps_modalities_and_labels(tmp_path, layout):
  write_dataset(tmp_path / "data", layout)
  case = readers.find_cases(tmp_path / "data")[0]
  volume = readers.load_case(case)
  assert list(volume.images) == list(MODALITIES)
  for index, modality in enumerate(MODALITIES):
    image = volume.images[modality]
    assert image.dtype == np.float32
    assert image.shape == volume.shape
    # make_image puts modality m's brain intensities in [10 (m + 1), 10 (m + 1) + 1).
    brain = image[image != 0]
    assert 10 * (index + 1) <= brain.min() and brain.max() < 10 * (index + 1) + 1
  assert volume.label.dtype == np.uint8
  regions = readers.labels_to_regions(volume.label, convention=case.label_convention)
  assert dict(zip(("WT", "TC", "ET"), regions.sum(axis=(0, 1, 2)).tolist())) == (
      EXPECTED_REGION_COUNTS)
  assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")


def test_load_only_requested_modalities(tmp_path):
  write_folder_case(tmp_path / "c1", "brats2021")
  (case,) = readers.find_cases(tmp_path)
  # A corrupt t1 must not matter when only t2 is requested: t1 is never opened.
  case.images["t1"].write_bytes(b"not a nifti")
  volume = readers.load_case(case, modalities=("t2",), with_label=False)
  assert list(volume.images) == ["t2"]
  assert volume.label is None


def test_msd_single_channel_equals_full_load(tmp_path):
  write_msd(tmp_path / "Task01")
  case = readers.find_cases(tmp_path / "Task01")[0]
  full = readers.load_case(case)
  for modality in MODALITIES:
    one = readers.load_case(case, modalities=(modality,))
    np.testing.assert_array_equal(one.images[modality], full.images[modality])
    np.testing.assert_array_equal(one.label, full.label)
  two = readers.load_case(case, modalities=("t2", "flair"), with_label=False)
  assert list(two.images) == ["t2", "flair"]
  np.testing.assert_array_equal(two.images["flair"], full.images["flair"])


def test_lps_input_becomes_ras_and_round_trips(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021", affine=LPS)
  (case,) = readers.find_cases(tmp_path)
  volume = readers.load_case(case)
  raw_t1 = np.asanyarray(nib.load(paths["t1"]).dataobj)
  raw_label = np.asanyarray(nib.load(paths["label"]).dataobj)
  # LPS -> RAS flips the first two axes and keeps the voxel grid otherwise.
  np.testing.assert_array_equal(volume.images["t1"], raw_t1[::-1, ::-1, :])
  np.testing.assert_array_equal(volume.label, raw_label[::-1, ::-1, :])
  assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
  assert volume.spacing == (1.0, 1.0, 2.0)
  # The voxel-to-world mapping is unchanged: voxel (0,0,0) of RAS is voxel (11,9,0) of LPS.
  np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], LPS @ [11, 9, 0, 1])
  np.testing.assert_array_equal(volume.to_source_orientation(volume.images["t1"]), raw_t1)
  np.testing.assert_array_equal(volume.to_source_orientation(volume.label), raw_label)
  # Trailing axes (e.g. region channels) ride along.
  regions = readers.labels_to_regions(volume.label, convention="brats")
  np.testing.assert_array_equal(volume.to_source_orientation(regions),
                                readers.labels_to_regions(raw_label, convention="brats"))


def test_permuted_affine_matches_as_closest_canonical(tmp_path):
  write_msd(tmp_path / "Task01", affine=PERMUTED)
  case = readers.find_cases(tmp_path / "Task01")[0]
  volume = readers.load_case(case)
  reference = nib.as_closest_canonical(nib.load(case.label))
  np.testing.assert_array_equal(volume.label, np.asanyarray(reference.dataobj))
  np.testing.assert_allclose(volume.affine, reference.affine)
  assert volume.shape == (10, 6, 12)  # i along S, j along R, k along P -> (R, A, S) = (j, k, i)
  assert volume.spacing == (1.0, 1.0, 2.0)
  raw = np.asanyarray(nib.load(case.label).dataobj)
  np.testing.assert_array_equal(volume.to_source_orientation(volume.label), raw)
  # The 4D image's header yields a 3D label image on the source grid.
  written = volume.to_source_image(volume.label, dtype=np.uint8)
  assert written.shape == SHAPE
  np.testing.assert_array_equal(np.asanyarray(written.dataobj), raw)
  np.testing.assert_allclose(written.affine, PERMUTED)


def test_to_source_image_keeps_grid_and_header(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021", affine=LPS)
  source = nib.load(paths["t1"])
  source.header.set_qform(LPS, code=1)
  source.header.set_sform(LPS, code=0)  # qform only, as in the UPENN release
  nib.save(source, paths["t1"])
  (case,) = readers.find_cases(tmp_path)
  volume = readers.load_case(case)
  out_path = tmp_path / "prediction.nii.gz"
  nib.save(volume.to_source_image(volume.label, dtype=np.uint8), out_path)
  written = nib.load(out_path)
  assert written.shape == SHAPE
  assert written.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(written.affine, source.affine)
  assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 0
  np.testing.assert_array_equal(np.asanyarray(written.dataobj),
                                np.asanyarray(nib.load(paths["label"]).dataobj))


# ---------------------------------------------------------------------------------------------
# Label conventions.


@pytest.mark.parametrize("convention", ["brats", "brats2023", "msd"])
def test_labels_to_regions_counts_and_inverse(convention):
  label = make_label(convention)
  regions = readers.labels_to_regions(label, convention=convention)
  assert regions.dtype == bool and regions.shape == SHAPE + (3,)
  assert regions[..., 0].sum() == 19 and regions[..., 1].sum() == 11 and regions[..., 2].sum() == 5
  # Nested: ET within TC within WT.
  assert not (regions[..., 2] & ~regions[..., 1]).any()
  assert not (regions[..., 1] & ~regions[..., 0]).any()
  back = readers.regions_to_labels(regions, convention=convention)
  assert back.dtype == np.uint8
  np.testing.assert_array_equal(back, label)


def test_label_tables_by_hand():
  label = np.array([0, 1, 2, 3, 4])

  def wt_tc_et(convention):
    values = label if convention == "brats" else label[:4]
    return readers.labels_to_regions(values, convention=convention).astype(int).T.tolist()

  # brats: 1 NCR/NET, 2 ED, 4 ET (3 is not a brats label and belongs to no region).
  assert wt_tc_et("brats") == [[0, 1, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 0, 1]]
  assert wt_tc_et("brats2023") == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
  # msd: 1 oedema, 2 non-enhancing, 3 enhancing.
  assert wt_tc_et("msd") == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
  # Layout names resolve to their convention.
  np.testing.assert_array_equal(readers.labels_to_regions(label, convention="upenn"),
                                readers.labels_to_regions(label, convention="brats"))


def test_regions_to_labels_resolves_inconsistent_masks():
  # WT only; TC without WT; ET without TC; all three.
  regions = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], bool)
  assert readers.regions_to_labels(regions, convention="brats").tolist() == [2, 1, 4, 4, 0]
  assert readers.regions_to_labels(regions, convention="msd").tolist() == [1, 2, 3, 3, 0]
  with pytest.raises(ValueError, match="threshold"):
    readers.regions_to_labels(regions.astype(np.float32), convention="msd")
  with pytest.raises(ValueError, match="convention"):
    readers.labels_to_regions(regions, convention="nope")


# ---------------------------------------------------------------------------------------------
# Bad input: every problem is a one-line UserError naming the file.


def _error(function, *args, **kwargs) -> str:
  with pytest.raises(UserError) as info:
    function(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_missing_modality_file(tmp_path):
  paths = write_folder_case(tmp_path / "data" / "case_7", "brats2023")
  write_folder_case(tmp_path / "data" / "case_8", "brats2023")
  paths["t1ce"].unlink()
  message = _error(readers.find_cases, tmp_path / "data")
  assert str(tmp_path / "data" / "case_7") in message
  assert "t1ce" in message and "case_7-t1c.nii.gz" in message


def test_truncated_gzip(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021")
  data = paths["t2"].read_bytes()
  paths["t2"].write_bytes(data[: len(data) // 2])
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case)
  assert message.startswith(str(paths["t2"]))
  assert "truncated or corrupt" in message


@pytest.mark.parametrize("damage, expected", [
    ("truncated_nii", "2880 bytes of data but the file holds 2780 after vox_offset 352: truncated"),
    ("garbage_gz", "not gzip-compressed"),
    ("bad_deflate", "truncated or corrupt")])
def test_other_corrupt_files(tmp_path, damage, expected):
  ext = ".nii" if damage == "truncated_nii" else ".nii.gz"
  paths = write_folder_case(tmp_path / "c1", "brats2021", ext=ext)
  data = paths["flair"].read_bytes()
  if damage == "truncated_nii":
    paths["flair"].write_bytes(data[: len(data) - 100])
  elif damage == "garbage_gz":
    paths["flair"].write_bytes(b"this is not gzip data at all" * 20)
  else:
    # Overwrite the first deflate block header, just after the 10-byte gzip header: zlib.error.
    paths["flair"].write_bytes(data[:10] + b"\xff" * 16 + data[26:])
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case)
  assert message.startswith(str(paths["flair"]))
  assert expected in message


def test_image_label_shape_mismatch(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021")
  save(paths["label"], make_label("brats")[:, :, :5])
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case)
  assert message.startswith(str(paths["label"]))
  assert str(paths["t1"]) in message
  assert "(12, 10, 5)" in message and "(12, 10, 6)" in message


def test_modality_shape_mismatch(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "upenn")
  save(paths["flair"], make_image("flair")[:11])
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case, modalities=("t1", "flair"))
  assert message.startswith(str(paths["flair"])) and str(paths["t1"]) in message


def test_orientation_mismatch(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021")
  save(paths["label"], make_label("brats"), LPS)
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case)
  assert message.startswith(str(paths["label"])) and "LPS" in message and "RAS" in message


def test_nan_voxels(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021")
  image = make_image("t1ce")
  image[3, 3, 0:3] = np.nan
  image[4, 4, 4] = np.inf
  save(paths["t1ce"], image)
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case)
  assert message.startswith(str(paths["t1ce"])) and "4 NaN or infinite" in message


def test_unexpected_label_value(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021")
  label = make_label("brats")
  label[0, 0, 0] = 3  # a BraTS 2023 enhancing label in a 2021 case
  save(paths["label"], label)
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case)
  assert message.startswith(str(paths["label"]))
  assert "[3]" in message and "[0, 1, 2, 4]" in message


def test_wrong_dimensionality(tmp_path):
  paths = write_folder_case(tmp_path / "c1", "brats2021")
  save(paths["t2"], np.stack([make_image("t2")] * 2, axis=-1))
  (case,) = readers.find_cases(tmp_path)
  message = _error(readers.load_case, case)
  assert message.startswith(str(paths["t2"])) and "3D" in message

  write_msd(tmp_path / "Task01")
  msd_case = readers.find_cases(tmp_path / "Task01")[0]
  save(msd_case.images["t1"], make_image("t1"))  # 3D where a 4D file is expected
  message = _error(readers.load_case, msd_case)
  assert message.startswith(str(msd_case.images["t1"])) and "4D" in message


def test_empty_missing_and_unknown_folders(tmp_path):
  (tmp_path / "empty").mkdir()
  message = _error(readers.find_cases, tmp_path / "empty")
  assert str(tmp_path / "empty") in message and "empty" in message
  message = _error(readers.find_cases, tmp_path / "absent")
  assert str(tmp_path / "absent") in message
  unknown = tmp_path / "unknown"
  (unknown / "sub").mkdir(parents=True)
  (unknown / "notes.txt").write_text("hello")
  (unknown / "sub" / "scan_0001.nii.gz").write_bytes(b"x")
  message = _error(readers.detect_layout, unknown)
  assert str(unknown) in message and "unknown dataset layout" in message
  for layout in readers.LAYOUTS:
    assert layout in message
  assert "_t1ce" in message and "-t1n" in message and "_T1GD" in message


def test_stray_folder_and_mixed_layouts(tmp_path):
  write_folder_case(tmp_path / "data" / "case_a", "brats2021")
  (tmp_path / "data" / "notes").mkdir()
  (tmp_path / "data" / "notes" / "readme.txt").write_text("x")
  message = _error(readers.find_cases, tmp_path / "data")
  assert str(tmp_path / "data" / "notes") in message
  write_folder_case(tmp_path / "mixed" / "a", "brats2021")
  write_folder_case(tmp_path / "mixed" / "b", "brats2023")
  message = _error(readers.detect_layout, tmp_path / "mixed")
  assert "mix" in message


def test_msd_dataset_json_problems(tmp_path):
  write_msd(tmp_path / "Task01")
  (tmp_path / "Task01" / "dataset.json").unlink()
  message = _error(readers.find_cases, tmp_path / "Task01")
  assert str(tmp_path / "Task01" / "dataset.json") in message
  (tmp_path / "Task01" / "dataset.json").write_text(json.dumps(
      {"modality": {"0": "FLAIR", "1": "T1w", "2": "ADC", "3": "T2w"}}))
  message = _error(readers.find_cases, tmp_path / "Task01")
  assert "ADC" in message


def test_unknown_modality_request(tmp_path):
  write_folder_case(tmp_path / "c1", "brats2021")
  (case,) = readers.find_cases(tmp_path)
  assert "dwi" in _error(readers.load_case, case, modalities=("dwi",))


# ---------------------------------------------------------------------------------------------
# The real UPENN-GBM case.


@pytest.fixture(scope="module")
def real_volume():
  if not REAL_CASE.is_dir():
    pytest.skip(f"real case not present at {REAL_CASE} (only in the development checkout)")
  assert readers.detect_layout(REAL_CASE) == "upenn"
  (case,) = readers.find_cases(REAL_CASE)
  return case, readers.load_case(case)


def test_real_upenn_case(real_volume):
  case, volume = real_volume
  assert case.layout == "upenn" and case.label is not None
  assert list(volume.images) == list(MODALITIES)
  for image in volume.images.values():
    assert image.shape == (240, 240, 155) and image.dtype == np.float32
  assert volume.label.shape == (240, 240, 155)
  assert volume.spacing == (1.0, 1.0, 1.0)
  assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
  label = volume.label
  regions = readers.labels_to_regions(label, convention=case.label_convention)
  counts = regions.sum(axis=(0, 1, 2)).tolist()
  assert counts == [np.count_nonzero(label > 0),
                    np.count_nonzero(label == 1) + np.count_nonzero(label == 4),
                    np.count_nonzero(label == 4)]
  assert counts[2] > 0
  np.testing.assert_array_equal(readers.regions_to_labels(regions, convention="brats"), label)
  raw_label = np.asanyarray(nib.load(case.label).dataobj)
  np.testing.assert_array_equal(volume.to_source_orientation(label), raw_label)

  slices, region_slices, has_brain, crop_pad = preprocess.volume_to_slices(
      volume.images["flair"], regions, size=(240, 240), clip=5.0)
  assert slices.shape == (155, 240, 240) and region_slices.shape == (155, 240, 240, 3)
  assert region_slices.sum(axis=(0, 1, 2)).tolist() == counts
  assert 0 < has_brain.sum() < 155
  np.testing.assert_array_equal(preprocess.slices_to_volume(region_slices, crop_pad), regions)
