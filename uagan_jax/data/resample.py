"""Volumes from one voxel spacing to another: separable linear interpolation, numpy only.

A model is trained at one spacing (config ``data.spacing``, mm); a scan of another spacing is
resampled to it before the networks see it, and what they give back is resampled onto the scan's
own grid. The grid convention is that of nnU-Net (skimage ``resize``): the physical extent of the
volume is kept, so along an axis of n voxels resampled to m, output voxel j sits at input
coordinate ``(j + 0.5) * n / m - 0.5`` (voxel centres, the outermost ones clamped to the edge).
Resampling to a shape and back to the original shape therefore maps every voxel to its own place.

* `needs_resampling`: whether two spacings differ beyond `TOLERANCE` (1%); within it nothing is
  resampled, so a 1 mm scan goes through a 1 mm model exactly as before.
* `shape_at`: the shape of a volume at another spacing.
* `resize`: linear interpolation of the first three axes to a shape (any trailing axes kept).
* `image_to_spacing`: a scan to another spacing, its background (0 outside the brain) kept 0.
* `labels_to_shape`: a label map to a shape through its one-hot channels (linear, then the
  most probable label), the way nnU-Net resamples segmentations.

There is no anti-aliasing: downsampling by an integer factor f is then a box average over f voxels
along the axis for f = 2 (the sample falls halfway between two voxels), and a plain linear sample
otherwise, as nnU-Net does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Relative difference of spacings below which a volume is used as it is: scanners write
# 0.9375 or 1.0000001 mm for "1 mm", and resampling by < 1% would blur for nothing.
TOLERANCE = 0.01


def _spacing(spacing: Sequence[float], name: str) -> np.ndarray:
  values = np.asarray(spacing, np.float64)
  if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise ValueError(f"{name} must be three positive numbers (mm), got {tuple(spacing)}")
  return values


def needs_resampling(spacing: Sequence[float], target: Sequence[float], *,
                     tolerance: float = TOLERANCE) -> bool:
  """Whether ``spacing`` differs from ``target`` by more than ``tolerance`` (relative) on an
  axis."""
  spacing, target = _spacing(spacing, "spacing"), _spacing(target, "target")
  return bool(np.any(np.abs(spacing - target) > tolerance * target))


def shape_at(shape: Sequence[int], spacing: Sequence[float],
             target: Sequence[float]) -> tuple[int, int, int]:
  """The (X, Y, Z) shape that covers the extent of ``shape`` voxels of ``spacing`` at ``target``.

  Each axis is rounded to the nearest voxel count, at least 1.
  """
  spacing, target = _spacing(spacing, "spacing"), _spacing(target, "target")
  extent = np.asarray(shape[:3], np.float64) * spacing
  return tuple(max(1, int(round(n))) for n in extent / target)


def _axis_weights(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For n input voxels sampled at m output voxels: lower index, upper index, upper weight."""
  position = (np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5
  position = np.clip(position, 0.0, n - 1)
  lower = np.floor(position).astype(np.int64)
  upper = np.minimum(lower + 1, n - 1)
  return lower, upper, position - lower


def resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Linear interpolation of the first three axes of ``array`` to ``shape`` (float32 result).

  Separable: one axis at a time, each output voxel a weighted mean of its two neighbours along the
  axis. An axis whose size does not change is copied, not interpolated.

  Args:
    array: (X, Y, Z, ...) values; trailing axes (e.g. region channels) are interpolated
      independently.
    shape: The output's (X, Y, Z).

  Returns:
    float32 array of shape ``shape + array.shape[3:]``.
  """
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape must be three positive integers, got {shape}")
  if array.ndim < 3:
    raise ValueError(f"need an (X, Y, Z, ...) array, got shape {array.shape}")
  out = np.asarray(array, np.float32)
  for axis, m in enumerate(shape):
    n = out.shape[axis]
    if n == m:
      continue
    lower, upper, weight = _axis_weights(n, m)
    weight = weight.astype(np.float32).reshape((m,) + (1,) * (out.ndim - 1))
    # The axis first and contiguous: the gathers copy whole blocks and the arithmetic runs in
    # place (several times faster than np.take along an inner axis). Each voxel is still
    # below + (above - below) * weight in float32, so the values are the same to the bit.
    first = np.ascontiguousarray(np.moveaxis(out, axis, 0))
    below, above = first[lower], first[upper]
    np.subtract(above, below, out=above)
    np.multiply(above, weight, out=above)
    np.add(below, above, out=below)
    out = np.moveaxis(below, 0, axis)
  return np.ascontiguousarray(out)


def image_to_spacing(image: np.ndarray, spacing: Sequence[float],
                     target: Sequence[float]) -> np.ndarray:
  """A scan resampled from ``spacing`` to ``target`` (linear), background kept exactly 0.

  Skull-stripped scans are 0 outside the brain, and the z-score and the networks read 0 as "no
  tissue". Linear interpolation would smear the brain's edge into a rim of small non-zero values;
  instead the brain mask is resampled too (linearly) and voxels less than half inside are 0, so
  the brain keeps its physical size.

  Args:
    image: Raw (X, Y, Z) intensities.
    spacing: The image's voxel size in mm.
    target: The voxel size to resample to.

  Returns:
    float32 (X', Y', Z') array, ``shape_at(image.shape, spacing, target)``.
  """
  shape = shape_at(image.shape, spacing, target)
  out = resize(image, shape)
  brain = resize((image != 0).astype(np.float32), shape) >= 0.5
  out[~brain] = 0
  return out


def labels_to_shape(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """A label map resampled to ``shape`` through its one-hot channels.

  Each label's indicator is interpolated linearly and every output voxel gets the label of the
  largest value (ties: the smaller label), so thin structures do not vanish or shift the way
  nearest-neighbour sampling makes them.

  Args:
    labels: Integer (X, Y, Z) label map.
    shape: The output's (X, Y, Z).

  Returns:
    Array of ``labels``' dtype and shape ``shape``.
  """
  values = np.unique(labels)
  best = np.full(tuple(int(n) for n in shape), -1.0, np.float32)
  out = np.zeros(best.shape, labels.dtype)
  for value in values:
    score = resize((labels == value).astype(np.float32), shape)
    better = score > best
    out[better] = value
    best[better] = score[better]
  return out
