"""Tests for the synthetic BraTS-layout phantoms (`uagan_jax.data.synthetic`)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uagan_jax.data import MODALITIES
from uagan_jax.data import synthetic
from uagan_jax.data.synthetic import make_phantom, write_dataset
from uagan_jax.errors import UserError

# Small volumes keep the tests fast; the generator scales its anatomy to the shape.
SHAPE = (64, 64, 48)
SEED = 11
SUFFIXES = tuple(MODALITIES) + ("seg",)


def _files(out: Path) -> dict[str, bytes]:
  """All files under `out`, keyed by relative path."""
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
  out = tmp_path_factory.mktemp("synth") / "data"
  return out, write_dataset(out, cases=3, seed=SEED, shape=SHAPE)


@pytest.fixture(scope="module")
def phantoms() -> list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
  return [make_phantom(seed=SEED, case_index=i, shape=SHAPE, return_tissues=True)
          for i in range(8)]


def test_layout_is_brats_2021(dataset):
  out, folders = dataset
  names = [f"SynthBraTS_{i:05d}" for i in range(3)]
  assert folders == [out / n for n in names]
  assert sorted(p.name for p in out.iterdir()) == ["README.txt"] + names
  for folder in folders:
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{folder.name}_{s}.nii.gz" for s in SUFFIXES)
  readme = (out / "README.txt").read_text()
  assert readme.splitlines()[0] == synthetic.README_MARKER
  for text in (f"Seed: {SEED}", "64 x 64 x 48", "Cases: 3", "4 enhancing tumour",
               "2 peritumoural oedema", "1 necrosis"):
    assert text in readme


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
  out, _ = dataset
  write_dataset(tmp_path / "again", cases=3, seed=SEED, shape=SHAPE)
  first, second = _files(out), _files(tmp_path / "again")
  assert first.keys() == second.keys() and len(first) == 3 * 5 + 1
  assert first == second
  # No gzip timestamp: bytes 4..7 of a gzip header hold the mtime.
  assert all(data[4:8] == b"\0\0\0\0" for name, data in first.items() if name.endswith(".gz"))


def test_other_seed_differs_and_cases_do_not_depend_on_count(dataset, tmp_path):
  out, _ = dataset
  first = _files(out)
  write_dataset(tmp_path / "other", cases=3, seed=SEED + 1, shape=SHAPE)
  other = _files(tmp_path / "other")
  for name, data in first.items():
    if name.endswith(".nii.gz"):
      assert other[name] != data, name
  write_dataset(tmp_path / "two", cases=2, seed=SEED, shape=SHAPE)
  two = _files(tmp_path / "two")
  assert len(two) == 2 * 5 + 1
  for name, data in two.items():
    if name.endswith(".nii.gz"):
      assert first[name] == data, name


def test_files_load_with_brats_geometry(dataset):
  _, folders = dataset
  affine = np.diag([-1.0, -1.0, 1.0, 1.0])
  affine[:3, 3] = [(SHAPE[0] - 1) / 2, (SHAPE[1] - 1) / 2, -(SHAPE[2] - 1) / 2]
  np.testing.assert_allclose(synthetic.brats_affine(SHAPE), affine)
  for i, folder in enumerate(folders):
    images, label = make_phantom(seed=SEED, case_index=i, shape=SHAPE)
    for suffix in SUFFIXES:
      img = nib.load(folder / f"{folder.name}_{suffix}.nii.gz")
      assert img.shape == SHAPE
      assert img.get_data_dtype() == (np.uint8 if suffix == "seg" else np.int16)
      assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
      np.testing.assert_allclose(img.affine, affine)
      np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
      assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
      # The volume centre sits at the world origin.
      centre = img.affine @ np.r_[(np.array(SHAPE) - 1) / 2, 1.0]
      np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
      data = np.asarray(img.dataobj)
      expected = label if suffix == "seg" else images[suffix]
      assert data.dtype == expected.dtype
      np.testing.assert_array_equal(data, expected)


def test_images_and_labels(phantoms):
  with_all = 0
  for images, label, tissues in phantoms:
    assert set(images) == set(MODALITIES)
    head = tissues != synthetic.BACKGROUND
    for name, image in images.items():
      assert image.shape == SHAPE and image.dtype == np.int16, name
      # Background exactly 0 and the head strictly positive: the non-zero mask is the head.
      np.testing.assert_array_equal(image != 0, head)
    assert label.shape == SHAPE and label.dtype == np.uint8
    values = set(np.unique(label).tolist())
    assert values <= {0, 1, 2, 4}
    with_all += {1, 2, 4} <= values
    tumour = label > 0
    # Tumour only inside the brain: never in the background or the skull.
    assert not np.any(tumour & np.isin(tissues, [synthetic.BACKGROUND, synthetic.SKULL]))
    # A good fraction of the axial slices through the head have no tumour.
    head_slices = head.any(axis=(0, 1))
    tumour_slices = tumour.any(axis=(0, 1))
    assert 0 < tumour_slices.sum() <= 0.7 * head_slices.sum()
    assert np.all(head_slices[tumour_slices])
    # The tumour sits in one hemisphere, away from the volume border.
    xs = np.nonzero(tumour.any(axis=(1, 2)))[0]
    assert xs.min() > 0 and xs.max() < SHAPE[0] - 1
  assert with_all >= 0.75 * len(phantoms)


def test_tumours_vary_between_cases(phantoms):
  centres = np.array([np.argwhere(label > 0).mean(axis=0) for _, label, _ in phantoms])
  sizes = np.array([(label > 0).sum() for _, label, _ in phantoms])
  assert np.ptp(centres[:, 0]) > 0.2 * SHAPE[0]
  assert sizes.max() > 1.5 * sizes.min()


def test_contrasts_are_mri_like(phantoms):
  for i, (images, label, tissues) in enumerate(phantoms):

    def mean(modality: str, mask: np.ndarray, case: int = i) -> float:
      assert mask.any(), f"case {case}: empty mask"
      return float(images[modality][mask].mean())

    wm = tissues == synthetic.WM
    csf = tissues == synthetic.CSF
    oedema, enhancing = label == 2, label == 4
    for modality in ("flair", "t2"):
      assert mean(modality, oedema) > 1.3 * mean(modality, wm), (i, modality)
    assert mean("t1ce", enhancing) > 1.3 * mean("t1", enhancing), i
    # Enhancing tumour is the brightest brain tissue after contrast.
    others = [t for t in range(len(synthetic.TISSUES))
              if t not in (synthetic.BACKGROUND, synthetic.SKULL, synthetic.ENHANCING)
              and np.any(tissues == t)]
    brightest_other = max(mean("t1ce", tissues == t) for t in others)
    assert mean("t1ce", enhancing) > brightest_other, i
    necrosis = tissues == synthetic.NECROSIS
    if necrosis.any():
      assert mean("t1ce", necrosis) < mean("t1ce", enhancing), i
    # FLAIR suppresses CSF; T2 makes it the brightest normal tissue.
    assert mean("flair", csf) < 0.6 * mean("flair", wm), i
    assert mean("t2", csf) > 1.5 * mean("t2", wm), i
    assert mean("t1", csf) < mean("t1", tissues == synthetic.GM) < mean("t1", wm), i


def test_make_phantom_is_deterministic_and_shape_aware():
  first = make_phantom(seed=3, case_index=5, shape=(48, 40, 32))
  second = make_phantom(seed=3, case_index=5, shape=(48, 40, 32))
  for name in MODALITIES:
    np.testing.assert_array_equal(first[0][name], second[0][name])
    assert first[0][name].shape == (48, 40, 32)
  np.testing.assert_array_equal(first[1], second[1])
  other = make_phantom(seed=3, case_index=6, shape=(48, 40, 32))
  assert not np.array_equal(first[1], other[1])


def test_progress_and_rewriting_previous_output(tmp_path):
  calls = []
  out = tmp_path / "data"
  write_dataset(out, cases=3, seed=1, shape=(32, 32, 32), progress=lambda *a: calls.append(a))
  assert calls == [(1, 3), (2, 3), (3, 3)]
  # A previous output may be overwritten; surplus cases are removed.
  folders = write_dataset(out, cases=2, seed=2, shape=(32, 32, 32))
  assert sorted(p.name for p in out.iterdir()) == ["README.txt"] + [f.name for f in folders]
  assert "Cases: 2" in (out / "README.txt").read_text()
  fresh = tmp_path / "fresh"
  write_dataset(fresh, cases=2, seed=2, shape=(32, 32, 32))
  assert _files(out) == _files(fresh)
  # An existing empty folder is fine too.
  (tmp_path / "empty").mkdir()
  assert len(write_dataset(tmp_path / "empty", cases=1, seed=0, shape=(32, 32, 32))) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(cases=0), "cases"),
    (dict(cases=-2), "cases"),
    (dict(cases=1.5), "cases"),
    (dict(cases=True), "cases"),
    (dict(seed=-1), "seed"),
    (dict(shape=(31, 64, 64)), "at least 32"),
    (dict(shape=(64, 64)), "three integers"),
    (dict(shape=(64.0, 64, 64)), "three integers"),
    (dict(shape=64), "three integers"),
    (dict(spacing=0.0), "spacing"),
    (dict(spacing=(1.0, 2.0)), "spacing"),
    (dict(spacing="2"), "spacing"),
])
def test_bad_arguments(tmp_path, kwargs, message):
  args = dict(cases=1, seed=0, shape=(32, 32, 32)) | kwargs
  with pytest.raises(UserError, match=message):
    write_dataset(tmp_path / "out", **args)
  assert not (tmp_path / "out").exists()


def test_bad_make_phantom_arguments():
  with pytest.raises(UserError, match="case_index"):
    make_phantom(seed=0, case_index=-1, shape=(32, 32, 32))
  with pytest.raises(UserError, match="at least 32"):
    make_phantom(seed=0, case_index=0, shape=(32, 16, 32))


def test_refuses_foreign_data(tmp_path):
  # A plain file in the way.
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="not a folder"):
    write_dataset(tmp_path / "file", cases=1, seed=0, shape=(32, 32, 32))
  # A non-empty folder without our README.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("precious")
  with pytest.raises(UserError, match="refusing to overwrite"):
    write_dataset(foreign, cases=1, seed=0, shape=(32, 32, 32))
  assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
  # Our README, but something else beside it, or inside a case folder.
  ours = tmp_path / "ours"
  write_dataset(ours, cases=2, seed=0, shape=(32, 32, 32))
  (ours / "SynthBraTS_00001" / "extra.nii.gz").write_bytes(b"keep me")
  with pytest.raises(UserError, match="refusing to overwrite"):
    write_dataset(ours, cases=1, seed=0, shape=(32, 32, 32))
  assert (ours / "SynthBraTS_00001" / "extra.nii.gz").read_bytes() == b"keep me"
  (ours / "SynthBraTS_00001" / "extra.nii.gz").unlink()
  (ours / "BraTS2021_00000").mkdir()
  with pytest.raises(UserError, match="refusing to overwrite"):
    write_dataset(ours, cases=1, seed=0, shape=(32, 32, 32))
  assert (ours / "SynthBraTS_00001").is_dir()
  # A README that is not ours.
  other = tmp_path / "other"
  other.mkdir()
  (other / "README.txt").write_text("BraTS 2021 training data\n")
  with pytest.raises(UserError, match="refusing to overwrite"):
    write_dataset(other, cases=1, seed=0, shape=(32, 32, 32))


def test_spacing_is_in_the_headers_and_the_arrays_do_not_change(dataset, tmp_path):
  out, folders = dataset
  write_dataset(tmp_path / "two", cases=1, seed=SEED, shape=SHAPE, spacing=synthetic.DEMO_SPACING)
  write_dataset(tmp_path / "aniso", cases=1, seed=SEED, shape=SHAPE, spacing=(1.0, 1.0, 3.0))
  name = folders[0].name
  for folder, zooms in ((out, (1.0, 1.0, 1.0)), (tmp_path / "two", (2.0, 2.0, 2.0)),
                        (tmp_path / "aniso", (1.0, 1.0, 3.0))):
    for suffix in SUFFIXES:
      image = nib.load(folder / name / f"{name}_{suffix}.nii.gz")
      assert image.header.get_zooms() == zooms
      np.testing.assert_array_equal(image.affine, synthetic.brats_affine(SHAPE, zooms))
      assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
      np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(
          nib.load(out / name / f"{name}_{suffix}.nii.gz").dataobj))
  assert "Geometry: 2 x 2 x 2 mm voxels" in (tmp_path / "two" / "README.txt").read_text()
  assert "Geometry: 1 x 1 x 3 mm voxels" in (tmp_path / "aniso" / "README.txt").read_text()


def test_at_the_demo_spacing_the_brain_has_a_heads_size():
  """The issue's numbers: a real brain is about 135 x 175 mm (left-right x front-back)."""
  images, _ = make_phantom(seed=0, case_index=0, shape=(96, 96, 64))
  brain = images["t1"] != 0
  extent = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis))).size
            * synthetic.DEMO_SPACING for axis in range(2)]
  assert 120 <= extent[0] <= 160 and 155 <= extent[1] <= 195, extent


