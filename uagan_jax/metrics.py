"""Evaluation metrics as plain numpy functions: image translation and segmentation.

Translation (MAE, PSNR, SSIM) compares a translated image with the true image of the target
modality, both in the normalised space of training (z-scores clipped to [-clip, clip]), so numbers
are comparable across cases and scanners. MAE and PSNR are computed over the brain (the true
image's non-zero voxels); SSIM over whole 2D slices (the background is 0 in both), averaged over
slices.

Segmentation (Dice, HD95, sensitivity, specificity, volumes) compares one binary tumour region
(e.g. whole tumour, tumour core, enhancing tumour) of a prediction with the truth, following the
BraTS conventions for empty regions; see ``region_metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np


def mae(*, predicted: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Mean absolute error, over ``mask`` if given."""
  diff = np.abs(predicted.astype(np.float64) - target.astype(np.float64))
  return float(diff[mask].mean() if mask is not None else diff.mean())


def psnr(*, predicted: np.ndarray, target: np.ndarray, data_range: float,
         mask: np.ndarray | None = None) -> float:
  """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)`` (inf if identical)."""
  diff = (predicted.astype(np.float64) - target.astype(np.float64)) ** 2
  mse = diff[mask].mean() if mask is not None else diff.mean()
  return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


def _gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return kernel / kernel.sum()


