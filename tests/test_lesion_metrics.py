"""Lesion-wise BraTS 2023+ metrics: connected components against scipy, the matching and penalty
rules by hand, and the project's global and lesion-wise numbers against those the official toolkit
(brats-evaluation 0.0.10 on panoptica 2.1.7) printed for the same prediction/truth pairs.

The toolkit is not needed here: its numbers are stored below. They were printed by

  python benchmarks/brats_toolkit.py --real CASE_DIR    # CASE_DIR: the UPENN-GBM-00003_11 case

which builds the pairs with the functions this test imports (`synthetic_pairs`, `real_pairs`),
runs the toolkit in its own environment (.venv-brats) and prints both sides.
"""

import importlib.util
import math
import time

import numpy as np
import pytest
import scipy.ndimage
import scipy.optimize

from uagan_jax import evaluate, metrics
from uagan_jax.data import REGIONS, readers

from conftest import REAL_CASE, ROOT

NAN, INF = math.nan, math.inf
PENALTY = metrics.LESION_HD95_PENALTY_MM

_spec = importlib.util.spec_from_file_location("brats_toolkit",
                                               ROOT / "benchmarks" / "brats_toolkit.py")
brats_toolkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(brats_toolkit)

# Printed by `python benchmarks/brats_toolkit.py --real CASE_DIR` (the "toolkit" entries): per pair
# and region, (global Dice, global HD95, lesion-wise Dice, lesion-wise HD95 (parse_mets_results,
# volume threshold 20), matched-pair Dice, matched-pair HD95 (parse_seg_results' lesionwise_*_mean,
# Panoptica's sq_dsc, sq_hd95), TP, FP, FN lesions). The toolkit writes a global HD95 of inf as 373.
REFERENCE = {
    "several_lesions": {
        "WT": (0.756572295247725, 23.727621035409346, 0.39447369114604613, 187.61803398874991,
               0.7889473822920923, 2.23606797749979, 2, 1, 2),
        "TC": (0.6768534238822863, 30.033314835362415, 0.47705272421181516, 125.71781472845828,
               0.7155790863177227, 2.076722092687429, 2, 1, 1),
        "ET": (0.5203588681849551, 29.246356167296707, 0.357399171323222, 125.66666666666667,
               0.536098756984833, 2, 2, 1, 1),
    },
    "merged_and_split": {
        "WT": (0.5823754789272031, 4.898979485566356, 0.2093809528319714, 192.46074487943872,
               0.4187619056639428, 11.92148975887743, 2, 1, 1),
        "TC": (0.7104895104895105, 2, 0.21598639455782312, 189.5,
               0.43197278911564624, 6, 1, 1, 0),
        "ET": (0.7662337662337663, 2, 0.23694779116465864, 189.42314560089181,
               0.4738955823293173, 5.846291201783626, 1, 1, 0),
    },
    "empty_prediction": {
        "WT": (0, 373, 0, 373,
               0, INF, 0, 0, 4),
        "TC": (0, 373, 0, 373,
               0, INF, 0, 0, 3),
        "ET": (0, 373, 0, 373,
               0, INF, 0, 0, 3),
    },
    "empty_truth": {
        "WT": (0, 373, NAN, NAN,
               0, INF, 0, 3, 0),
        "TC": (0, 373, NAN, NAN,
               0, INF, 0, 3, 0),
        "ET": (0, 373, NAN, NAN,
               0, INF, 0, 3, 0),
    },
    "both_empty": {
        "WT": (NAN, NAN, NAN, NAN,
               NAN, NAN, 0, 0, 0),
        "TC": (NAN, NAN, NAN, NAN,
               NAN, NAN, 0, 0, 0),
        "ET": (NAN, NAN, NAN, NAN,
               NAN, NAN, 0, 0, 0),
    },
    "anisotropic": {
        "WT": (0.7567970204841713, 2.23606797749979, 0.38274931925392786, 187.67811526372805,
               0.7654986385078557, 2.356230527456111, 2, 1, 2),
        "TC": (0.6458684654300169, 2.23606797749979, 0.4437097208786646, 125.83748704214594,
               0.6655645813179969, 2.2562305632188977, 2, 1, 0),
        "ET": (0.47390396659707723, 2, 0.49136056534907196, 2.012461126437796,
               0.49136056534907196, 2.012461126437796, 2, 0, 0),
    },
    "real_shifted_with_blob": {
        "WT": (0.8430143945808637, 3.4641016151377544, 0.42311160384331115, 188.1583123951777,
               0.8462232076866223, 3.3166247903554, 1, 1, 0),
        "TC": (0.8154173830480639, 3.605551275463989, 0.4131689811202996, 188.1583123951777,
               0.8263379622405992, 3.3166247903554, 1, 1, 0),
        "ET": (0.30005135353238943, 3.3166247903554, 0.15591643793839585, 188.0811388300842,
               0.3118328758767917, 3.1622776601683795, 1, 1, 0),
    },
    "real_eroded": {
        "WT": (0.833942360728075, 7.280109889280518, 0.08301818276139342, 336.4549834435271,
               0.8301818276139341, 7.54983443527075, 1, 9, 0),
        "TC": (0.7488530990727184, 3.605551275463989, 0.062295758286378095, 342.21712927295533,
               0.7475490994365371, 3.605551275463989, 1, 11, 0),
        "ET": (0.35947467166979363, 5.196152422706632, 0.013412869653509329, 358.4934725155607,
               0.33532174133773324, 10.336812889018335, 1, 24, 0),
    },
}
FIELDS = ("dice", "hd95", "lesion_dice", "lesion_hd95", "matched_dice", "matched_hd95", "tp", "fp",
          "fn")