# --- A scanner shift of the images (a test set unlike the training phantoms) -------------------


SHIFTS = {"contrast": dict(contrast_jitter=0.2), "noise": dict(noise=3.0),
          "bias": dict(bias=2.5)}


def test_default_shift_is_no_shift():
  plain = make_phantom(seed=SEED, case_index=0, shape=SHAPE)
  explicit = make_phantom(seed=SEED, case_index=0, shape=SHAPE,
                          shift=synthetic.ScannerShift(contrast_jitter=0.0, noise=1.0, bias=1.0))
  for name in MODALITIES:
    np.testing.assert_array_equal(plain[0][name], explicit[0][name])
  np.testing.assert_array_equal(plain[1], explicit[1])


def test_default_shift_writes_the_same_files(dataset, tmp_path):
  out, _ = dataset
  write_dataset(tmp_path / "default", cases=3, seed=SEED, shape=SHAPE,
                shift=synthetic.ScannerShift())
  assert _files(tmp_path / "default") == _files(out)
  assert "Scanner shift" not in (out / "README.txt").read_text()


@pytest.mark.parametrize("shift", SHIFTS.values(), ids=SHIFTS.keys())
def test_shift_changes_intensities_only(phantoms, shift):
  images, label, tissues = phantoms[0]
  shifted_images, shifted_label, shifted_tissues = make_phantom(
      seed=SEED, case_index=0, shape=SHAPE, return_tissues=True,
      shift=synthetic.ScannerShift(**shift))
  np.testing.assert_array_equal(shifted_label, label)
  np.testing.assert_array_equal(shifted_tissues, tissues)
  for name in MODALITIES:
    # The same head (non-zero voxels), other values inside it.
    np.testing.assert_array_equal(shifted_images[name] != 0, images[name] != 0)
    assert not np.array_equal(shifted_images[name], images[name])


