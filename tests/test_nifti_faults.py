"""NIfTI input that cannot lie: bad headers and files end in one UserError line or a correct read.

Each variant damages one file of a small valid case (the t1 image, or the label) at the byte
level, as a broken converter, a bad copy or a bit flip would. Every outcome must be either the
original data, read exactly, or one `UserError` line naming the damaged file; nothing else may
escape, and nothing may be read as different data. A seeded random-byte fuzzer does the same for
the header and the first voxels. The all-zero image and the no-slice warning, and the command
line's `error:` line, are here too.
"""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_one_line_error, load_test_config, run_cli, write_random_workdir

from uagan_jax.data import dataset, input_pipeline, readers
from uagan_jax.errors import UserError

SHAPE = (12, 10, 6)
# LPS with 1 x 1 x 2 mm voxels, as BraTS/UPENN scans; written in both sform and qform (code 1,
# scanner), as scanners' converters do.
AFFINE = np.array([[-1.0, 0, 0, 6], [0, -1, 0, 5], [0, 0, 2, -6], [0, 0, 0, 1]])
HEADER = nib.nifti1.header_dtype  # little-endian NIfTI-1 fields and their byte offsets
FIRST_VOXEL = 352  # vox_offset of the files written here
FUZZ_CASES = 300
FUZZ_BYTES = FIRST_VOXEL + 64  # the header, the extension flag and the first 32 int16 voxels


def _image(kind: str) -> np.ndarray:
  rng = np.random.default_rng(["t1", "t2", "label"].index(kind))
  if kind == "label":
    label = np.zeros(SHAPE, np.uint8)
    label[3:7, 2:6, 1:4] = rng.choice([1, 2, 4], size=(4, 4, 3))
    return label
  image = rng.integers(-200, 3000, SHAPE, dtype=np.int16)
  image[0] = 0
  return image


def _nifti(data: np.ndarray, affine: np.ndarray = AFFINE, *, version: int = 1,
           endian: str = "<") -> bytes:
  """The bytes of an uncompressed single-file NIfTI with the affine as sform and qform."""
  image_class = nib.Nifti1Image if version == 1 else nib.Nifti2Image
  header = image_class.header_class(endianness=endian)
  header.set_data_dtype(data.dtype)
  image = image_class(data, affine, header)
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  return image.to_bytes()


def _write(path, raw: bytes) -> None:
  path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)


def _write_case(folder, ext: str) -> dict:
  """A valid brats2021 case folder with t1, t2 and a label; returns role -> path."""
  folder.mkdir(parents=True)
  paths = {}
  for role, suffix in (("t1", "t1"), ("t2", "t2"), ("t1ce", "t1ce"), ("flair", "flair"),
                       ("label", "seg")):
    paths[role] = folder / f"{folder.name}_{suffix}{ext}"
    _write(paths[role], _nifti(_image("label" if role == "label" else
                                      "t1" if role == "t1" else "t2")))
  return paths


def _load(paths):
  (case,) = readers.find_cases(paths["t1"].parent)
  return readers.load_case(case, modalities=("t1", "t2"))


def _set(raw: bytes, field: str, value, index: int | None = None) -> bytes:
  """raw with one header field (or one element of an array field) set."""
  buffer = bytearray(raw)
  header = np.frombuffer(buffer, HEADER, count=1)
  if index is None:
    header[field] = value
  else:
    header[field][0, index] = value
  return bytes(buffer)


def _sets(raw: bytes, *changes) -> bytes:
  for change in changes:
    raw = _set(raw, *change)
  return raw


def _srow(raw: bytes, **rows) -> bytes:
  for name, row in rows.items():
    raw = _set(raw, f"srow_{name}", np.asarray(row, np.float32))
  return raw


def _padded(raw: bytes, extra: int) -> bytes:
  """A valid file whose voxels start ``extra`` bytes later (zeros between; no extensions)."""
  return _set(raw[:FIRST_VOXEL] + b"\0" * extra + raw[FIRST_VOXEL:], "vox_offset",
              FIRST_VOXEL + extra)


