"""The training set (UAGAN's unpaired protocol, or every modality) and its pure, resumable sampler.

Protocols (``data.protocol``, `PROTOCOLS`): cases are split into train/val/test (`split_cases`;
with ``data.folds`` K > 0, `split_fold`: the same test split, the other cases in K folds of
cross-validation, fold k validating); then
* ``unpaired`` (UAGAN's): each training case is assigned one modality by a seeded round-robin,
  and only that modality's slices enter the training set, so no two modalities of one patient
  are ever seen together;
* ``all``: every modality of every training case enters the training set.
The sampler is a pure function of (seed, step), so a run resumed from a checkpoint at step t
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from uagan_jax.data import MODALITIES
from uagan_jax.errors import UserError

# Stream tags keep the split, assignment and slice-selection generators independent for the
# same user seed (batch_indices uses [seed, epoch], epochs never reach these values).
_SPLIT_STREAM = 0x5350_4C54
_ASSIGN_STREAM = 0x4153_5347
_SLICES_STREAM = 0x534C_4943
_FOLDS_STREAM = 0x464F_4C44

# data.protocol: which modalities of a training case enter the training set.
PROTOCOLS = ("unpaired", "all")


def _check_seed(seed: int) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UserError(f"seed {seed!r}: expected a non-negative integer")
  return int(seed)


def _sorted_unique(case_ids: Sequence[str]) -> list[str]:
  ids = sorted(case_ids)
  for a, b in zip(ids, ids[1:]):
    if a == b:
      raise UserError(f"case id {a!r} appears twice")
  return ids


def split_cases(case_ids: Sequence[str], *, seed: int, val_fraction: float,
                test_fraction: float) -> dict[str, list[str]]:
  """Splits cases into train, val and test, deterministically.

  Rule: the sorted ids are permuted with a generator seeded by `seed`; the first n_test go to
  test, the next n_val to val, the rest to train, where n_test = round(test_fraction * n) and
  n_val = round(val_fraction * n) (halves round up), then adjusted for small n:
  * n >= 2: at least 1 test case and at least 1 train case;
  * n >= 3 and val_fraction > 0: at least 1 val case;
  * if the fractions leave no train case, val shrinks first, then test.
  A single case goes to train; no cases give three empty lists.

  Args:
    case_ids: Distinct case ids (any order; the result depends only on the set).
    seed: Non-negative integer.
    val_fraction: Fraction in [0, 1) of cases for validation.
    test_fraction: Fraction in [0, 1) of cases for test.

  Returns:
    {"train": [...], "val": [...], "test": [...]}, each list sorted.
  """
  seed = _check_seed(seed)
  for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    if not 0 <= value < 1:
      raise UserError(f"{name} {value}: expected a fraction in [0, 1)")
  if val_fraction + test_fraction >= 1:
    raise UserError(f"val_fraction {val_fraction} + test_fraction {test_fraction}: must leave "
                    "cases for training (sum below 1)")
  ids = _sorted_unique(case_ids)
  n = len(ids)
  n_test = math.floor(test_fraction * n + 0.5)
  n_val = math.floor(val_fraction * n + 0.5)
  if n >= 2:
    n_test = max(n_test, 1)
  if n >= 3 and val_fraction > 0:
    n_val = max(n_val, 1)
  # Keep at least one training case: give up validation before test.
  excess = n_test + n_val - max(n - 1, 0)
  if excess > 0:
    cut = min(excess, n_val)
    n_val -= cut
    n_test -= excess - cut
  order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
  shuffled = [ids[i] for i in order]
  return {
      "train": sorted(shuffled[n_test + n_val:]),
      "val": sorted(shuffled[n_test:n_test + n_val]),
      "test": sorted(shuffled[:n_test]),
  }


def split_fold(case_ids: Sequence[str], *, seed: int, test_fraction: float, folds: int,
               fold: int) -> dict[str, list[str]]:
  """Fold ``fold`` of a ``folds``-fold cross-validation: its train, val and test, deterministically.

  nnU-Net's way: the test split is the one `split_cases` gives for this seed and
  ``test_fraction`` (it does not depend on ``val_fraction``, which folds ignore), and stays out
  of every fold; the sorted other cases are permuted with a generator seeded by `seed` (a
  stream of its own) and cut into ``folds`` consecutive parts of near-equal size (the first
  n % folds parts one case larger, as `numpy.array_split` cuts). Fold k validates on part k and
  trains on the other parts, so each non-test case is validated on by exactly one fold.

  Args:
    case_ids: Distinct case ids (the result depends only on the set).
    seed: Non-negative integer.
    test_fraction: Fraction in [0, 1) of cases for test.
    folds: The number of folds K, >= 2.
    fold: Which fold, 0 .. K - 1.

  Returns:
    {"train": [...], "val": [...], "test": [...]}, each list sorted.

  Raises:
    UserError: K < 2, fold out of range, or fewer non-test cases than folds.
  """
  if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
    raise UserError(f"folds {folds!r}: expected an integer >= 2")
  if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < folds:
    raise UserError(f"fold {fold!r}: expected an integer in 0..{folds - 1} (folds {folds})")
  test = split_cases(case_ids, seed=seed, val_fraction=0.0, test_fraction=test_fraction)["test"]
  held = set(test)
  rest = [case_id for case_id in _sorted_unique(case_ids) if case_id not in held]
  if len(rest) < folds:
    raise UserError(f"folds {folds}: only {len(rest)} case(s) outside the test split of "
                    f"{len(test)}; each fold needs at least one to validate on")
  order = np.random.default_rng([_check_seed(seed), _FOLDS_STREAM]).permutation(len(rest))
  parts = np.array_split(order, folds)
  val = sorted(rest[i] for i in parts[fold])
  chosen = set(val)
  return {"train": [c for c in rest if c not in chosen], "val": val, "test": test}


def assign_modalities(case_ids: Sequence[str], *, seed: int,
                      modalities: Sequence[str]) -> dict[str, str]:
  """Assigns each case the one modality it contributes (the UAGAN unpaired protocol).

  The sorted ids are permuted with a generator seeded by `seed`; the i-th case of the
  permutation gets modalities[i % len(modalities)], so the modality counts differ by at most 1.

  Args:
    case_ids: Distinct case ids (the result depends only on the set).
    seed: Non-negative integer.
    modalities: Distinct names from `MODALITIES`.

  Returns:
    case id -> modality, in sorted case id order.
  """
  seed = _check_seed(seed)
  modalities = tuple(modalities)
  if (not modalities or len(set(modalities)) != len(modalities)
      or any(m not in MODALITIES for m in modalities)):
    raise UserError(f"modalities {list(modalities)}: expected distinct names from "
                    f"{list(MODALITIES)}")
  ids = _sorted_unique(case_ids)
  order = np.random.default_rng([seed, _ASSIGN_STREAM]).permutation(len(ids))
  assignment = {ids[case]: modalities[i % len(modalities)] for i, case in enumerate(order)}
  return {case_id: assignment[case_id] for case_id in ids}


def training_modalities(case_modalities: Mapping[str, Sequence[str]], *, seed: int,
                        modalities: Sequence[str], protocol: str) -> dict[str, tuple[str, ...]]:
  """The modalities each training case contributes under ``protocol``.

  Args:
    case_modalities: training case id -> the modalities it has images of.
    seed: Non-negative integer.
    modalities: Distinct names from `MODALITIES` (``data.modalities``).
    protocol: "unpaired": the one modality `assign_modalities` gives the case (the result does
      not depend on ``case_modalities``' values); "all": each of ``modalities`` the case has.

  Returns:
    case id -> modalities in canonical (`MODALITIES`) order, in sorted case id order.
  """
  if protocol == "unpaired":
    assignment = assign_modalities(list(case_modalities), seed=seed, modalities=modalities)
    return {case_id: (name,) for case_id, name in assignment.items()}
  if protocol != "all":
    raise UserError(f"config data.protocol={protocol!r}: use {' or '.join(PROTOCOLS)}")
  _check_seed(seed)
  return {case_id: tuple(m for m in MODALITIES if m in modalities and m in case_modalities[case_id])
          for case_id in _sorted_unique(list(case_modalities))}


@dataclasses.dataclass(frozen=True)
class SliceIndex:
  """The training slices: which case, which axial slice, which modality.

  The slices themselves stay in the cache (`uagan_jax.data.cache`) and are read per batch, so
  memory does not grow with the data set.

  Attributes:
    case_index: int32 (N,) index into case_ids.
    z: int32 (N,) the axial slice.
    modality: int32 (N,) index into `MODALITIES`.
    case_ids: The cases, in the order they were added.
  """
  case_index: np.ndarray
  z: np.ndarray
  modality: np.ndarray
  case_ids: list[str]

  def __len__(self) -> int:
    return int(self.z.shape[0])


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
  # Keyed by the id, not the position, so a case's slice choice does not change when other
  # cases are added or removed.
  return np.random.default_rng([seed, _SLICES_STREAM, zlib.crc32(case_id.encode("utf-8"))])


def select_slices(case_id: str, has_brain: np.ndarray, tumour: np.ndarray, *,
                  tumour_free_fraction: float, seed: int) -> np.ndarray:
  """The axial slices of one case that train: every slice with brain and tumour, plus
  round(tumour_free_fraction * m) of its m tumour-free brain slices, chosen without replacement
  by a generator seeded by (seed, case id); sorted."""
  free = np.flatnonzero(has_brain & ~tumour)
  n_free = math.floor(tumour_free_fraction * free.size + 0.5)
  chosen = _case_rng(seed, case_id).choice(free, size=n_free, replace=False)
  keep = np.flatnonzero(has_brain & tumour)
  return np.sort(np.concatenate([keep, chosen]))


def build_slice_index(
    cases: Sequence, *, assignment: Mapping[str, str | Sequence[str]], size: tuple[int, int],
    tumour_free_fraction: float, seed: int,
    progress: Callable[[int, int, str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> SliceIndex:
  """Each training case's informative slices of each modality it contributes (`select_slices`).

  A slice has tumour when a tumour voxel lies inside its centre crop to ``size`` (what the
  network sees); it has brain when the modality has a non-zero voxel. The tumour-free slices of
  a case are drawn from its (seed, case id) generator afresh for each modality, so a modality's
  slices do not depend on which other modalities the case contributes.

  Args:
    cases: Prepared training cases (`cache.CachedCase`), each with a label.
    assignment: case id -> its modality (`assign_modalities`, the unpaired protocol) or its
      modalities (`training_modalities`).
    size: Slice (H, W).
    tumour_free_fraction: Fraction in [0, 1] of tumour-free brain slices to keep.
    seed: Non-negative integer.
    progress: Called as progress(done, total, case_id) after each case.
    warn: Called with one line for each case that contributes no slice, naming it and why.

  Returns:
    The `SliceIndex`, slices in case order, then modality order, then axial order.

  Raises:
    UserError: A case lacks a label or an assignment, or no slice is left.
  """
  seed = _check_seed(seed)
  if not 0 <= tumour_free_fraction <= 1:
    raise UserError(f"tumour_free_fraction {tumour_free_fraction}: expected a fraction in "
                    "[0, 1]")
  if not cases:
    raise UserError("no training cases")
  zs, modality, case_index, case_ids = [], [], [], []
  for number, case in enumerate(cases):
    if case.case_id not in assignment:
      raise UserError(f"case {case.case_id}: no modality assigned")
    names = assignment[case.case_id]
    names = (names,) if isinstance(names, str) else tuple(names)
    if case.meta["label"] is None:
      # Any image of the case names its folder (the sources list the images first).
      folder = pathlib.Path(next(iter(case.meta["sources"].values()))["path"]).parent
      raise UserError(f"{folder}: case {case.case_id} has no label volume; training needs one")
    index = len(case_ids)
    case_ids.append(case.case_id)
    tumour = case.tumour_in_view(size=size)
    for name in names:
      has_brain = case.has_brain(name)
      keep = select_slices(case.case_id, has_brain, tumour,
                           tumour_free_fraction=tumour_free_fraction, seed=seed)
      if keep.size == 0 and warn is not None:
        why = (f"{case.meta['sources'][name]['path']}: every voxel is 0 (empty or a failed "
               "conversion)" if not has_brain.any() else
               f"no {name} slice has both brain and tumour inside the {size[0]}x{size[1]} view, "
               f"and tumour_free_fraction={tumour_free_fraction} keeps none of the tumour-free "
               "ones")
        warn(f"case {case.case_id} contributes no training slice: {why}")
      zs.append(keep.astype(np.int32))
      modality.append(np.full(keep.size, MODALITIES.index(name), np.int32))
      case_index.append(np.full(keep.size, index, np.int32))
    if progress is not None:
      progress(number + 1, len(cases), case.case_id)
  total = sum(len(m) for m in modality)
  if total == 0:
    raise UserError(f"no training slices left from {len(cases)} cases (no slice has brain and "
                    f"tumour, and tumour_free_fraction={tumour_free_fraction} kept none)")
  return SliceIndex(case_index=np.concatenate(case_index), z=np.concatenate(zs),
                    modality=np.concatenate(modality), case_ids=case_ids)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False  # shared through the cache
  return perm


def batch_indices(*, seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
  """The example indices of the batch at `step`, a pure function of its arguments.

  The example stream is epoch after epoch of permutations perm_e =
  default_rng([seed, e]).permutation(num_examples); the batch at step t is positions
  t * batch_size .. (t + 1) * batch_size - 1 of that stream, so a batch may straddle an epoch
  boundary (or span several epochs when batch_size > num_examples).

  Args:
    seed: Non-negative integer.
    step: Non-negative step number.
    batch_size: Examples per batch.
    num_examples: Size of the dataset.

  Returns:
    int64 (batch_size,) indices into the dataset.
  """
  seed = _check_seed(seed)
  if step < 0 or batch_size < 1 or num_examples < 1:
    raise ValueError(f"need step >= 0, batch_size >= 1, num_examples >= 1; got {step}, "
                     f"{batch_size}, {num_examples}")
  start = int(step) * int(batch_size)
  epoch, offset = divmod(start, num_examples)
  parts, needed = [], batch_size
  while needed > 0:
    perm = _epoch_permutation(seed, epoch, num_examples)
    part = perm[offset:offset + needed]
    parts.append(part)
    needed -= part.size
    epoch, offset = epoch + 1, 0
  return np.concatenate(parts).astype(np.int64)