def _filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering of the last two axes (no padding: no edge artefacts)."""
  k = len(kernel)
  out = sum(kernel[i] * image[..., i:image.shape[-2] - k + 1 + i, :] for i in range(k))
  out = sum(kernel[i] * out[..., :, i:out.shape[-1] - k + 1 + i] for i in range(k))
  return out


def ssim(*, predicted: np.ndarray, target: np.ndarray, data_range: float, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
  """Structural similarity (Wang et al. 2004), Gaussian window (sigma 1.5, radius 3 sigma).

  Args:
    predicted: [..., H, W] images (leading axes, e.g. slices, are averaged over).
    target: same shape.
    data_range: the dynamic range L in ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.
    sigma: Gaussian window width.
    k1: stability constant.
    k2: stability constant.

  Returns:
    Mean SSIM over all window positions of all images.
  """
  x = predicted.astype(np.float64)
  y = target.astype(np.float64)
  kernel = _gaussian_kernel(sigma, int(3.0 * sigma + 0.5))
  if min(x.shape[-2:]) < len(kernel):
    raise ValueError(f"images {x.shape[-2:]} are smaller than the {len(kernel)}-pixel SSIM window")
  mu_x, mu_y = _filter2d(x, kernel), _filter2d(y, kernel)
  var_x = _filter2d(x * x, kernel) - mu_x ** 2
  var_y = _filter2d(y * y, kernel) - mu_y ** 2
  cov = _filter2d(x * y, kernel) - mu_x * mu_y
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) *
                                                          (var_x + var_y + c2))
  return float(ssim_map.mean())


# ------------------------------------------------------------------------------------------------
# Segmentation metrics (one binary region at a time, BraTS conventions).
#
# Masks are boolean arrays of any ndim >= 1 (2D slices and 3D volumes alike); arrays holding only
# 0 and 1 (any numeric dtype) are accepted and cast, anything else (a label map, probabilities)
# is rejected. ``spacing`` is the voxel size in mm along each axis, so distances are in mm and
# volumes in ml whatever the (possibly anisotropic) grid.
# ------------------------------------------------------------------------------------------------

# The BraTS 2023 toolkit's HD95 when exactly one of prediction and truth is empty (mm).
EMPTY_HD95_PENALTY_MM = 374.0


def _as_mask(array, name: str) -> np.ndarray:
  """``array`` itself if it is boolean, else its boolean cast if it holds only 0 and 1."""
  array = np.asarray(array)
  if array.ndim < 1:
    raise ValueError(f"{name} must have at least one axis, got a scalar")
  if array.dtype == bool:
    return array
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise ValueError(f"{name} must be boolean or numeric 0/1, got dtype {array.dtype}")
  if not ((array == 0) | (array == 1)).all():
    raise ValueError(f"{name} must be boolean or hold only 0 and 1 (a binary region, not a label "
                     f"map or probabilities); found values {np.unique(array)[:8]}")
  return array.astype(bool)


def _as_pair(predicted, truth) -> tuple[np.ndarray, np.ndarray]:
  predicted, truth = _as_mask(predicted, "predicted"), _as_mask(truth, "truth")
  if predicted.shape != truth.shape:
    raise ValueError(f"predicted shape {predicted.shape} != truth shape {truth.shape}")
  return predicted, truth


def _as_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != ndim:
    raise ValueError(f"spacing {spacing} has {len(spacing)} entries for a {ndim}D mask")
  if not all(math.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"spacing {spacing} must be positive and finite")
  return spacing


def _dice(predicted: np.ndarray, truth: np.ndarray) -> float:
  total = np.count_nonzero(predicted) + np.count_nonzero(truth)
  if total == 0:
    return 1.0  # BraTS: both empty is a perfect answer
  return 2.0 * np.count_nonzero(predicted & truth) / total


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
  """Dice overlap ``2 |P & T| / (|P| + |T|)``; 1 if both masks are empty (BraTS), 0 if one is."""
  return float(_dice(*_as_pair(predicted, truth)))


def surface_voxels(mask: np.ndarray) -> np.ndarray:
  """The mask's surface: its voxels with a face-neighbour outside it.

  This is ``mask XOR erosion(mask)`` with the face-connected cross (6-connectivity in 3D, 4 in
  2D) and everything beyond the array border counted as outside, i.e. MONAI's ``get_mask_edges``
  (scipy ``binary_erosion`` with its default structure and ``border_value=0``).

  Args:
    mask: boolean (or 0/1) array, any ndim >= 1.

  Returns:
    Boolean array of the same shape, True on the surface voxels.
  """
  mask = _as_mask(mask, "mask")
  padded = np.pad(mask, 1, constant_values=False)
  centre = (slice(1, -1),) * mask.ndim
  interior = mask.copy()
  for axis in range(mask.ndim):
    for start in (0, 2):  # the neighbour before and after along this axis
      shifted = list(centre)
      shifted[axis] = slice(start, start + mask.shape[axis])
      interior &= padded[tuple(shifted)]
  return mask & ~interior


def _line_distance_squared(mask: np.ndarray, axis: int, step: float) -> np.ndarray:
  """Squared distance (mm^2) along ``axis`` to the nearest True voxel of its line (inf if none).

  The first pass of the separable EDT: on a binary image the 1D transform is just the distance to
  the nearest set index before or after, two running max/min scans.
  """
  mask = np.moveaxis(mask, axis, 0)
  n = mask.shape[0]
  index = np.arange(n).reshape((n,) + (1,) * (mask.ndim - 1))
  before = np.maximum.accumulate(np.where(mask, index, -2 * n), axis=0)
  after = np.minimum.accumulate(np.where(mask, index, 3 * n)[::-1], axis=0)[::-1]
  gap = np.minimum(index - before, after - index)  # > n - 1 exactly when the line is empty
  out = np.where(gap < n, (gap * step) ** 2, np.inf)
  return np.moveaxis(out, 0, axis)


def _lower_envelope(f: np.ndarray, axis: int, step: float) -> np.ndarray:
  """Exact 1D squared-distance transform ``out[q] = min_p f[p] + (step (q - p))^2`` along ``axis``.

  Felzenszwalb & Huttenlocher (2012): the lower envelope of the parabolas rooted at each finite
  ``f[p]``, built left to right with a stack, then read off left to right. It runs on every line
  of ``axis`` at once: the Python loops go along the axis only, and the inner ``while`` loops over
  the (few) lines that still have parabolas to pop or segments to skip. Points with ``f = inf``
  root no parabola; a line without any finite point stays inf.
  """
  f = np.moveaxis(f, axis, 0)
  rest = f.shape[1:]
  n = f.shape[0]
  f = f.reshape(n, -1)
  x = np.arange(n) * step  # positions in mm
  root = np.zeros(f.shape, np.intp)  # root[k, line]: the k-th parabola of the envelope
  start = np.empty((n + 1, f.shape[1]))  # start[k, line]: where parabola k starts to be lowest
  top = np.full(f.shape[1], -1)  # index of the last parabola on each line's stack; -1 = empty
  for q in range(n):
    lines = np.flatnonzero(np.isfinite(f[q]))
    empty = top[lines] < 0
    first, lines = lines[empty], lines[~empty]
    top[first] = 0  # the line's first finite point: its parabola is lowest everywhere so far
    root[0, first] = q
    start[0, first] = -np.inf
    start[1, first] = np.inf
    height = f[q, lines] + x[q] ** 2
    while lines.size:
      k = top[lines]
      p = root[k, lines]
      # Where parabola q overtakes the stack's top parabola p (q > p, same curvature).
      cross = (height - (f[p, lines] + x[p] ** 2)) / (2.0 * (x[q] - x[p]))
      hidden = cross <= start[k, lines]  # q is lower everywhere p was lowest: drop p
      keep, k_keep = lines[~hidden], k[~hidden] + 1
      top[keep] = k_keep
      root[k_keep, keep] = q
      start[k_keep, keep] = cross[~hidden]
      start[k_keep + 1, keep] = np.inf
      lines, height = lines[hidden], height[hidden]
      top[lines] -= 1  # never below 0: start[0] is -inf, so the first parabola stays
  out = np.full(f.shape, np.inf)
  lines = np.flatnonzero(top >= 0)
  k = np.zeros(lines.size, np.intp)
  for q in range(n):
    behind = np.flatnonzero(start[k + 1, lines] < x[q])  # start[top + 1] is inf: k <= top
    while behind.size:
      k[behind] += 1
      behind = behind[start[k[behind] + 1, lines[behind]] < x[q]]
    p = root[k, lines]
    out[q, lines] = (x[q] - x[p]) ** 2 + f[p, lines]
  return np.moveaxis(out.reshape((n,) + rest), 0, axis)


def distance_to_mask(mask: np.ndarray, *, spacing: Sequence[float]) -> np.ndarray:
  """Exact Euclidean distance (mm) from every voxel to the nearest True voxel of ``mask``.

  A separable exact EDT in numpy: a binary scan along the longest axis, then the
  Felzenszwalb-Huttenlocher lower envelope of parabolas along each other axis, on squared
  distances, square root at the end. Equals ``scipy.ndimage.distance_transform_edt(~mask,
  sampling=spacing)`` (to float rounding) for a non-empty mask.

  Args:
    mask: boolean (or 0/1) array, any ndim >= 1.
    spacing: voxel size in mm along each axis.

  Returns:
    Float64 array of the mask's shape: 0 on the mask; inf everywhere if the mask is empty.
  """
  mask = _as_mask(mask, "mask")
  spacing = _as_spacing(spacing, mask.ndim)
  if not mask.any():
    return np.full(mask.shape, np.inf)
  # The binary pass is the cheap one: give it the longest axis, the other passes loop over
  # their axis' length.
  first = int(np.argmax(mask.shape))
  squared = _line_distance_squared(mask, first, spacing[first])
  for axis in range(mask.ndim):
    if axis != first:
      squared = _lower_envelope(squared, axis, spacing[axis])
  return np.sqrt(squared)


def _union_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
  """Slices of the bounding box of a non-empty mask, grown by ``margin`` (clipped to the array)."""
  box = []
  for axis in range(mask.ndim):
    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    box.append(slice(max(hit[0] - margin, 0), min(hit[-1] + 1 + margin, mask.shape[axis])))
  return tuple(box)


def _hd95(predicted: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...],
          empty_penalty: float) -> float:
  has_predicted, has_truth = predicted.any(), truth.any()
  if not (has_predicted or has_truth):
    return 0.0
  if not (has_predicted and has_truth):
    return float(empty_penalty)
  # Crop to the bounding box of P | T plus one voxel. Exact: (1) every surface voxel of either
  # mask lies inside the box, and a Euclidean distance between two of them does not depend on
  # what surrounds them, so the EDT of one surface, computed on the box, is the same at the other
  # surface's voxels as on the whole array; (2) the one-voxel margin is background, so the erosion
  # sees the same face-neighbours at the box's edge as in the full array (where the margin is
  # clipped by the array border, outside the array already counts as background).
  box = _union_box(predicted | truth, margin=1)
  surface_p, surface_t = surface_voxels(predicted[box]), surface_voxels(truth[box])
  p_to_t = distance_to_mask(surface_t, spacing=spacing)[surface_p]
  t_to_p = distance_to_mask(surface_p, spacing=spacing)[surface_t]
  return float(max(np.percentile(p_to_t, 95), np.percentile(t_to_p, 95)))


def hd95(predicted: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float],
         empty_penalty: float = EMPTY_HD95_PENALTY_MM) -> float:
  """95th-percentile Hausdorff distance (mm) between the surfaces of two masks, MONAI's definition.

  As ``monai.metrics.compute_hausdorff_distance(..., percentile=95)``: the surface of a mask is
  the mask XOR its erosion by the face-connected cross (``surface_voxels``); take the distances
  (mm, through the voxel spacing) from each surface voxel of P to the nearest surface voxel of T,
  and from each surface voxel of T to the nearest of P; the 95th percentile of each direction
  separately (numpy's default ``linear`` interpolation, as ``torch.quantile``), then the larger of
  the two. This is not medpy's ``hd95``, which takes one percentile of both directions pooled.

  Args:
    predicted: boolean (or 0/1) mask, any ndim >= 1.
    truth: boolean (or 0/1) mask of the same shape.
    spacing: voxel size in mm along each axis.
    empty_penalty: the value when exactly one mask is empty (BraTS 2023: 374 mm); two empty
      masks give 0.

  Returns:
    HD95 in mm.
  """
  predicted, truth = _as_pair(predicted, truth)
  return _hd95(predicted, truth, _as_spacing(spacing, predicted.ndim), empty_penalty)


def region_metrics(predicted: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float],
                   empty_penalty: float = EMPTY_HD95_PENALTY_MM) -> dict[str, float]:
  """Dice, HD95, sensitivity, specificity and volumes of one binary region (BraTS conventions).

  - ``dice``: ``2 |P & T| / (|P| + |T|)``.
  - ``hd95``: see ``hd95`` (MONAI: per-direction 95th percentiles of surface distances in mm,
    numpy ``linear`` interpolation, then the maximum; not medpy's pooled percentile).
  - ``sensitivity``: ``TP / (TP + FN)``, the fraction of the true region that is predicted.
  - ``specificity``: ``TN / (TN + FP)``, counted over the whole array given (every voxel that is
    not in T, background included), so it is close to 1 for any reasonable prediction of a small
    region in a large volume; a brain-only specificity needs the arrays cropped/masked first.
  - ``predicted_ml``, ``true_ml``: voxel count * prod(spacing) / 1000 (spacing in mm).

  Empty regions (the BraTS toolkit's rules):
  - P and T both empty: dice 1, hd95 0, sensitivity 1.
  - exactly one empty: dice 0, hd95 ``empty_penalty`` (374 mm); sensitivity 0 if T is empty
    (and P is not), as ``TP / (TP + FN)`` with T non-empty otherwise.
  - specificity mirrors sensitivity on the complements: when T fills the whole array (no
    negatives) it is 1 if P fills it too, else 0. (The toolkit divides by zero-plus-epsilon and
    returns 0 there; the case does not arise on brain volumes.)

  Args:
    predicted: boolean (or 0/1) mask, any ndim >= 1, e.g. (X, Y, Z).
    truth: boolean (or 0/1) mask of the same shape.
    spacing: voxel size in mm along each axis.
    empty_penalty: HD95 when exactly one mask is empty.

  Returns:
    ``{"dice", "hd95", "sensitivity", "specificity", "predicted_ml", "true_ml"}``, Python floats.
  """
  predicted, truth = _as_pair(predicted, truth)
  spacing = _as_spacing(spacing, predicted.ndim)
  n_predicted, n_truth = np.count_nonzero(predicted), np.count_nonzero(truth)
  true_positive = np.count_nonzero(predicted & truth)
  false_positive = n_predicted - true_positive
  positive = n_truth
  negative = truth.size - n_truth
  true_negative = negative - false_positive
  if positive:
    sensitivity = true_positive / positive
  else:
    sensitivity = 1.0 if n_predicted == 0 else 0.0
  if negative:
    specificity = true_negative / negative
  else:
    specificity = 1.0 if n_predicted == truth.size else 0.0
  voxel_ml = math.prod(spacing) / 1000.0
  return {
      "dice": float(_dice(predicted, truth)),
      "hd95": _hd95(predicted, truth, spacing, empty_penalty),
      "sensitivity": float(sensitivity),
      "specificity": float(specificity),
      "predicted_ml": float(n_predicted * voxel_ml),
      "true_ml": float(n_truth * voxel_ml),
  }