def _shifted_affine(raw: bytes) -> bytes:
  """The affine moved by 3 mm along x, in sform and qform alike."""
  shifted = AFFINE.copy()
  shifted[0, 3] += 3
  return _sets(raw, ("srow_x", shifted[0].astype(np.float32)), ("qoffset_x", shifted[0, 3]))


def _gzip_tail(path, raw: bytes) -> None:
  path.write_bytes(gzip.compress(raw, mtime=0) + b"not gzip at all")


def _gzip_truncated(path, raw: bytes) -> None:
  data = gzip.compress(raw, mtime=0)
  path.write_bytes(data[:len(data) * 2 // 3])


def _gzip_huge_claim(path, raw: bytes) -> None:
  # A few MB of real zeros under a header claiming 30000^3 voxels: refused before allocating.
  raw = _sets(raw, ("dim", 30000, 1), ("dim", 30000, 2), ("dim", 30000, 3))
  path.write_bytes(gzip.compress(raw + b"\0" * (4 << 20), mtime=0))


def _plain_in_gz(path, raw: bytes) -> None:
  path.write_bytes(raw)


def _gzip_in_nii(path, raw: bytes) -> None:
  path.write_bytes(gzip.compress(raw, mtime=0))


OK = None  # the variant is valid: it must read as the original data
# name: (role damaged, extension, change of the raw bytes (or a writer of the file), outcome:
# OK or a phrase the one-line error must hold).
VARIANTS = {
    # datatype and bitpix
    "datatype_unknown": ("t1", ".nii", lambda r: _set(r, "datatype", 99), "datatype code 99"),
    "datatype_complex": ("t1", ".nii", lambda r: _sets(r, ("datatype", 32), ("bitpix", 64)),
                         "complex64 (code 32) is not supported"),
    "datatype_rgb": ("t1", ".nii", lambda r: _sets(r, ("datatype", 128), ("bitpix", 24)),
                     "RGB (code 128) is not supported"),
    "uint8_over_int16": ("t1", ".nii", lambda r: _sets(r, ("datatype", 2), ("bitpix", 8)),
                         "12x10x6 uint8 = 720 bytes of data but the file holds 1440"),
    "uint8_over_int16_gz": ("t1", ".nii.gz", lambda r: _sets(r, ("datatype", 2), ("bitpix", 8)),
                            "12x10x6 uint8 = 720 bytes of data but the decompressed file holds "
                            "more"),
    "float32_over_int16": ("t1", ".nii", lambda r: _sets(r, ("datatype", 16), ("bitpix", 32)),
                           "float32 = 2880 bytes of data but the file holds 1440"),
    "datatype_without_bitpix": ("t1", ".nii", lambda r: _set(r, "datatype", 2),
                                "bitpix 16 disagrees with datatype uint8"),
    "bitpix_alone": ("t1", ".nii", lambda r: _set(r, "bitpix", 8),
                     "bitpix 8 disagrees with datatype int16"),
    # vox_offset
    "vox_offset_0": ("t1", ".nii", lambda r: _set(r, "vox_offset", 0), "vox_offset 0 is below 352"),
    "vox_offset_low": ("t1", ".nii", lambda r: _set(r, "vox_offset", 336),
                       "vox_offset 336 is below 352"),
    "vox_offset_past_end": ("t1", ".nii", lambda r: _set(r, "vox_offset", 1 << 20),
                            "less than vox_offset 1048576"),
    "vox_offset_not_16": ("t1", ".nii", lambda r: _set(r, "vox_offset", 354),
                          "vox_offset 354 is not a multiple of 16"),
    "vox_offset_fraction": ("t1", ".nii", lambda r: _set(r, "vox_offset", 352.5),
                            "vox_offset 352.5 is not a whole number"),
    "vox_offset_nan": ("t1", ".nii", lambda r: _set(r, "vox_offset", np.nan),
                       "vox_offset nan is not a whole number"),
    "vox_offset_shifted": ("t1", ".nii", lambda r: _set(r, "vox_offset", 368),
                           "holds 1424 after vox_offset 368: truncated"),
    "vox_offset_padded": ("t1", ".nii", lambda r: _padded(r, 32), OK),
    "vox_offset_padded_gz": ("t1", ".nii.gz", lambda r: _padded(r, 16), OK),
    # dims
    "dim_negative": ("t1", ".nii", lambda r: _set(r, "dim", -12, 1), "dim[1] is -12, negative"),
    "dim_zero": ("t1", ".nii", lambda r: _set(r, "dim", 0, 2),
                 "dim[2] is 0: axis 2 of the image is empty"),
    "dim_huge": ("t1", ".nii", lambda r: _set(r, "dim", 30000, 3),
                 "12x10x30000 int16 = 7200000 bytes of data but the file holds 1440"),
    "dims_30000_cubed": ("t1", ".nii", lambda r: _sets(r, *[("dim", 30000, i) for i in (1, 2, 3)]),
                         "30000x30000x30000 = 27000000000000 voxels"),
    "dim0_zero": ("t1", ".nii", lambda r: _set(r, "dim", 0, 0), "dim[0] is 0"),
    "dim0_eight": ("t1", ".nii", lambda r: _set(r, "dim", 8, 0), "dim[0] is 8"),
    "dim0_two": ("t1", ".nii", lambda r: _set(r, "dim", 2, 0), "expected a 3D image"),
    "dim0_four": ("t1", ".nii", lambda r: _sets(r, ("dim", 4, 0), ("dim", 1, 4)),
                  "expected a 3D image, got shape (12, 10, 6, 1)"),
    "dim3_one_short": ("t1", ".nii", lambda r: _set(r, "dim", 5, 3),
                       "12x10x5 int16 = 1200 bytes of data but the file holds 1440 after "
                       "vox_offset 352: trailing bytes or a wrong dim"),
    "dim3_one_short_gz": ("t1", ".nii.gz", lambda r: _set(r, "dim", 5, 3),
                          "12x10x5 int16 = 1200 bytes"),
    "dim3_one_long": ("t1", ".nii", lambda r: _set(r, "dim", 7, 3),
                      "12x10x7 int16 = 1680 bytes of data but the file holds 1440 after "
                      "vox_offset 352: truncated"),
    "dims_swapped": ("t1", ".nii", lambda r: _sets(r, ("dim", 10, 1), ("dim", 12, 2)),
                     "differs from"),
    # pixdim
    "pixdim_zero": ("t1", ".nii", lambda r: _set(r, "pixdim", 0, 1), "pixdim[1] is 0"),
    "pixdim_negative": ("t1", ".nii", lambda r: _set(r, "pixdim", -1, 2), "pixdim[2] is -1"),
    "pixdim_nan": ("t1", ".nii", lambda r: _set(r, "pixdim", np.nan, 3), "pixdim[3] is nan"),
    "pixdim_inf": ("t1", ".nii", lambda r: _set(r, "pixdim", np.inf, 1), "pixdim[1] is inf"),
    "pixdim_disagrees": ("t1", ".nii", lambda r: _set(r, "pixdim", 3, 3),
                         "voxel sizes 1x1x2 mm but pixdim says 1x1x3"),
    "qfac_zero": ("t1", ".nii", lambda r: _set(r, "pixdim", 0, 0), OK),  # read as 1, as NIfTI says
    # qform / sform
    "srow_nan": ("t1", ".nii", lambda r: _srow(r, x=[np.nan] * 4), "non-finite entries"),
    "srow_singular": ("t1", ".nii", lambda r: _srow(r, z=[-1, 0, 0, 6]), "is singular"),
    "srow_axes_swapped": ("t1", ".nii", lambda r: _srow(r, x=[0, -1, 0, 6], y=[-1, 0, 0, 5]),
                          "sform says orientation PLS but qform says LPS"),
    "srow_flipped": ("t1", ".nii", lambda r: _srow(r, x=[1, 0, 0, -6]),
                     "sform says orientation RPS but qform says LPS"),
    "srow_flipped_sform_only": (
        "t1", ".nii", lambda r: _set(_srow(r, x=[1, 0, 0, -6]), "qform_code", 0),
        "orientation LPS differs from"),
    "srow_scaled": ("t1", ".nii", lambda r: _srow(r, z=[0, 0, 4, -6]),
                    "voxel sizes 1x1x4 mm but pixdim says 1x1x2"),
    "sform_code_0": ("t1", ".nii", lambda r: _set(r, "sform_code", 0), OK),
    "qform_code_0": ("t1", ".nii", lambda r: _set(r, "qform_code", 0), OK),
    "both_codes_0": ("t1", ".nii", lambda r: _sets(r, ("sform_code", 0), ("qform_code", 0)),
                     "differs from"),
    "sform_code_unknown": ("t1", ".nii", lambda r: _set(r, "sform_code", 99),
                           "sform_code 99 is no NIfTI transform code"),
    "quaternion_corrupt": ("t1", ".nii", lambda r: _set(r, "quatern_b", 2.0), "qform"),
    "affine_shifted": ("t1", ".nii", _shifted_affine, "voxels up to 3 mm apart"),
    "label_affine_shifted": ("label", ".nii.gz", _shifted_affine, "voxels up to 3 mm apart"),
    "label_orientation": ("label", ".nii", lambda r: _set(_srow(r, y=[0, 1, 0, -5]),
                                                           "qform_code", 0),
                          "voxel orientation LAS differs from"),
    # intensity scaling
    "scl_slope_nan": ("t1", ".nii", lambda r: _set(r, "scl_slope", np.nan), OK),  # no scaling
    "scl_slope_zero": ("t1", ".nii", lambda r: _set(r, "scl_slope", 0), OK),  # no scaling
    "scl_slope_inf": ("t1", ".nii", lambda r: _set(r, "scl_slope", np.inf), "scl_slope is inf"),
    "scl_inter_nan": ("t1", ".nii", lambda r: _sets(r, ("scl_slope", 1), ("scl_inter", np.nan)),
                      "scl_inter is nan"),
    # the file around the header
    "truncated_nii": ("t1", ".nii", lambda r: r[:len(r) // 2],
                      "the file holds 544 after vox_offset 352: truncated"),
    "truncated_in_header": ("t1", ".nii", lambda r: r[:200], "ends inside its 348-byte"),
    "empty_file": ("t1", ".nii", lambda r: b"", "0 bytes; too short"),
    "truncated_gz": ("t1", ".nii.gz", _gzip_truncated, "truncated or corrupt NIfTI"),
    "trailing_garbage_nii": ("t1", ".nii", lambda r: r + b"x" * 100,
                             "the file holds 1540 after vox_offset 352: trailing bytes"),
    "trailing_garbage_in_gz": ("t1", ".nii.gz", lambda r: r + b"x" * 100,
                               "decompressed file holds more"),
    "garbage_after_gz": ("t1", ".nii.gz", _gzip_tail, "bytes after the end of the gzip data"),
    "gz_claims_30000_cubed": ("t1", ".nii.gz", _gzip_huge_claim, "27000000000000 voxels"),
    "plain_named_gz": ("t1", ".nii.gz", _plain_in_gz, "not gzip-compressed"),
    "gzip_named_nii": ("t1", ".nii", _gzip_in_nii, "gzip-compressed data in a .nii file"),
    "magic_wrong": ("t1", ".nii", lambda r: _set(r, "magic", b"xyz"),
                    "not a single-file NIfTI-1 (magic b'xyz'"),
    "magic_pair": ("t1", ".nii", lambda r: _set(r, "magic", b"ni1"), "magic 'ni1'"),
    "sizeof_hdr_wrong": ("t1", ".nii", lambda r: _set(r, "sizeof_hdr", 0), "sizeof_hdr is 0"),
    "sizeof_hdr_byteswapped": ("t1", ".nii", lambda r: _set(r, "sizeof_hdr", int.from_bytes(
                                   (348).to_bytes(4, "big"), "little")),
                               "dim[0] is 768"),
    "big_endian": ("t1", ".nii", lambda r: _nifti(_image("t1"), endian=">"), OK),
    "nifti2": ("t1", ".nii.gz", lambda r: _nifti(_image("t1"), version=2), OK),
}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
  """The valid case as read, to compare every correct read against."""
  paths = _write_case(tmp_path_factory.mktemp("original") / "c1", ".nii")
  return _load(paths)


def test_the_original_reads_as_written(original):
  # LPS -> RAS flips x and y.
  np.testing.assert_array_equal(original.images["t1"], _image("t1")[::-1, ::-1].astype(np.float32))
  np.testing.assert_array_equal(original.label, _image("label")[::-1, ::-1])


def test_there_are_at_least_43_variants_with_both_outcomes():
  outcomes = [outcome for *_, outcome in VARIANTS.values()]
  assert len(VARIANTS) >= 43
  assert outcomes.count(OK) >= 5 and len(outcomes) - outcomes.count(OK) >= 43


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_reads_correctly_or_fails_in_one_line(name, tmp_path, original):
  role, ext, change, outcome = VARIANTS[name]
  paths = _write_case(tmp_path / "c1", ext)
  raw = _nifti(_image("label" if role == "label" else "t1"))
  if change.__code__.co_argcount == 2:  # writes the file itself
    change(paths[role], raw)
  else:
    _write(paths[role], change(raw))
  try:
    volume = _load(paths)
  except UserError as error:
    message = str(error)
    assert outcome is not OK, f"a valid variant was refused: {message}"
    assert "\n" not in message and str(paths[role]) in message, message
    assert outcome in message, message
    return
  assert outcome is OK, f"read although it should fail with {outcome!r}"
  for modality in ("t1", "t2"):
    np.testing.assert_array_equal(volume.images[modality], original.images[modality])
  np.testing.assert_array_equal(volume.label, original.label)
  np.testing.assert_allclose(volume.affine, original.affine, atol=1e-5)


def _expected_t1(mutated: bytes, original_volume) -> np.ndarray:
  """What a correct read of a fuzzed t1 gives: its voxel bytes as the original header describes
  them, scaled as the fuzzed header's scaling says when that scaling is valid (a scaling cannot be
  told wrong from right), in canonical orientation."""
  raw = np.frombuffer(mutated[FIRST_VOXEL:], "<i2").reshape(SHAPE, order="F")
  header = np.frombuffer(mutated, HEADER, count=1)[0]
  slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
  data = raw.astype(np.float64)
  if slope != 0 and np.isfinite(slope):
    data = data * slope + inter
  canonical = nib.orientations.apply_orientation(data, original_volume.source.to_canonical)
  return canonical.astype(np.float32)


def test_fuzzed_headers_read_correctly_or_fail_in_one_line(tmp_path, original):
  """A seeded random-byte fuzzer over the header, the extension flag and the first voxels."""
  outcomes = {"read": 0, "refused": 0}
  pristine = _nifti(_image("t1"))
  folders, cases = {}, {}
  for ext in (".nii", ".nii.gz"):
    folders[ext] = _write_case(tmp_path / ext.replace(".", "_") / "c1", ext)
    (cases[ext],) = readers.find_cases(folders[ext]["t1"].parent)
  for number in range(FUZZ_CASES):
    rng = np.random.default_rng([20260517, number])
    mutated = bytearray(pristine)
    for position in rng.choice(FUZZ_BYTES, size=rng.integers(1, 5), replace=False):
      mutated[position] = rng.integers(256)
    mutated = bytes(mutated)
    ext = ".nii.gz" if number % 4 == 0 else ".nii"
    paths = folders[ext]
    _write(paths["t1"], mutated)
    try:
      volume = readers.load_case(cases[ext], modalities=("t1", "t2"))
    except UserError as error:
      message = str(error)
      assert "\n" not in message and str(paths["t1"]) in message, (number, message)
      outcomes["refused"] += 1
      continue
    changed = [i for i in range(FUZZ_BYTES) if mutated[i] != pristine[i]]
    np.testing.assert_allclose(volume.images["t1"], _expected_t1(mutated, original), rtol=1e-6,
                               err_msg=f"fuzz case {number}: bytes {changed} changed")
    np.testing.assert_array_equal(volume.images["t2"], original.images["t2"])
    np.testing.assert_array_equal(volume.label, original.label)
    outcomes["read"] += 1
  # Both outcomes occur: the fuzzer hits fields that matter and fields that do not.
  assert outcomes["read"] > 20 and outcomes["refused"] > 20, outcomes


def test_real_case_passes_the_checks(original):
  from conftest import REAL_CASE  # pylint: disable=g-import-not-at-top
  if not REAL_CASE.is_dir():
    pytest.skip("the real UPENN-GBM case is not on this machine")
  (case,) = readers.find_cases(REAL_CASE)
  for path in list(case.images.values()) + [case.label]:
    readers._check_header(path, ndim=3)  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------
# All-zero images and cases without a training slice
# ------------------------------------------------------------------------------------------------


def test_training_names_a_case_without_slices_and_why(synth_data, tmp_path):
  data_dir = tmp_path / "data"
  shutil.copytree(synth_data, data_dir)
  config = load_test_config()
  training = input_pipeline.find_training_data(config, data_dir)
  empty_id, modality = sorted(training.assignment.items())[0]
  (case,) = [c for c in training.cases if c.case_id == empty_id]
  zero = case.images[modality]
  image = nib.load(zero)
  nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine, image.header), zero)
  messages = []
  train_input = input_pipeline.TrainInput(config, training, cache_dir=tmp_path / "cache",
                                          log=messages.append)
  warnings = [m for m in messages if m.startswith("warning: ")]
  assert warnings == [f"warning: case {empty_id} contributes no training slice: {zero.absolute()}: "
                      "every voxel is 0 (empty or a failed conversion)"], messages
  assert empty_id not in {train_input.index.case_ids[i] for i in train_input.index.case_index}
  # The other cases still train.
  assert len(train_input.index) > 0


class _Case:
  """A cached case's view for build_slice_index: brain in every slice, tumour in none."""
  case_id = "no_tumour"
  meta = {"label": {}, "sources": {"t1": {"path": "/data/no_tumour/no_tumour_t1.nii.gz"}}}

  def has_brain(self, modality):
    del modality
    return np.ones(6, bool)

  def tumour_in_view(self, size):
    del size
    return np.zeros(6, bool)


def test_a_case_without_tumour_slices_is_named_with_the_reason():
  warnings = []
  with pytest.raises(UserError, match="no training slices left"):
    dataset.build_slice_index([_Case()], assignment={"no_tumour": "t1"}, size=(8, 8),
                              tumour_free_fraction=0.0, seed=0, warn=warnings.append)
  assert warnings == ["case no_tumour contributes no training slice: no t1 slice has both brain "
                      "and tumour inside the 8x8 view, and tumour_free_fraction=0.0 keeps none "
                      "of the tumour-free ones"]
  # A case that does contribute is not named.
  warnings.clear()
  dataset.build_slice_index([_Case()], assignment={"no_tumour": "t1"}, size=(8, 8),
                            tumour_free_fraction=0.5, seed=0, warn=warnings.append)
  assert not warnings


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_workdir(tmp_path_factory):
  config = load_test_config(variant="unet")
  return write_random_workdir(tmp_path_factory.mktemp("faults") / "unet", config)


@pytest.mark.parametrize("name", ["dim3_one_short", "vox_offset_0", "gz_claims_30000_cubed",
                                  "datatype_unknown", "dim_zero"])
def test_predict_on_a_bad_file_prints_one_error_line(capsys, unet_workdir, tmp_path, name):
  role, ext, change, outcome = VARIANTS[name]
  assert role == "t1"
  path = tmp_path / f"scan{ext}"
  raw = _nifti(_image("t1"))
  if change.__code__.co_argcount == 2:
    change(path, raw)
  else:
    _write(path, change(raw))
  code, _, err = run_cli(capsys, "predict", "--workdir", unet_workdir, "--input", path,
                         "--modality", "t1", "--output", tmp_path / "out.nii.gz")
  assert_one_line_error(code, err, path, outcome)
  assert not (tmp_path / "out.nii.gz").exists()


def test_predict_on_an_empty_image_says_so(capsys, unet_workdir, tmp_path):
  path = tmp_path / "scan.nii.gz"
  _write(path, _nifti(np.zeros(SHAPE, np.int16)))
  code, _, err = run_cli(capsys, "predict", "--workdir", unet_workdir, "--input", path,
                         "--modality", "t1", "--output", tmp_path / "out.nii.gz")
  assert_one_line_error(code, err, path, "every voxel is 0 (empty or a failed conversion)")