REAL_PAIRS = ("real_shifted_with_blob", "real_eroded")


def _same(ours, theirs, tolerance):
  """Equal within ``tolerance``, NaN equal to NaN and inf to inf."""
  if math.isnan(theirs) or math.isinf(theirs):
    return (math.isnan(ours) and math.isnan(theirs)) or ours == theirs
  return abs(ours - theirs) <= tolerance


def _toolkit_spacings(spacing):
  """The spacings the toolkit 0.0.10 actually measures with, reading a NIfTI path.

  It reads the file with SimpleITK, whose array axes are (z, y, x) while its spacing is (x, y, z),
  as float32 from the header: the per-lesion HD95 and the volumes see the spacing reversed against
  the axes; the global HD95 is computed without any spacing (voxel units). On 1 mm isotropic grids
  (BraTS, UPENN) both are the true spacing.
  """
  return (1.0,) * len(spacing), tuple(float(np.float32(s)) for s in reversed(spacing))


def _check_pair(name, predicted_labels, true_labels, spacing):
  predicted = readers.labels_to_regions(predicted_labels, convention="brats2023")
  truth = readers.labels_to_regions(true_labels, convention="brats2023")
  global_spacing, lesion_spacing = _toolkit_spacings(spacing)
  isotropic = len(set(spacing)) == 1 and spacing[0] == 1.0
  row = evaluate.score_case(predicted, truth, spacing=spacing)
  for index, region in enumerate(REGIONS):
    reference = dict(zip(FIELDS, REFERENCE[name][region]))
    where = f"{name} {region}"
    p, t = predicted[..., index], truth[..., index]
    lesions = metrics.lesion_metrics(p, t, spacing=lesion_spacing)
    ours = {
        "dice": row[f"dice_{region}"],
        "hd95": metrics.pooled_hd95(p, t, spacing=global_spacing),
        "lesion_dice": lesions["lesion_dice"],
        "lesion_hd95": lesions["lesion_hd95"],
        "matched_dice": lesions["matched_dice"],
        "matched_hd95": lesions["matched_hd95"],
        "tp": lesions["true_positives"],
        "fp": lesions["false_positives"],
        "fn": lesions["false_negatives"],
    }
    # Dice: the same integer counts on both sides, so equal to float rounding. HD95: the same
    # surfaces (face-connected erosion), exact Euclidean distances on both sides (ours:
    # metrics.distance_to_mask; Panoptica: scipy's EDT) and the same numpy percentile of the
    # same pooled distances, so equal to float rounding too; 1e-6 mm leaves room for the order
    # of the sums in the two EDTs.
    tolerance = {"dice": 1e-12, "lesion_dice": 1e-12, "matched_dice": 1e-12, "hd95": 1e-6,
                 "lesion_hd95": 1e-6, "matched_hd95": 1e-6, "tp": 0, "fp": 0, "fn": 0}

    # The project's conventions where the toolkit differs (docs/EVALUATION.md):
    if math.isnan(reference["dice"]):  # both empty: the toolkit has NaN, BraTS rules 1 and 0
      assert not p.any() and not t.any(), where
      assert (row[f"dice_{region}"], row[f"hd95_{region}"]) == (1.0, 0.0), where
      assert (ours["lesion_dice"], ours["lesion_hd95"]) == (1.0, 0.0), where
      ours["dice"] = ours["hd95"] = ours["lesion_dice"] = ours["lesion_hd95"] = NAN
    elif reference["hd95"] == 373.0:  # exactly one empty (the toolkit's inf, written 373)
      assert p.any() != t.any(), where
      assert row[f"hd95_{region}"] == metrics.EMPTY_HD95_PENALTY_MM == 374.0, where
      ours["hd95"] = 373.0
    if math.isnan(reference["lesion_dice"]) and not math.isnan(ours["lesion_dice"]):
      # No true lesion counted: the toolkit has NaN; here only false positives remain to score.
      assert lesions["counted_lesions"] == 0 and lesions["false_positives"] > 0, where
      assert (ours["lesion_dice"], ours["lesion_hd95"]) == (0.0, PENALTY), where
      ours["lesion_dice"] = ours["lesion_hd95"] = NAN

    for field in FIELDS:
      assert _same(ours[field], reference[field], tolerance[field]), \
          (where, field, ours[field], reference[field])
    if isotropic:  # evaluate's columns are these numbers (spacing 1 mm on every axis)
      assert row[f"lesion_dice_{region}"] == lesions["lesion_dice"], where
      assert row[f"lesion_hd95_{region}"] == lesions["lesion_hd95"], where


