"""The metrics of `uagan_jax/metrics.py`.

Segmentation metrics: hand-computed values, BraTS empty-mask rules, and scipy cross-checks.
Translation metrics (MAE, PSNR, SSIM): hand-computed values.

scipy is a test-only dependency here: ``scipy.ndimage.binary_erosion`` and
``distance_transform_edt`` give an independent implementation of the surfaces, the EDT and MONAI's
HD95 to compare the numpy code with.
"""

import math

import numpy as np
import pytest
from scipy import ndimage

from uagan_jax import metrics


def _reference_hd95(predicted, truth, spacing):
  """MONAI's HD95 written with scipy, on the uncropped arrays."""
  surface_p = predicted & ~ndimage.binary_erosion(predicted)  # cross structure, border_value=0
  surface_t = truth & ~ndimage.binary_erosion(truth)
  p_to_t = ndimage.distance_transform_edt(~surface_t, sampling=spacing)[surface_p]
  t_to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)[surface_t]
  return max(np.percentile(p_to_t, 95), np.percentile(t_to_p, 95))


def _blobs(rng, shape, *, smooth, fraction):
  """A random mask of smooth blobs covering about ``fraction`` of the array (touches borders)."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
  return field > np.quantile(field, 1.0 - fraction)


# --- HD95: hand values and definition ----------------------------------------------------------


def test_hd95_of_two_single_voxels_two_mm_apart():
  a, b = np.zeros((7, 7, 7), bool), np.zeros((7, 7, 7), bool)
  a[3, 3, 3], b[3, 3, 4] = True, True  # face neighbours along z, 2 mm voxels
  assert metrics.hd95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx(2.0)
  a2, b2 = np.zeros((5, 6), bool), np.zeros((5, 6), bool)
  a2[2, 1], b2[2, 3] = True, True  # two voxels apart at 1 mm
  assert metrics.hd95(a2, b2, spacing=(1.0, 1.0)) == pytest.approx(2.0)
  assert metrics.hd95(a, a, spacing=(1.0, 1.0, 2.0)) == 0.0


def test_hd95_takes_each_direction_percentile_then_the_max_not_a_pooled_percentile():
  # 1D, 1 mm: P = {0}; T = {0, 10} (two separate voxels, each its own surface).
  # P -> T distances [0]: 95th percentile 0. T -> P distances [0, 10]: linear interpolation at
  # 0.95 * 1 gives 9.5. MONAI: max(0, 9.5) = 9.5. medpy's pooled percentile of [0, 0, 10] at
  # position 0.95 * 2 = 1.9 would give 9.0.
  predicted, truth = np.zeros(12, bool), np.zeros(12, bool)
  predicted[0] = True
  truth[[0, 10]] = True
  assert metrics.hd95(predicted, truth, spacing=(1.0,)) == pytest.approx(9.5)
  assert metrics.hd95(truth, predicted, spacing=(1.0,)) == pytest.approx(9.5)  # symmetric


def test_hd95_of_concentric_spheres_radius_20_and_40_mm():
  # Digital balls r <= 20 and r <= 40 on a 1 mm grid. A surface voxel of a ball of radius R has a
  # face-neighbour outside, so its centre lies at radius in (R - 1, R]: every surface-to-surface
  # distance is > 39 - 20 = 19 (triangle inequality), and the voxelised surfaces stay within about
  # a voxel of the continuous spheres, 20 mm apart. The definition gives sqrt(20^2 + 2^2 + 1^2)
  # = 20.1246 here: the 95th percentile of the outer-to-inner distances lands on a lattice
  # distance (each direction's value is a distance between two voxel centres), checked against
  # the independent scipy computation too.
  n = 85
  radius = np.sqrt(((np.indices((n, n, n)) - n // 2) ** 2).sum(axis=0))
  inner, outer = radius <= 20, radius <= 40
  value = metrics.hd95(inner, outer, spacing=(1.0, 1.0, 1.0))
  assert 19.0 < value < 21.0
  assert value == pytest.approx(math.sqrt(405.0), abs=1e-9)
  assert value == pytest.approx(_reference_hd95(inner, outer, (1.0, 1.0, 1.0)), abs=1e-9)


# --- Independent cross-checks against scipy ----------------------------------------------------


@pytest.mark.parametrize("shape", [(40,), (31, 27), (17, 20, 13), (5, 6, 4, 7)])
def test_surface_voxels_match_scipy_erosion(shape):
  rng = np.random.default_rng(len(shape))
  for fraction in (0.05, 0.5, 0.95):
    mask = rng.random(shape) < fraction
    expected = mask & ~ndimage.binary_erosion(mask)
    np.testing.assert_array_equal(metrics.surface_voxels(mask), expected)
  full = np.ones(shape, bool)  # every border voxel is surface, the inside is not
  np.testing.assert_array_equal(metrics.surface_voxels(full), ~ndimage.binary_erosion(full))


@pytest.mark.parametrize("shape,spacing", [
    ((50,), (0.7,)),
    ((37, 41), (1.0, 2.5)),
    ((41, 37), (0.45, 1.3)),
    ((19, 23, 16), (0.8, 1.3, 3.0)),
    ((16, 23, 19), (2.0, 1.0, 1.0)),
    ((6, 7, 5, 8), (1.0, 2.0, 0.5, 1.5)),
])
def test_distance_to_mask_equals_scipy_edt(shape, spacing):
  rng = np.random.default_rng(sum(shape))
  for fraction in (0.002, 0.03, 0.4, 0.97):
    mask = rng.random(shape) < fraction
    mask.flat[rng.integers(mask.size)] = True  # never empty
    expected = ndimage.distance_transform_edt(~mask, sampling=spacing)
    # Exact up to float rounding (the squared terms are summed in another order than scipy's).
    np.testing.assert_allclose(metrics.distance_to_mask(mask, spacing=spacing), expected,
                               rtol=1e-12, atol=0.0)


def test_distance_to_mask_of_an_empty_mask_is_inf():
  distance = metrics.distance_to_mask(np.zeros((4, 5), bool), spacing=(1.0, 1.0))
  assert distance.shape == (4, 5) and np.isinf(distance).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape,spacing", [
    ((64, 48), (1.0, 1.0)),
    ((60, 52), (0.6, 2.2)),
    ((36, 40, 28), (1.0, 1.0, 1.0)),
    ((34, 30, 26), (0.9, 1.2, 3.0)),
])
def test_hd95_equals_independent_scipy_computation(seed, shape, spacing):
  rng = np.random.default_rng([seed, len(shape)])
  # Overlapping smooth blobs, some touching the array border.
  truth = _blobs(rng, shape, smooth=3.0, fraction=0.15)
  predicted = _blobs(rng, shape, smooth=3.0, fraction=0.15) | (truth & (rng.random(shape) < 0.8))
  assert metrics.hd95(predicted, truth, spacing=spacing) == pytest.approx(
      _reference_hd95(predicted, truth, spacing), abs=1e-6)
  # Small masks far from each other inside a larger array: the crop to their union's box.
  small_p, small_t = np.zeros(shape, bool), np.zeros(shape, bool)
  small_p[tuple(rng.integers(2, 6, size=len(shape)))] = True
  small_t[tuple(slice(s - 8, s - 3) for s in shape)] = rng.random((5,) * len(shape)) < 0.6
  small_t[tuple(s - 4 for s in shape)] = True
  assert metrics.hd95(small_p, small_t, spacing=spacing) == pytest.approx(
      _reference_hd95(small_p, small_t, spacing), abs=1e-6)
  # Sparse speckle: many tiny components.
  speckle_p, speckle_t = rng.random(shape) < 0.02, rng.random(shape) < 0.02
  assert metrics.hd95(speckle_p, speckle_t, spacing=spacing) == pytest.approx(
      _reference_hd95(speckle_p, speckle_t, spacing), abs=1e-6)


# --- BraTS empty-mask rules --------------------------------------------------------------------


def test_empty_mask_rules():
  empty, some = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
  some[2:4, 2:4, 2:4] = True
  spacing = (1.0, 1.0, 1.0)
  both = metrics.region_metrics(empty, empty, spacing=spacing)
  assert both == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0,
                  "predicted_ml": 0.0, "true_ml": 0.0}
  missed = metrics.region_metrics(empty, some, spacing=spacing)  # nothing predicted
  assert (missed["dice"], missed["hd95"], missed["sensitivity"], missed["specificity"]) == (
      0.0, 374.0, 0.0, 1.0)
  spurious = metrics.region_metrics(some, empty, spacing=spacing)  # truth empty
  assert (spurious["dice"], spurious["hd95"], spurious["sensitivity"]) == (0.0, 374.0, 0.0)
  assert spurious["specificity"] == pytest.approx(1.0 - 8 / 216)
  assert metrics.EMPTY_HD95_PENALTY_MM == 374.0
  assert metrics.hd95(some, empty, spacing=spacing) == 374.0
  assert metrics.hd95(empty, some, spacing=spacing, empty_penalty=100.0) == 100.0
  assert metrics.region_metrics(some, empty, spacing=spacing, empty_penalty=50.0)["hd95"] == 50.0
  assert metrics.hd95(empty, empty, spacing=spacing, empty_penalty=100.0) == 0.0
  assert metrics.dice(empty, empty) == 1.0 and metrics.dice(some, empty) == 0.0


def test_specificity_when_truth_fills_the_array_mirrors_sensitivity():
  full = np.ones((3, 4), bool)
  partial = full.copy()
  partial[0, 0] = False
  assert metrics.region_metrics(full, full, spacing=(1.0, 1.0))["specificity"] == 1.0
  assert metrics.region_metrics(partial, full, spacing=(1.0, 1.0))["specificity"] == 0.0


# --- Hand values -------------------------------------------------------------------------------


def test_dice_hand_values():
  a = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
  assert metrics.dice(a, a) == 1.0
  assert metrics.dice(a, ~a) == 0.0
  half = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
  assert metrics.dice(half, a) == pytest.approx(2 * 2 / (2 + 4))  # 2/3
  shifted = np.array([0, 0, 1, 1, 1, 1, 0, 0], bool)
  assert metrics.dice(shifted, a) == pytest.approx(0.5)  # 2 * 2 / 8


def test_sensitivity_specificity_and_volumes_hand_values():
  truth = np.zeros((4, 5), bool)
  truth[1:3, 1:4] = True  # 6 positives, 14 negatives
  predicted = np.zeros((4, 5), bool)
  predicted[1:3, 2:5] = True  # TP 4 (columns 2, 3), FP 2 (column 4), FN 2 (column 1)
  result = metrics.region_metrics(predicted, truth, spacing=(0.5, 2.0))
  assert result["sensitivity"] == pytest.approx(4 / 6)
  assert result["specificity"] == pytest.approx(12 / 14)  # over the whole array: TN 12
  assert result["dice"] == pytest.approx(2 * 4 / (6 + 6))
  # 6 voxels of 0.5 * 2.0 = 1 mm^2 each.
  assert result["predicted_ml"] == pytest.approx(6 * 1.0 / 1000)
  assert result["true_ml"] == pytest.approx(6 * 1.0 / 1000)
  assert result["hd95"] == pytest.approx(_reference_hd95(predicted, truth, (0.5, 2.0)))
  assert all(type(v) is float for v in result.values())  # pylint: disable=unidiomatic-typecheck


def test_volumes_in_ml_with_anisotropic_spacing():
  truth = np.zeros((10, 10, 10), bool)
  truth[:5, :4, :2] = True  # 40 voxels
  predicted = np.zeros((10, 10, 10), bool)
  predicted[:3] = True  # 300 voxels
  result = metrics.region_metrics(predicted, truth, spacing=(0.9, 1.1, 3.0))
  voxel_ml = 0.9 * 1.1 * 3.0 / 1000  # 2.97 mm^3
  assert result["true_ml"] == pytest.approx(40 * voxel_ml)
  assert result["predicted_ml"] == pytest.approx(300 * voxel_ml)


# --- Input checks ------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
    metrics.region_metrics(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 7), bool),
                           spacing=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
    metrics.dice(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
  with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
    metrics.hd95(np.zeros((3, 3), bool), np.zeros((3, 4), bool), spacing=(1.0, 1.0))


def test_zero_one_arrays_are_accepted_other_values_rejected():
  rng = np.random.default_rng(0)
  predicted, truth = rng.random((9, 8, 7)) < 0.3, rng.random((9, 8, 7)) < 0.3
  spacing = (1.0, 1.5, 2.0)
  expected = metrics.region_metrics(predicted, truth, spacing=spacing)
  for dtype in (np.uint8, np.int64, np.float32):
    got = metrics.region_metrics(predicted.astype(dtype), truth.astype(dtype), spacing=spacing)
    assert got == expected
  assert metrics.dice(predicted.tolist(), truth.tolist()) == expected["dice"]  # nested lists
  np.testing.assert_array_equal(metrics.surface_voxels(predicted.astype(np.int32)),
                                metrics.surface_voxels(predicted))
  labels = predicted.astype(np.int32) * 4  # a BraTS label map, not a region
  with pytest.raises(ValueError, match="0 and 1"):
    metrics.region_metrics(labels, truth, spacing=spacing)
  with pytest.raises(ValueError, match="0 and 1"):
    metrics.dice(predicted, truth * 0.7)  # probabilities
  with pytest.raises(ValueError, match="spacing"):
    metrics.hd95(predicted, truth, spacing=(1.0, 1.0))
  with pytest.raises(ValueError, match="spacing"):
    metrics.distance_to_mask(predicted, spacing=(1.0, 0.0, 1.0))


# --- Translation metrics -----------------------------------------------------------------------


def test_mae_and_psnr_hand_computed():
  target = np.zeros((2, 2))
  predicted = np.array([[0.1, -0.1], [0.1, -0.1]])
  assert metrics.mae(predicted=predicted, target=target) == pytest.approx(0.1)
  # MSE 0.01 with range 1: 10 log10(1 / 0.01) = 20 dB.
  assert metrics.psnr(predicted=predicted, target=target, data_range=1.0) == pytest.approx(20.0)
  mask = np.array([[True, False], [False, False]])
  predicted[1, 1] = 5.0  # outside the mask: ignored
  assert metrics.mae(predicted=predicted, target=target, mask=mask) == pytest.approx(0.1)
  assert metrics.psnr(predicted=target, target=target, data_range=1.0) == float("inf")


def test_ssim_identity_constant_offset_and_noise():
  rng = np.random.default_rng(0)
  image = rng.random((3, 24, 24))
  assert metrics.ssim(predicted=image, target=image, data_range=1.0) == pytest.approx(1.0)
  # Two constant images a and b: variances and covariance vanish, so
  # SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly. a=0.5, b=0.25, L=1: C1 = 1e-4.
  c1 = 1e-4
  expected = (2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1)
  value = metrics.ssim(predicted=np.full((16, 16), 0.5), target=np.full((16, 16), 0.25),
                       data_range=1.0)
  assert value == pytest.approx(expected, rel=1e-9)
  noisy = image + rng.normal(scale=0.3, size=image.shape)
  assert metrics.ssim(predicted=noisy, target=image, data_range=1.0) < 0.9


def test_ssim_rejects_images_smaller_than_the_window():
  with pytest.raises(ValueError):
    metrics.ssim(predicted=np.zeros((5, 5)), target=np.zeros((5, 5)), data_range=1.0)
