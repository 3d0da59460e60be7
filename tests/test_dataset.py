"""Tests for uagan_jax.data.dataset: splits, the unpaired assignment, slice sets, the sampler."""

import collections
import pathlib

import nibabel as nib
import numpy as np
import pytest

from uagan_jax.data import MODALITIES
from uagan_jax.data import dataset
from uagan_jax.data import readers
from uagan_jax.errors import UserError

SHAPE = (12, 10, 8)
SUFFIXES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
TUMOUR_SLICES = (2, 3, 4)  # z indices with a label
NO_BRAIN_SLICES = (0, 7)   # all-zero z indices


def _write_case(folder: pathlib.Path, *, seed: int, with_label: bool = True,
                tumour: bool = True) -> None:
  """A brats2021 case: brain in slices 1-6, tumour in slices 2-4, intensity ~ 10 (id + 1)."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for index, (modality, suffix) in enumerate(SUFFIXES.items()):
    image = np.zeros(SHAPE, np.float32)
    image[1:11, 1:9, 1:7] = 10.0 * (index + 1) + rng.random((10, 8, 6))
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{folder.name}_{suffix}.nii.gz")
  if with_label:
    label = np.zeros(SHAPE, np.uint8)
    if tumour:
      label[4:7, 3:6, 2] = 2
      label[5, 4, 3] = 1
      label[5, 5, 4] = 4
    nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"{folder.name}_seg.nii.gz")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  root = tmp_path_factory.mktemp("brats")
  for number in range(6):
    _write_case(root / f"case_{number:02d}", seed=number)
  return readers.find_cases(root)


# ---------------------------------------------------------------------------------------------
# Splits and the unpaired assignment.


def test_split_cases_deterministic_disjoint_complete():
  ids = [f"c{i:03d}" for i in range(50)]
  split = dataset.split_cases(ids, seed=3, val_fraction=0.1, test_fraction=0.2)
  assert len(split["test"]) == 10 and len(split["val"]) == 5 and len(split["train"]) == 35
  assert sorted(split["train"] + split["val"] + split["test"]) == ids
  assert all(part == sorted(part) for part in split.values())
  # Input order does not matter; the seed does.
  assert dataset.split_cases(ids[::-1], seed=3, val_fraction=0.1, test_fraction=0.2) == split
  assert dataset.split_cases(ids, seed=4, val_fraction=0.1, test_fraction=0.2) != split


@pytest.mark.parametrize("n, val, test, expected", [
    (0, 0.1, 0.2, (0, 0, 0)),
    (1, 0.1, 0.2, (1, 0, 0)),
    (2, 0.1, 0.2, (1, 0, 1)),   # at least one test and one train case
    (2, 0.0, 0.9, (1, 0, 1)),   # ... even when the fraction asks for more test
    (3, 0.1, 0.1, (1, 1, 1)),   # at least one val case when val_fraction > 0 and n >= 3
    (3, 0.0, 0.1, (2, 0, 1)),
    (4, 0.45, 0.45, (1, 1, 2)),  # 2 + 2 would leave no train case: val gives way first
    (10, 0.25, 0.25, (4, 3, 3)),  # 2.5 rounds up
])
def test_split_cases_small_counts(n, val, test, expected):
  split = dataset.split_cases([f"c{i}" for i in range(n)], seed=0, val_fraction=val,
                              test_fraction=test)
  assert (len(split["train"]), len(split["val"]), len(split["test"])) == expected


def test_split_cases_rejects_bad_fractions():
  with pytest.raises(UserError):
    dataset.split_cases(["a", "b"], seed=0, val_fraction=0.5, test_fraction=0.5)
  with pytest.raises(UserError):
    dataset.split_cases(["a", "b"], seed=0, val_fraction=-0.1, test_fraction=0.5)
  with pytest.raises(UserError):
    dataset.split_cases(["a", "a"], seed=0, val_fraction=0.0, test_fraction=0.5)
  with pytest.raises(UserError):
    dataset.split_cases(["a", "b"], seed=-1, val_fraction=0.0, test_fraction=0.5)


def test_assign_modalities_balanced_and_seeded():
  ids = [f"c{i:02d}" for i in range(23)]
  assignment = dataset.assign_modalities(ids, seed=7, modalities=MODALITIES)
  assert list(assignment) == ids  # one modality per case, in sorted order
  counts = collections.Counter(assignment.values())
  assert set(counts) == set(MODALITIES)
  assert max(counts.values()) - min(counts.values()) <= 1
  assert sorted(counts.values()) == [5, 6, 6, 6]
  assert dataset.assign_modalities(ids[::-1], seed=7, modalities=MODALITIES) == assignment
  assert dataset.assign_modalities(ids, seed=8, modalities=MODALITIES) != assignment
  # Round-robin over the seeded permutation, by hand.
  order = np.random.default_rng([7, dataset._ASSIGN_STREAM]).permutation(23)
  assert all(assignment[ids[case]] == MODALITIES[i % 4] for i, case in enumerate(order))
  subset = dataset.assign_modalities(ids, seed=7, modalities=("t1", "flair"))
  assert sorted(collections.Counter(subset.values()).values()) == [11, 12]
  with pytest.raises(UserError):
    dataset.assign_modalities(ids, seed=7, modalities=("t1", "dwi"))


# ---------------------------------------------------------------------------------------------
# The slice set.


def test_build_slice_set(cases):
  assignment = dataset.assign_modalities([c.case_id for c in cases], seed=0, modalities=MODALITIES)
  calls = []
  slices = dataset.build_slice_set(cases, assignment=assignment, size=(16, 8), clip=5.0,
                                   tumour_free_fraction=0.0, seed=0,
                                   progress=lambda *args: calls.append(args))
  assert calls == [(i + 1, 6, case.case_id) for i, case in enumerate(cases)]
  # Fraction 0: exactly the tumour slices, all of them.
  assert len(slices) == 6 * len(TUMOUR_SLICES)
  assert slices.images.shape == (18, 16, 8, 1) and slices.images.dtype == np.float32
  assert slices.regions.shape == (18, 16, 8, 3) and slices.regions.dtype == np.uint8
  assert slices.modality.dtype == np.int32 and slices.case_index.dtype == np.int32
  assert slices.case_ids == [c.case_id for c in cases]
  assert np.all(slices.regions.any(axis=(1, 2, 3)))
  for index, case_id in enumerate(slices.case_ids):
    mine = slices.case_index == index
    assert mine.sum() == len(TUMOUR_SLICES)
    assert np.all(slices.modality[mine] == MODALITIES.index(assignment[case_id]))
  # The images are the assigned modality's (z-scored) slices: background stays 0.
  assert np.all(slices.images[:, 0] == 0)
  assert slices.regions[..., 0].sum() == 6 * 11 and slices.regions[..., 2].sum() == 6


def test_build_slice_set_tumour_free_fraction(cases):
  assignment = dict.fromkeys((c.case_id for c in cases), "flair")
  kwargs = dict(assignment=assignment, size=(12, 10), clip=5.0, seed=1)
  full = dataset.build_slice_set(cases, tumour_free_fraction=1.0, **kwargs)
  brain_slices = SHAPE[2] - len(NO_BRAIN_SLICES)
  assert len(full) == 6 * brain_slices  # slices without brain are always dropped
  half = dataset.build_slice_set(cases, tumour_free_fraction=0.5, **kwargs)
  tumour_free = brain_slices - len(TUMOUR_SLICES)  # 3 per case -> round(1.5) = 2
  assert len(half) == 6 * (len(TUMOUR_SLICES) + 2)
  again = dataset.build_slice_set(cases, tumour_free_fraction=0.5, **kwargs)
  np.testing.assert_array_equal(half.images, again.images)
  # A case's choice does not depend on the other cases.
  alone = dataset.build_slice_set(cases[3:4], tumour_free_fraction=0.5, **kwargs)
  np.testing.assert_array_equal(alone.images, half.images[half.case_index == 3])
  assert tumour_free == 3


def test_build_slice_set_errors(cases, tmp_path):
  _write_case(tmp_path / "unlabelled", seed=9, with_label=False)
  (unlabelled,) = readers.find_cases(tmp_path / "unlabelled")
  with pytest.raises(UserError, match="unlabelled"):
    dataset.build_slice_set([unlabelled], assignment={"unlabelled": "t1"}, size=(8, 8),
                            clip=5.0, tumour_free_fraction=0.1, seed=0)
  with pytest.raises(UserError, match="no modality assigned"):
    dataset.build_slice_set(cases, assignment={}, size=(8, 8), clip=5.0,
                            tumour_free_fraction=0.1, seed=0)
  # No tumour anywhere and no tumour-free slices wanted: nothing left.
  _write_case(tmp_path / "healthy", seed=10, tumour=False)
  (healthy,) = readers.find_cases(tmp_path / "healthy")
  with pytest.raises(UserError, match="no training slices"):
    dataset.build_slice_set([healthy], assignment={"healthy": "t2"}, size=(8, 8), clip=5.0,
                            tumour_free_fraction=0.0, seed=0)
  assert len(dataset.build_slice_set([healthy], assignment={"healthy": "t2"}, size=(8, 8),
                                     clip=5.0, tumour_free_fraction=1.0, seed=0)) == 6


# ---------------------------------------------------------------------------------------------
# The sampler.


def test_batch_indices_pure_and_epoch_complete():
  n, b = 10, 3
  stream = np.concatenate([dataset.batch_indices(seed=5, step=t, batch_size=b, num_examples=n)
                           for t in range(10)])
  for epoch in range(3):
    chunk = stream[epoch * n:(epoch + 1) * n]
    assert sorted(chunk.tolist()) == list(range(n))  # each example exactly once per epoch
    np.testing.assert_array_equal(chunk, np.random.default_rng([5, epoch]).permutation(n))
  # Step 3 covers stream positions 9, 10, 11: it straddles epochs 0 and 1.
  perm0 = np.random.default_rng([5, 0]).permutation(n)
  perm1 = np.random.default_rng([5, 1]).permutation(n)
  straddle = dataset.batch_indices(seed=5, step=3, batch_size=b, num_examples=n)
  assert straddle.tolist() == [perm0[9], perm1[0], perm1[1]]
  # Pure: asking again, or out of order (a resumed run), gives the same batch.
  assert dataset.batch_indices(seed=5, step=7, batch_size=b, num_examples=n).tolist() == (
      stream[21:24].tolist())
  assert not np.array_equal(
      dataset.batch_indices(seed=6, step=0, batch_size=10, num_examples=n), stream[:10])


def test_batch_indices_batch_larger_than_dataset():
  batch = dataset.batch_indices(seed=1, step=1, batch_size=7, num_examples=3)
  expected = np.concatenate([np.random.default_rng([1, e]).permutation(3) for e in range(5)])
  np.testing.assert_array_equal(batch, expected[7:14])
  with pytest.raises(ValueError):
    dataset.batch_indices(seed=1, step=-1, batch_size=7, num_examples=3)


def test_get_batch(cases):
  assignment = dataset.assign_modalities([c.case_id for c in cases], seed=0, modalities=MODALITIES)
  slices = dataset.build_slice_set(cases, assignment=assignment, size=(16, 8), clip=5.0,
                                   tumour_free_fraction=0.5, seed=0)
  batch = dataset.get_batch(slices, seed=2, step=4, batch_size=5)
  assert batch["image"].shape == (5, 16, 8, 1) and batch["image"].dtype == np.float32
  assert batch["regions"].shape == (5, 16, 8, 3) and batch["regions"].dtype == np.float32
  assert batch["modality"].shape == (5,) and batch["modality"].dtype == np.int32
  index = dataset.batch_indices(seed=2, step=4, batch_size=5, num_examples=len(slices))
  np.testing.assert_array_equal(batch["image"], slices.images[index])
  np.testing.assert_array_equal(batch["regions"], slices.regions[index])
  np.testing.assert_array_equal(batch["modality"], slices.modality[index])