@pytest.mark.parametrize("name", sorted(set(REFERENCE) - set(REAL_PAIRS)))
def test_synthetic_pairs_agree_with_the_official_toolkit(name):
  predicted, truth, spacing = brats_toolkit.synthetic_pairs()[name]
  _check_pair(name, predicted, truth, spacing)


@pytest.mark.skipif(not REAL_CASE.is_dir(), reason="the real UPENN-GBM case is not available")
def test_real_case_pairs_agree_with_the_official_toolkit():
  pairs = brats_toolkit.real_pairs(REAL_CASE)
  assert sorted(pairs) == sorted(REAL_PAIRS)
  for name, (predicted, truth, spacing) in pairs.items():
    assert spacing == (1.0, 1.0, 1.0) and truth.shape == (240, 240, 155)
    _check_pair(name, predicted, truth, spacing)


def test_anisotropic_pair_measures_with_the_true_spacing():
  """Where the toolkit's spacing is off (anisotropic voxels), ours is the true one: the lesion
  HD95 with the true spacing differs from the toolkit's and equals a brute-force computation."""
  predicted_labels, true_labels, spacing = brats_toolkit.synthetic_pairs()["anisotropic"]
  predicted_regions = readers.labels_to_regions(predicted_labels, convention="brats2023")
  true_regions = readers.labels_to_regions(true_labels, convention="brats2023")
  row = evaluate.score_case(predicted_regions, true_regions, spacing=spacing)
  predicted, truth = predicted_regions[..., 2], true_regions[..., 2]
  toolkit_lesion_hd95 = REFERENCE["anisotropic"]["ET"][3]
  assert abs(row["lesion_hd95_ET"] - toolkit_lesion_hd95) > 0.1
  # ET: two true lesions, both matched, no false positive: the mean of two pooled HD95s.
  true_labels_et, _ = scipy.ndimage.label(truth, structure=np.ones((3, 3, 3)))
  predicted_labels_et, _ = scipy.ndimage.label(predicted, structure=np.ones((3, 3, 3)))
  values = []
  for lesion in (1, 2):
    t = true_labels_et == lesion
    overlapping = predicted_labels_et[t & (predicted_labels_et > 0)]
    p = predicted_labels_et == np.bincount(overlapping).argmax()  # its match: one overlaps
    values.append(_brute_force_pooled_hd95(p, t, spacing))
  assert row["lesion_hd95_ET"] == pytest.approx(np.mean(values), abs=1e-9)


