"""Evaluation metrics as plain numpy functions: image translation and segmentation.

Translation (MAE, PSNR, SSIM) compares a translated image with the true image of the target
modality, both in the normalised space of training (z-scores clipped to [-clip, clip]), so numbers
are comparable across cases and scanners. MAE and PSNR are computed over the brain (the true
image's non-zero voxels); SSIM over whole 2D slices (the background is 0 in both), averaged over
slices.

Segmentation (Dice, HD95, sensitivity, specificity, volumes) compares one binary tumour region
(e.g. whole tumour, tumour core, enhancing tumour) of a prediction with the truth, following the
BraTS conventions for empty regions; see ``region_metrics``. Lesion-wise Dice and HD95 (BraTS
2023+: connected components matched one-to-one, missed and false-positive lesions penalised) are
``lesion_metrics``, as the official toolkit computes them.
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


# ------------------------------------------------------------------------------------------------
# Lesion-wise metrics (BraTS 2023+): connected components, one-to-one matching, penalties.
#
# As the official toolkit, brats-evaluation 0.0.10 on panoptica 2.1.7 (benchmarks/brats_toolkit.py
# runs it beside these functions; tests/test_lesion_metrics.py holds the numbers it printed):
# lesions are the connected components of each region (cc3d's default in 3D: 26-connectivity; no
# dilation), matched one-to-one by maximum bipartite matching on Dice (any overlap qualifies), and
# scored with the lesion-wise rules of its ``parse_mets_results``.
# ------------------------------------------------------------------------------------------------

# The toolkit's (brats-evaluation 0.0.10) lesion-wise HD95 of a missed or false-positive lesion, mm:
# "373 diameter of the cube in SRI space". (The global `EMPTY_HD95_PENALTY_MM` is the 2023
# toolkit's 374, kept so the global columns keep their values.)
LESION_HD95_PENALTY_MM = 373.0
# The toolkit's default volume threshold (``parse_mets_results --vol_threshold``), mm^3: true
# lesions smaller than this are left out of the lesion-wise scores (neither credited nor penalised).
MIN_LESION_VOLUME_MM3 = 20.0
# Panoptica's matching threshold on Dice: a pair is a candidate match only above it.
_MATCHING_THRESHOLD = 1e-6


def _neighbour_offsets(ndim: int, full: bool) -> list[tuple[int, ...]]:
  """Half of the neighbourhood (the offsets after the centre in C order): each edge once."""
  offsets = []
  for offset in np.ndindex(*(3,) * ndim):
    offset = tuple(o - 1 for o in offset)
    if offset <= (0,) * ndim:  # the centre and the offsets before it in C order
      continue
    if full or sum(o != 0 for o in offset) == 1:
      offsets.append(offset)
  return offsets


def label_components(mask: np.ndarray, *, full_connectivity: bool = True) -> tuple[np.ndarray, int]:
  """Connected components of a mask, numbered 1..n in C (raster) order of their first voxel.

  The numbering of ``scipy.ndimage.label`` (and cc3d): with ``full_connectivity`` two voxels are
  neighbours when they touch at all (26-connectivity in 3D, 8 in 2D; scipy's ``structure=
  np.ones((3,) * ndim)``, cc3d's default), else only through a face (6 in 3D; scipy's default).
  Vectorised union-find: every neighbour pair of mask voxels is an edge; each round hooks the root
  of the larger index under the smaller one and compresses paths, until no edge joins two roots.
  The root of a component is then its first voxel, so components come out in raster order.

  Args:
    mask: boolean (or 0/1) array, any ndim >= 1.
    full_connectivity: touching voxels are neighbours (True) or only face neighbours (False).

  Returns:
    ``(labels, n)``: int32 array of the mask's shape (0 off the mask), and the number of components.
  """
  mask = _as_mask(mask, "mask")
  labels = np.zeros(mask.shape, np.int32)
  if not mask.any():
    return labels, 0
  box = _union_box(mask, margin=0)
  cropped = mask[box]
  count = int(np.count_nonzero(cropped))
  index = np.full(cropped.shape, -1, np.int64)
  index[cropped] = np.arange(count)  # compact indices, in C order
  sources, targets = [], []
  for offset in _neighbour_offsets(mask.ndim, full_connectivity):
    here = tuple(slice(max(-o, 0), n - max(o, 0)) for o, n in zip(offset, cropped.shape))
    there = tuple(slice(max(o, 0), n - max(-o, 0)) for o, n in zip(offset, cropped.shape))
    both = cropped[here] & cropped[there]
    sources.append(index[here][both])
    targets.append(index[there][both])
  sources, targets = np.concatenate(sources), np.concatenate(targets)
  parent = np.arange(count)
  while True:
    root_s, root_t = parent[sources], parent[targets]
    differ = root_s != root_t
    if not differ.any():
      break
    low, high = np.minimum(root_s, root_t)[differ], np.maximum(root_s, root_t)[differ]
    # A root hooks under a smaller root (duplicates: numpy keeps one of the writes, all smaller),
    # so parents only ever decrease and no cycle can form.
    parent[high] = np.minimum(parent[high], low)
    while True:  # path compression: every voxel points at its root
      grand = parent[parent]
      if np.array_equal(grand, parent):
        break
      parent = grand
    # Edges inside a finished component drop out; the rest are fewer each round.
    keep = parent[sources] != parent[targets]
    sources, targets = sources[keep], targets[keep]
  roots, numbered = np.unique(parent, return_inverse=True)  # roots ascending = raster order
  labels[box][cropped] = numbered.reshape(-1) + 1
  return labels, int(roots.size)


def _min_cost_assignment(cost: np.ndarray) -> list[tuple[int, int]]:
  """Rows and columns paired one-to-one (min(rows, columns) pairs) at the least total cost.

  ``scipy.optimize.linear_sum_assignment``'s problem (which Panoptica calls), solved with the
  Hungarian method by shortest augmenting paths with potentials (Kuhn-Munkres, O(n^2 m)); lesion
  counts are small, so the Python loop over rows is cheap.
  """
  transposed = cost.shape[0] > cost.shape[1]
  cost = cost.T if transposed else cost
  n, m = cost.shape
  u, v = np.zeros(n + 1), np.zeros(m + 1)
  row_of = np.zeros(m + 1, np.intp)  # row_of[j]: the row (1-based) column j is assigned to; 0 none
  for row in range(1, n + 1):
    row_of[0] = row
    column = 0
    slack = np.full(m + 1, np.inf)
    previous = np.zeros(m + 1, np.intp)
    used = np.zeros(m + 1, bool)
    while row_of[column] != 0:
      used[column] = True
      current = row_of[column]
      free = np.flatnonzero(~used[1:]) + 1
      reduced = cost[current - 1, free - 1] - u[current] - v[free]
      better = reduced < slack[free]
      slack[free[better]] = reduced[better]
      previous[free[better]] = column
      nearest = free[np.argmin(slack[free])]
      delta = slack[nearest]
      u[row_of[used]] += delta
      v[used] -= delta
      slack[free] -= delta
      column = nearest
    while column:  # flip the augmenting path
      back = previous[column]
      row_of[column] = row_of[back]
      column = back
  pairs = [(int(row_of[j]) - 1, j - 1) for j in range(1, m + 1) if row_of[j]]
  return sorted((c, r) if transposed else (r, c) for r, c in pairs)


def _pooled_hd95(predicted: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
  """Panoptica's (and medpy's) HD95 of two non-empty masks: one 95th percentile of the surface
  distances of both directions pooled (not `hd95`'s larger of the two per-direction ones)."""
  box = _union_box(predicted | truth, margin=1)  # exact, see _hd95
  surface_p, surface_t = surface_voxels(predicted[box]), surface_voxels(truth[box])
  p_to_t = distance_to_mask(surface_t, spacing=spacing)[surface_p]
  t_to_p = distance_to_mask(surface_p, spacing=spacing)[surface_t]
  return float(np.percentile(np.concatenate([t_to_p, p_to_t]), 95))


def pooled_hd95(predicted: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float],
                empty_penalty: float = LESION_HD95_PENALTY_MM) -> float:
  """HD95 as the BraTS toolkit (Panoptica) computes it, in mm.

  The surfaces and distances of `hd95`, but one 95th percentile (numpy ``linear``) of the
  distances of both directions pooled, medpy's definition, where `hd95` (MONAI) takes the larger
  of the per-direction percentiles. Both empty: 0; exactly one empty: ``empty_penalty``.

  Args:
    predicted: boolean (or 0/1) mask, any ndim >= 1.
    truth: boolean (or 0/1) mask of the same shape.
    spacing: voxel size in mm along each axis.
    empty_penalty: the value when exactly one mask is empty.

  Returns:
    HD95 in mm.
  """
  predicted, truth = _as_pair(predicted, truth)
  spacing = _as_spacing(spacing, predicted.ndim)
  has_predicted, has_truth = predicted.any(), truth.any()
  if not (has_predicted or has_truth):
    return 0.0
  if not (has_predicted and has_truth):
    return float(empty_penalty)
  return _pooled_hd95(predicted, truth, spacing)


