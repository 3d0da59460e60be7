"""Tests for uagan_jax.data.dataset: splits, the unpaired assignment, the slice index, the sampler."""

import collections
import pathlib
import re

import nibabel as nib
import numpy as np
import pytest

from uagan_jax.data import MODALITIES
from uagan_jax.data import cache
from uagan_jax.data import dataset
from uagan_jax.data import preprocess
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


def test_split_cases_pinned():
  # The plain split of today (data.folds 0), pinned: folds must not move it.
  split = dataset.split_cases([f"c{i}" for i in range(10)], seed=0, val_fraction=0.1,
                              test_fraction=0.2)
  assert split == {"train": ["c1", "c2", "c3", "c4", "c5", "c6", "c9"], "val": ["c7"],
                   "test": ["c0", "c8"]}


def test_split_fold_pinned_small_case():
  # 10 cases, test 2 (c0, c8: the plain split's); the 8 others in 3 folds of 3, 3 and 2.
  ids = [f"c{i}" for i in range(10)]
  folds = [dataset.split_fold(ids, seed=0, test_fraction=0.2, folds=3, fold=k) for k in range(3)]
  assert [f["val"] for f in folds] == [["c2", "c6", "c7"], ["c3", "c4", "c5"], ["c1", "c9"]]
  assert folds[2]["train"] == ["c2", "c3", "c4", "c5", "c6", "c7"]
  assert all(f["test"] == ["c0", "c8"] for f in folds)


@pytest.mark.parametrize("n, k", [(80, 5), (80, 3), (23, 4), (7, 2), (12, 9)])
def test_split_fold_partitions_the_non_test_cases(n, k):
  ids = [f"case{i:03d}" for i in range(n)]
  plain = dataset.split_cases(ids, seed=5, val_fraction=0.1, test_fraction=0.2)
  folds = [dataset.split_fold(ids, seed=5, test_fraction=0.2, folds=k, fold=f) for f in range(k)]
  rest = sorted(set(ids) - set(plain["test"]))
  vals = [case for f in folds for case in f["val"]]
  assert sorted(vals) == rest  # every non-test case validated on by exactly one fold
  sizes = [len(f["val"]) for f in folds]
  assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
  for f in folds:
    assert f["test"] == plain["test"]  # the test split of the plain split, in every fold
    assert sorted(f["train"] + f["val"]) == rest
    assert not set(f["train"]) & set(f["val"])
    assert all(part == sorted(part) for part in f.values())


def test_split_fold_test_split_does_not_depend_on_val_fraction():
  ids = [f"c{i}" for i in range(4)]
  for val in (0.0, 0.1, 0.45):  # 0.45 + 0.45 makes the plain split shrink val, never test
    plain = dataset.split_cases(ids, seed=1, val_fraction=val, test_fraction=0.45)
    assert plain["test"] == dataset.split_fold(ids, seed=1, test_fraction=0.45, folds=2,
                                               fold=0)["test"]


def test_split_fold_deterministic_and_seeded():
  ids = [f"c{i:02d}" for i in range(40)]
  fold = dataset.split_fold(ids, seed=2, test_fraction=0.2, folds=4, fold=1)
  assert dataset.split_fold(ids[::-1], seed=2, test_fraction=0.2, folds=4, fold=1) == fold
  assert dataset.split_fold(ids, seed=3, test_fraction=0.2, folds=4, fold=1) != fold


@pytest.mark.parametrize("folds, fold, needle", [
    (1, 0, "folds 1"), (0, 0, "folds 0"), (3, 3, "fold 3"), (3, -1, "fold -1"),
    (7, 0, "only 6 case(s)"),  # 7 cases, 1 test: 6 left for 7 folds
])
def test_split_fold_errors(folds, fold, needle):
  with pytest.raises(UserError, match=re.escape(needle)):
    dataset.split_fold([f"c{i}" for i in range(7)], seed=0, test_fraction=0.2, folds=folds,
                       fold=fold)


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


def test_training_modalities_unpaired_is_the_one_assigned_modality():
  ids = [f"case_{i:03d}" for i in range(9)]
  has = {case_id: MODALITIES for case_id in ids}
  chosen = dataset.training_modalities(has, seed=7, modalities=MODALITIES, protocol="unpaired")
  assignment = dataset.assign_modalities(ids, seed=7, modalities=MODALITIES)
  assert chosen == {case_id: (assignment[case_id],) for case_id in ids}
  assert list(chosen) == ids