def _surface_points(mask, spacing):
  eroded = scipy.ndimage.binary_erosion(mask, border_value=0)
  return np.argwhere(mask & ~eroded) * np.asarray(spacing)


def _brute_force_pooled_hd95(predicted, truth, spacing):
  """medpy/Panoptica's HD95 from all pairwise surface distances (small masks only)."""
  a, b = _surface_points(predicted, spacing), _surface_points(truth, spacing)
  distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


# ------------------------------------------------------------------------------------------------
# Connected components
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, fill", [((40, 36, 30), 0.3), ((40, 36, 30), 0.05),
                                         ((50, 45), 0.45), ((200,), 0.5), ((6, 5, 4, 3), 0.15)])
@pytest.mark.parametrize("full", [True, False])
def test_label_components_is_scipy_label(shape, fill, full):
  mask = np.random.default_rng(len(shape) * 100 + int(fill * 100)).random(shape) < fill
  labels, count = metrics.label_components(mask, full_connectivity=full)
  structure = np.ones((3,) * mask.ndim) if full else None
  expected, expected_count = scipy.ndimage.label(mask, structure=structure)
  assert count == expected_count > 1
  np.testing.assert_array_equal(labels, expected)  # same numbering: raster order


def test_label_components_corner_contact_and_empty():
  mask = np.zeros((4, 4, 4), bool)
  mask[0, 0, 0] = mask[1, 1, 1] = True  # touching at a corner only
  assert metrics.label_components(mask)[1] == 1  # 26-connectivity: one lesion
  assert metrics.label_components(mask, full_connectivity=False)[1] == 2
  labels, count = metrics.label_components(np.zeros((3, 3, 3), bool))
  assert count == 0 and not labels.any() and labels.dtype == np.int32


def test_label_components_is_fast_on_a_brats_volume():
  """A BraTS-sized (240x240x155) volume with a tumour-sized region and scattered specks."""
  rng = np.random.default_rng(0)
  mask = brats_toolkit._ball((240, 240, 155), (120, 110, 80), 30)  # ~113k voxels
  mask |= rng.random(mask.shape) < 0.002  # ~18k isolated or touching specks
  started = time.perf_counter()
  labels, count = metrics.label_components(mask)
  elapsed = time.perf_counter() - started
  expected, expected_count = scipy.ndimage.label(mask, structure=np.ones((3, 3, 3)))
  assert count == expected_count and np.array_equal(labels, expected)
  assert elapsed < 20.0, f"{elapsed:.1f} s"  # seconds, not minutes (2 shared CPU cores)


# ------------------------------------------------------------------------------------------------
# Matching and the lesion-wise rules, by hand
# ------------------------------------------------------------------------------------------------


def _cube(mask, corner, size):
  mask[tuple(slice(c, c + size) for c in corner)] = True


def test_min_cost_assignment_is_optimal():
  rng = np.random.default_rng(0)
  for _ in range(200):
    cost = rng.random(tuple(rng.integers(1, 7, 2)))
    pairs = metrics._min_cost_assignment(cost)  # pylint: disable=protected-access
    rows, columns = zip(*pairs)
    assert len(pairs) == min(cost.shape) and len(set(rows)) == len(set(columns)) == len(pairs)
    best_rows, best_columns = scipy.optimize.linear_sum_assignment(cost)
    assert sum(cost[r, c] for r, c in pairs) == pytest.approx(cost[best_rows, best_columns].sum())