def test_each_shift_does_what_it_says(phantoms):
  images, _, tissues = phantoms[0]
  shifted = {name: make_phantom(seed=SEED, case_index=0, shape=SHAPE,
                                shift=synthetic.ScannerShift(**kwargs))[0]
             for name, kwargs in SHIFTS.items()}
  wm = tissues == synthetic.WM
  # Noise x3: white matter's voxel-to-voxel differences (noise; the texture is smooth) triple.
  def roughness(volume):
    return np.std(np.diff(volume.astype(np.float64), axis=0)[(wm & np.roll(wm, -1, 0))[:-1]])
  assert roughness(shifted["noise"]["t1"]) > 2.0 * roughness(images["t1"])
  # Bias x2.5: the same noise draws, so shifted / default is the smooth field ratio
  # (1 + 2.5 d) / (1 + d) for the default field's deviation d of +-8..15%: it varies by several
  # percent over white matter, smoothly (it barely changes from a voxel to the next).
  ratio = shifted["bias"]["t1"].astype(np.float64) / np.maximum(images["t1"], 1)
  assert np.std(ratio[wm]) > 0.02
  assert roughness(shifted["bias"]["t1"]) < 1.5 * roughness(images["t1"])
  # Contrast jitter: the ratio of two tissues' means moves by more than the default jitter's 8%.
  gm = tissues == synthetic.GM
  ratio = lambda volume: volume[wm].mean() / volume[gm].mean()
  moved = [abs(ratio(shifted["contrast"][m]) / ratio(images[m]) - 1) for m in MODALITIES]
  assert max(moved) > 0.05