def test_training_modalities_all_is_every_modality_the_case_has_in_canonical_order():
  has = {"b": ("flair", "t1", "t2", "t1ce"), "a": ("t2", "flair"), "c": ("t1",)}
  everything = dataset.training_modalities(has, seed=3, modalities=MODALITIES, protocol="all")
  assert everything == {"a": ("t2", "flair"), "b": MODALITIES, "c": ("t1",)}
  assert list(everything) == ["a", "b", "c"]  # sorted case order, whatever the input order
  # Only data.modalities train; the seed changes nothing (there is nothing to draw).
  subset = dataset.training_modalities(has, seed=4, modalities=("flair", "t1"), protocol="all")
  assert subset == {"a": ("flair",), "b": ("t1", "flair"), "c": ("t1",)}
  with pytest.raises(UserError, match="data.protocol='paired'"):
    dataset.training_modalities(has, seed=3, modalities=MODALITIES, protocol="paired")


# ---------------------------------------------------------------------------------------------
# The slice set.


def _cached(cases, cache_dir):
  """The cases prepared into ``cache_dir`` (`cache.CachedCase`), in order."""
  cache.prepare(None, cache_dir, cases=cases, workers=1, log=lambda _: None)
  return [cache.open_case(cache_dir, c) for c in cases]


def test_build_slice_index(cases, tmp_path):
  cached = _cached(cases, tmp_path / "cache")
  assignment = dataset.assign_modalities([c.case_id for c in cases], seed=0, modalities=MODALITIES)
  calls = []
  index = dataset.build_slice_index(cached, assignment=assignment, size=(16, 8),
                                    tumour_free_fraction=0.0, seed=0,
                                    progress=lambda *args: calls.append(args))
  assert calls == [(i + 1, 6, case.case_id) for i, case in enumerate(cases)]
  # Fraction 0: exactly the tumour slices, all of them.
  assert len(index) == 6 * len(TUMOUR_SLICES)
  assert index.z.dtype == index.modality.dtype == index.case_index.dtype == np.int32
  assert index.case_ids == [c.case_id for c in cases]
  for number, case_id in enumerate(index.case_ids):
    mine = index.case_index == number
    assert index.z[mine].tolist() == list(TUMOUR_SLICES)
    assert np.all(index.modality[mine] == MODALITIES.index(assignment[case_id]))


def test_build_slice_index_tumour_free_fraction(cases, tmp_path):
  cached = _cached(cases, tmp_path / "cache")
  assignment = dict.fromkeys((c.case_id for c in cases), "flair")
  kwargs = dict(assignment=assignment, size=(12, 10), seed=1)
  full = dataset.build_slice_index(cached, tumour_free_fraction=1.0, **kwargs)
  brain_slices = SHAPE[2] - len(NO_BRAIN_SLICES)
  assert len(full) == 6 * brain_slices  # slices without brain are always dropped
  assert not set(full.z.tolist()) & set(NO_BRAIN_SLICES)
  half = dataset.build_slice_index(cached, tumour_free_fraction=0.5, **kwargs)
  tumour_free = brain_slices - len(TUMOUR_SLICES)  # 3 per case -> round(1.5) = 2
  assert tumour_free == 3
  assert len(half) == 6 * (len(TUMOUR_SLICES) + 2)
  again = dataset.build_slice_index(cached, tumour_free_fraction=0.5, **kwargs)
  np.testing.assert_array_equal(half.z, again.z)
  # A case's choice does not depend on the other cases.
  alone = dataset.build_slice_index(cached[3:4], tumour_free_fraction=0.5, **kwargs)
  np.testing.assert_array_equal(alone.z, half.z[half.case_index == 3])