def test_min_cost_assignment_is_optimal_with_ties():
  # Tied costs, as lesion matching produces them (equal Dice, and the 1 + 1e-6 of every pair that
  # does not overlap): the total is still the least (which of the tied assignments is taken is
  # the solver's choice, and scipy's is not always the same).
  rng = np.random.default_rng(1)
  for trial in range(300):
    shape = tuple(rng.integers(1, 9, 2))
    if trial % 2:
      cost = rng.integers(0, 3, shape).astype(float)
    else:
      cost = np.where(rng.random(shape) < 0.3, 1 - rng.integers(1, 4, shape) / 4, 1 + 1e-6)
    pairs = metrics._min_cost_assignment(cost)  # pylint: disable=protected-access
    rows, columns = zip(*pairs)
    assert len(pairs) == min(cost.shape) and len(set(rows)) == len(set(columns)) == len(pairs)
    best_rows, best_columns = scipy.optimize.linear_sum_assignment(cost)
    assert sum(cost[r, c] for r, c in pairs) == pytest.approx(cost[best_rows, best_columns].sum(),
                                                              abs=1e-12)


def _matching_cost(predicted_labels, n_predicted, true_labels, n_true):
  """Panoptica's cost matrix (true lesions x predicted lesions), lesion by lesion."""
  cost = np.full((n_true, n_predicted), 1 + 1e-6)
  for t in range(1, n_true + 1):
    true_lesion = true_labels == t
    for p in np.unique(predicted_labels[true_lesion]):
      if p:
        predicted_lesion = predicted_labels == p
        cost[t - 1, p - 1] = 1 - 2 * np.count_nonzero(true_lesion & predicted_lesion) / (
            np.count_nonzero(true_lesion) + np.count_nonzero(predicted_lesion))
  return cost


def _matching_is_unique(predicted, truth):
  """Whether one set of matches alone reaches the least total cost: forbidding any of the matches
  costs more (an assignment with a different match set leaves out one of these)."""
  predicted_labels, n_predicted = metrics.label_components(predicted)
  true_labels, n_true = metrics.label_components(truth)
  matches = metrics.match_lesions(predicted_labels, n_predicted, true_labels, n_true)
  cost = _matching_cost(predicted_labels, n_predicted, true_labels, n_true)
  rows, columns = scipy.optimize.linear_sum_assignment(cost)
  least = cost[rows, columns].sum()
  for t, p, _ in matches:
    forbidden = cost.copy()
    forbidden[t - 1, p - 1] = 10.0
    rows, columns = scipy.optimize.linear_sum_assignment(forbidden)
    if forbidden[rows, columns].sum() <= least + 1e-9:
      return False
  return True


def _lesion_masks(seed, shape=(30, 28, 20)):
  """Many small lesions: thresholded smoothed noise, the prediction a perturbed copy."""
  rng = np.random.default_rng(seed)
  truth = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
  predicted = scipy.ndimage.gaussian_filter(
      truth + 0.6 * scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 1.2), 1.2)
  return predicted > np.quantile(predicted, 0.85), truth > np.quantile(truth, 0.85)