def match_lesions(predicted_labels: np.ndarray, n_predicted: int, true_labels: np.ndarray,
                  n_true: int) -> list[tuple[int, int, float]]:
  """One-to-one matching of predicted to true lesions, as Panoptica's ``MaxBipartiteMatching``.

  Every (true, predicted) pair whose Dice exceeds 1e-6 (in practice: that overlap at all) costs
  ``1 - Dice``, any other pair ``1 + 1e-6``; the assignment of least total cost is taken and its
  pairs of cost below 1 are the matches. So the matches maximise the summed Dice, and a lesion
  overlapping two others is matched to one of them only. Among tied assignments (equal summed
  Dice) the solver keeps the first it reaches, which follows the lesions' numbering (raster
  order), as Panoptica's choice follows its own numbering: docs/EVALUATION.md, "Ties".

  Args:
    predicted_labels: int array, predicted lesions numbered 1..n_predicted (0 background).
    n_predicted: the number of predicted lesions.
    true_labels: int array of the same shape, true lesions numbered 1..n_true.
    n_true: the number of true lesions.

  Returns:
    ``[(true_label, predicted_label, dice)]``, sorted by true label.
  """
  if n_true == 0 or n_predicted == 0:
    return []
  true_size = np.bincount(true_labels.ravel(), minlength=n_true + 1)
  predicted_size = np.bincount(predicted_labels.ravel(), minlength=n_predicted + 1)
  both = (true_labels > 0) & (predicted_labels > 0)
  pair = true_labels[both].astype(np.int64) * (n_predicted + 1) + predicted_labels[both]
  overlap = np.bincount(pair, minlength=(n_true + 1) * (n_predicted + 1)).reshape(
      n_true + 1, n_predicted + 1)[1:, 1:]
  dice_matrix = 2.0 * overlap / (true_size[1:, None] + predicted_size[None, 1:])
  cost = np.where(dice_matrix > _MATCHING_THRESHOLD, 1.0 - dice_matrix, 1.0 + 1e-6)
  return [(t + 1, p + 1, float(dice_matrix[t, p])) for t, p in _min_cost_assignment(cost)
          if cost[t, p] < 1.0]