def test_shift_is_written_in_the_readme_and_checked(tmp_path):
  write_dataset(tmp_path / "shifted", cases=1, seed=0, shape=(32, 32, 32),
                shift=synthetic.ScannerShift(contrast_jitter=0.2, noise=3.0, bias=2.5))
  assert ("Scanner shift: contrast jitter 0.2, noise x3, bias x2.5" in
          (tmp_path / "shifted" / "README.txt").read_text())
  for kwargs, message in [(dict(noise=-1.0), "noise must be"), (dict(bias=float("nan")), "bias"),
                          (dict(contrast_jitter=1.0), "contrast_jitter must be < 1")]:
    with pytest.raises(UserError, match=message):
      write_dataset(tmp_path / "bad", cases=1, seed=0, shape=(32, 32, 32),
                    shift=synthetic.ScannerShift(**kwargs))
  assert not (tmp_path / "bad").exists()


def test_synth_command_flags_write_the_shift(capsys, tmp_path):
  from conftest import run_cli  # pylint: disable=g-import-not-at-top
  code, _, _ = run_cli(capsys, "synth", "--out", tmp_path / "cli", "--cases", "1", "--seed", "4",
                       "--shape", "32", "32", "32", "--contrast-jitter", "0.2", "--noise", "3",
                       "--bias", "2.5")
  assert code == 0
  write_dataset(tmp_path / "library", cases=1, seed=4, shape=(32, 32, 32),
                spacing=synthetic.DEMO_SPACING,  # the command's default
                shift=synthetic.ScannerShift(contrast_jitter=0.2, noise=3.0, bias=2.5))
  assert _files(tmp_path / "cli") == _files(tmp_path / "library")
  code, _, err = run_cli(capsys, "synth", "--out", tmp_path / "bad", "--noise", "-1")
  assert code == 2 and err.strip() == "error: noise must be a finite number >= 0, got -1.0"