def test_lesion_metrics_are_orientation_invariant_when_the_matching_is_unique():
  # Flips and axis permutations (the spacing permuted with the axes) renumber the lesions (raster
  # order) but change no Dice, surface or distance: with a unique optimal matching every number
  # is the same.
  spacing = (1.0, 1.5, 2.0)
  orientations = [((0, 1, 2), (0,)), ((0, 1, 2), (1, 2)), ((1, 0, 2), ()), ((2, 1, 0), (0, 1, 2))]
  checked = 0
  for seed in range(3):
    predicted, truth = _lesion_masks(seed)
    if not _matching_is_unique(predicted, truth):
      continue
    checked += 1
    reference = metrics.lesion_metrics(predicted, truth, spacing=spacing)
    assert reference["true_positives"] >= 8 and reference["false_positives"] >= 2
    assert reference["counted_lesions"] < reference["true_lesions"]  # small ones left out
    for axes, flipped in orientations:
      p, t = (np.flip(np.transpose(x, axes), flipped) for x in (predicted, truth))
      values = metrics.lesion_metrics(p, t, spacing=tuple(spacing[a] for a in axes))
      for key, value in reference.items():
        assert values[key] == pytest.approx(value, rel=1e-12, abs=1e-9), (seed, axes, flipped, key)
  assert checked >= 2


def test_tied_matchings_are_broken_by_lesion_numbering():
  # One true lesion (54 voxels) overlapped by two predicted lesions of 3 voxels, one voxel each:
  # equal Dice, so two optimal matchings, with different HD95. Which one is taken follows the
  # lesions' numbering (raster order), so it changes with the array's orientation; the Dice-based
  # numbers do not.
  truth, predicted = np.zeros((14, 7, 7), bool), np.zeros((14, 7, 7), bool)
  truth[4:10, 1:4, 1:4] = True
  predicted[2:5, 1, 1] = True  # the truth's corner voxel and 2 voxels out along x
  predicted[7, 2, 3:6] = True  # a voxel of its z face and 2 voxels out along z
  predicted_labels, _ = metrics.label_components(predicted)
  candidates = [(metrics.pooled_hd95(predicted_labels == p, truth, spacing=(1, 1, 1)) + PENALTY) / 2
                for p in (1, 2)]
  assert abs(candidates[0] - candidates[1]) > 0.5
  seen = set()
  for flipped in [(), (0,), (2,), (0, 1, 2)]:
    values = metrics.lesion_metrics(np.flip(predicted, flipped), np.flip(truth, flipped),
                                    spacing=(1, 1, 1))
    assert values["lesion_dice"] == pytest.approx(1 / 57)  # (2/57 + 0) / 2: the other is an FP
    assert values["lesion_hd95"] in candidates
    seen.add(candidates.index(values["lesion_hd95"]))
  assert seen == {0, 1}


def test_matching_is_one_to_one_and_maximises_the_summed_dice():
  # 1D lesions: true T1 = [0, 10), T2 = [14, 24); predicted P1 = [4, 20) overlaps both, P2 =
  # [0, 3) overlaps T1 only.
  truth, predicted = np.zeros(30, bool), np.zeros(30, bool)
  truth[0:10] = truth[14:24] = True
  predicted[4:20] = predicted[0:3] = True
  true_labels, n_true = metrics.label_components(truth)
  predicted_labels, n_predicted = metrics.label_components(predicted)
  # Dice: P1-T1 2*6/26, P1-T2 2*6/26 (a tie), P2-T1 2*3/13. Greedy (best pair first) would take
  # P2-T1 and leave T2; the maximum summed Dice matches P2-T1 and P1-T2.
  matches = metrics.match_lesions(predicted_labels, n_predicted, true_labels, n_true)
  assert [(t, p) for t, p, _ in matches] == [(1, 1), (2, 2)]  # P2 is label 1 (raster order)
  assert [d for _, _, d in matches] == pytest.approx([6 / 13, 12 / 26])