def lesion_metrics(predicted: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float],
                   min_volume_mm3: float = MIN_LESION_VOLUME_MM3,
                   penalty: float = LESION_HD95_PENALTY_MM) -> dict[str, float]:
  """Lesion-wise Dice and HD95 of one binary region, BraTS 2023+ (brats-evaluation 0.0.10).

  1. Lesions: the connected components of P and of T (26-connectivity in 3D, `label_components`;
     no dilation).
  2. Matching: one-to-one, the assignment that maximises the summed Dice of overlapping pairs
     (`match_lesions`).
  3. Scores: each true lesion of at least ``min_volume_mm3`` contributes its matched pair's Dice
     and HD95 (`pooled_hd95`: Panoptica's pooled percentile), or Dice 0 and HD95 ``penalty`` if
     unmatched (false negative); each unmatched predicted lesion (false positive, whatever its
     size) contributes Dice 0 and HD95 ``penalty``; smaller true lesions contribute nothing (nor
     do the predicted lesions matched to them).
  4. ``lesion_dice``, ``lesion_hd95``: the sums over those contributions divided by their number
     (the counted true lesions plus the false positives). With no contribution at all (T has no
     counted lesion and P no false positive, e.g. both empty) Dice 1 and HD95 0, the BraTS rule
     for empty masks; the toolkit reports NaN there, and also where T has no counted lesion but P
     has false positives (here: Dice 0, HD95 ``penalty``).

  Also returned, as Panoptica reports them: ``matched_dice`` and ``matched_hd95``, the means over
  the matched pairs only, every true lesion counted (its ``sq_dsc``, ``sq_hd95``, which the
  toolkit's ``parse_seg_results`` calls ``lesionwise_*_mean``; no match: Dice 0 and HD95 inf, or
  NaN if neither P nor T has a lesion), and the counts.

  Args:
    predicted: boolean (or 0/1) mask, any ndim >= 1 (lesions in 2D: 8-connectivity).
    truth: boolean (or 0/1) mask of the same shape.
    spacing: voxel size in mm along each axis (volumes in mm^3, distances in mm).
    min_volume_mm3: true lesions below this volume are left out of ``lesion_*``.
    penalty: HD95 of a missed or false-positive lesion, mm.

  Returns:
    ``{"lesion_dice", "lesion_hd95", "matched_dice", "matched_hd95", "true_lesions",
    "predicted_lesions", "counted_lesions", "true_positives", "false_negatives",
    "false_positives"}``, Python floats (counts as floats too, for CSV rows).
  """
  predicted, truth = _as_pair(predicted, truth)
  spacing = _as_spacing(spacing, predicted.ndim)
  predicted_labels, n_predicted = label_components(predicted)
  true_labels, n_true = label_components(truth)
  matches = match_lesions(predicted_labels, n_predicted, true_labels, n_true)
  voxel_mm3 = math.prod(spacing)
  true_volume = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:] * voxel_mm3
  matched_dice, matched_hd95 = {}, {}
  for true_label, predicted_label, pair_dice in matches:
    # Distances on the pair's own bounding box (grown by one voxel in _pooled_hd95).
    box = _union_box((true_labels == true_label) | (predicted_labels == predicted_label), margin=1)
    matched_dice[true_label] = pair_dice
    matched_hd95[true_label] = _pooled_hd95(predicted_labels[box] == predicted_label,
                                            true_labels[box] == true_label, spacing)
  false_positives = n_predicted - len(matches)
  dice_terms, hd95_terms = [], []
  for true_label in range(1, n_true + 1):
    if true_volume[true_label - 1] >= min_volume_mm3:
      dice_terms.append(matched_dice.get(true_label, 0.0))
      hd95_terms.append(matched_hd95.get(true_label, penalty))
  counted = len(dice_terms)
  dice_terms += [0.0] * false_positives
  hd95_terms += [penalty] * false_positives
  if matches:
    mean_matched_dice = float(np.mean(list(matched_dice.values())))
    mean_matched_hd95 = float(np.mean(list(matched_hd95.values())))
  elif n_true or n_predicted:
    mean_matched_dice, mean_matched_hd95 = 0.0, math.inf
  else:
    mean_matched_dice = mean_matched_hd95 = math.nan
  return {
      "lesion_dice": float(np.mean(dice_terms)) if dice_terms else 1.0,
      "lesion_hd95": float(np.mean(hd95_terms)) if hd95_terms else 0.0,
      "matched_dice": mean_matched_dice,
      "matched_hd95": mean_matched_hd95,
      "true_lesions": float(n_true),
      "predicted_lesions": float(n_predicted),
      "counted_lesions": float(counted),
      "true_positives": float(len(matches)),
      "false_negatives": float(n_true - len(matches)),
      "false_positives": float(false_positives),
  }