def test_build_slice_index_with_every_modality_is_the_union_of_the_single_modality_indexes(
    cases, tmp_path):
  """Under data.protocol all a case contributes each modality's slices, exactly the slices it
  would contribute with that modality alone (the same tumour-free choice), case by case, in
  modality order."""
  cached = _cached(cases, tmp_path / "cache")
  ids = [c.case_id for c in cases]
  every = dataset.training_modalities({i: MODALITIES for i in ids}, seed=2, modalities=MODALITIES,
                                      protocol="all")
  kwargs = dict(size=(12, 10), tumour_free_fraction=0.5, seed=2)
  index = dataset.build_slice_index(cached, assignment=every, **kwargs)
  assert index.case_ids == ids
  single = {m: dataset.build_slice_index(cached, assignment=dict.fromkeys(ids, m), **kwargs)
            for m in MODALITIES}
  assert len(index) == sum(len(one) for one in single.values())
  for number in range(len(ids)):
    mine = index.case_index == number
    # Modality after modality, each in axial order.
    assert index.modality[mine].tolist() == sorted(index.modality[mine].tolist())
    for m in MODALITIES:
      of_m = mine & (index.modality == MODALITIES.index(m))
      np.testing.assert_array_equal(index.z[of_m],
                                    single[m].z[single[m].case_index == number])
  # Which (case, modality) pairs entered: all 6 x 4.
  assert {(int(c), int(m)) for c, m in zip(index.case_index, index.modality)} == {
      (c, m) for c in range(len(ids)) for m in range(len(MODALITIES))}
  # A string is one modality, as a one-element tuple is.
  one = dataset.assign_modalities(ids, seed=2, modalities=MODALITIES)
  as_str = dataset.build_slice_index(cached, assignment=one, **kwargs)
  as_tuple = dataset.build_slice_index(cached, assignment={i: (m,) for i, m in one.items()},
                                       **kwargs)
  for name in ("case_index", "z", "modality"):
    np.testing.assert_array_equal(getattr(as_str, name), getattr(as_tuple, name))


def test_a_tumour_outside_the_crop_is_no_tumour_slice(tmp_path):
  """What the network sees decides: a crop that cuts the tumour away makes the slice
  tumour-free, exactly as on the direct read (`preprocess.volume_to_slices`)."""
  _write_case(tmp_path / "data" / "edge", seed=3)
  (case,) = readers.find_cases(tmp_path / "data")
  (cached,) = _cached([case], tmp_path / "cache")
  volume = readers.load_case(case)
  regions = readers.labels_to_regions(volume.label, convention=case.label_convention)
  seen = []
  for size in ((1, 1), (2, 2), (3, 2), (4, 20), (12, 10), (30, 1)):
    _, region_slices, _, _ = preprocess.volume_to_slices(volume.images["t1"], regions, size=size,
                                                         clip=5.0)
    expected = region_slices.any(axis=(1, 2, 3))
    np.testing.assert_array_equal(cached.tumour_in_view(size=size), expected)
    seen.append(expected[list(TUMOUR_SLICES)].tolist())
  # The tumour lies at x 4..6, y 3..5; a 1x1 centre crop keeps (5, 4): slices 2 and 3 only.
  assert seen[0] == [True, True, False]
  assert seen[4] == [True, True, True]


def test_build_slice_index_errors(cases, tmp_path):
  _write_case(tmp_path / "unlabelled", seed=9, with_label=False)
  (unlabelled,) = _cached(readers.find_cases(tmp_path / "unlabelled"), tmp_path / "c1")
  with pytest.raises(UserError, match="unlabelled has no label volume"):
    dataset.build_slice_index([unlabelled], assignment={"unlabelled": "t1"}, size=(8, 8),
                              tumour_free_fraction=0.1, seed=0)
  cached = _cached(cases, tmp_path / "c2")
  with pytest.raises(UserError, match="no modality assigned"):
    dataset.build_slice_index(cached, assignment={}, size=(8, 8), tumour_free_fraction=0.1,
                              seed=0)
  # No tumour anywhere and no tumour-free slices wanted: nothing left.
  _write_case(tmp_path / "healthy", seed=10, tumour=False)
  healthy = _cached(readers.find_cases(tmp_path / "healthy"), tmp_path / "c3")
  with pytest.raises(UserError, match="no training slices"):
    dataset.build_slice_index(healthy, assignment={"healthy": "t2"}, size=(8, 8),
                              tumour_free_fraction=0.0, seed=0)
  assert len(dataset.build_slice_index(healthy, assignment={"healthy": "t2"}, size=(8, 8),
                                       tumour_free_fraction=1.0, seed=0)) == 6


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