def test_lesion_rules_threshold_false_positives_and_misses():
  truth, predicted = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
  _cube(truth, (1, 1, 1), 3)  # A: 27 voxels, predicted exactly
  _cube(truth, (10, 1, 1), 2)  # B: 8 voxels < 20 mm^3, predicted exactly: ignored
  _cube(truth, (1, 12, 12), 3)  # C: 27 voxels, missed
  _cube(predicted, (1, 1, 1), 3)
  _cube(predicted, (10, 1, 1), 2)
  _cube(predicted, (15, 15, 15), 2)  # a false positive
  values = metrics.lesion_metrics(predicted, truth, spacing=(1, 1, 1))
  # Counted: A (Dice 1, HD95 0), C (0, 373), the false positive (0, 373); B left out.
  assert values["lesion_dice"] == pytest.approx(1 / 3)
  assert values["lesion_hd95"] == pytest.approx(2 * 373 / 3)
  assert (values["true_positives"], values["false_negatives"], values["false_positives"],
          values["counted_lesions"]) == (2, 1, 1, 2)
  assert values["matched_dice"] == 1.0 and values["matched_hd95"] == 0.0  # A and B
  # No threshold: B counts too (Dice 1, HD95 0).
  values = metrics.lesion_metrics(predicted, truth, spacing=(1, 1, 1), min_volume_mm3=0)
  assert values["lesion_dice"] == pytest.approx(2 / 4)
  # The threshold is a volume: 2.5 mm voxels make B 20 mm^3, counted.
  values = metrics.lesion_metrics(predicted, truth, spacing=(1, 1, 2.5))
  assert values["counted_lesions"] == 3 and values["lesion_dice"] == pytest.approx(2 / 4)


def test_lesion_rules_for_empty_masks():
  empty = np.zeros((8, 8, 8), bool)
  small, large = empty.copy(), empty.copy()
  _cube(small, (1, 1, 1), 2)  # 8 voxels, below the threshold
  _cube(large, (4, 4, 4), 3)
  both_empty = metrics.lesion_metrics(empty, empty, spacing=(1, 1, 1))
  assert (both_empty["lesion_dice"], both_empty["lesion_hd95"]) == (1.0, 0.0)
  assert math.isnan(both_empty["matched_dice"]) and math.isnan(both_empty["matched_hd95"])
  missed = metrics.lesion_metrics(empty, large, spacing=(1, 1, 1))
  assert (missed["lesion_dice"], missed["lesion_hd95"]) == (0.0, PENALTY)
  assert (missed["matched_dice"], missed["matched_hd95"]) == (0.0, INF)
  false_positive = metrics.lesion_metrics(large, empty, spacing=(1, 1, 1))
  assert (false_positive["lesion_dice"], false_positive["lesion_hd95"]) == (0.0, PENALTY)
  # Only a small true lesion, not predicted: nothing to score, the empty-mask rule.
  only_small = metrics.lesion_metrics(empty, small, spacing=(1, 1, 1))
  assert (only_small["lesion_dice"], only_small["lesion_hd95"]) == (1.0, 0.0)
  assert only_small["false_negatives"] == 1


def test_pooled_hd95_is_panopticas_not_monais():
  # One point against two points 10 voxels apart: the distances are P->T [0] and T->P [0, 10];
  # pooled [0, 0, 10]: 95th percentile 9.0 (MONAI's per-direction maximum: 9.5).
  predicted, truth = np.zeros((1, 12), bool), np.zeros((1, 12), bool)
  predicted[0, 0] = truth[0, 0] = truth[0, 10] = True
  assert metrics.pooled_hd95(predicted, truth, spacing=(1, 1)) == pytest.approx(9.0)
  assert metrics.hd95(predicted, truth, spacing=(1, 1)) == pytest.approx(9.5)
  assert metrics.pooled_hd95(predicted, np.zeros_like(truth), spacing=(1, 1)) == PENALTY
  assert metrics.pooled_hd95(truth & False, truth & False, spacing=(1, 1)) == 0.0
  rng = np.random.default_rng(3)
  for _ in range(3):
    p = scipy.ndimage.binary_dilation(rng.random((14, 12, 10)) < 0.02, iterations=2)
    t = scipy.ndimage.binary_dilation(rng.random((14, 12, 10)) < 0.02, iterations=2)
    assert metrics.pooled_hd95(p, t, spacing=(0.8, 1.0, 2.0)) == pytest.approx(
        _brute_force_pooled_hd95(p, t, (0.8, 1.0, 2.0)), abs=1e-9)
