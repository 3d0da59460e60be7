"""Per-volume intensity normalisation and the volume <-> 2D axial slice conversion.

Volumes are canonical (X, Y, Z) arrays from `readers.load_case`. Slices are (Z, H, W) with
H = X and W = Y after a centred crop or pad of the X and Y axes to the configured size; the
`CropPad` record makes that exactly invertible, so whole-volume predictions go back onto the
input grid with `slices_to_volume`. Training uses that centred crop; inference uses
`brain_window`, which is the same crop wherever it holds the whole brain and otherwise a larger
canvas around the brain, so that no brain voxel is left out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Below this standard deviation the brain is treated as constant: dividing would blow up noise.
_MIN_STD = 1e-6


def zscore_brain(image: np.ndarray, *, clip: float) -> np.ndarray:
  """Z-scores an image over its brain (non-zero) voxels.

  Skull-stripped scans have exactly 0 outside the brain, so the statistics must ignore that
  background, and it must stay exactly 0 afterwards (the networks see it as "no tissue").

  Args:
    image: Raw intensities, any shape.
    clip: Normalised values are clipped to [-clip, clip].

  Returns:
    float32 array of the image's shape; all zeros where the image has no brain voxels. A
    constant brain (std below 1e-6) maps to 0 rather than dividing by ~0.
  """
  if clip <= 0:
    raise ValueError(f"clip must be positive, got {clip}")
  image = np.asarray(image)
  brain = image != 0
  out = np.zeros(image.shape, np.float32)
  if not brain.any():
    return out
  values = image[brain].astype(np.float64)  # float64 sums: 9M float32 voxels lose precision
  mean = values.mean()
  std = values.std()
  scale = 1.0 / std if std > _MIN_STD else 0.0
  out[brain] = np.clip((values - mean) * scale, -clip, clip)
  return out


@dataclasses.dataclass(frozen=True)
class CropPad:
  """How `center_crop_or_pad` mapped axes 0 and 1 of an array, per axis.

  The kept source range along an axis is [crop_start, crop_start + length) and lands at
  [pad_before, pad_before + length) in the output, with length = min(original, size).

  Attributes:
    original: The input's extent along axes 0 and 1.
    size: The output's extent along axes 0 and 1.
    crop_start: First kept source index per axis (0 where the axis was padded).
    pad_before: Output index of the first kept voxel per axis (0 where it was cropped).
  """
  original: tuple[int, int]
  size: tuple[int, int]
  crop_start: tuple[int, int]
  pad_before: tuple[int, int]

  def _slices(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(source slices, output slices) for axes 0 and 1."""
    source, output = [], []
    for n, s, c, p in zip(self.original, self.size, self.crop_start, self.pad_before):
      length = min(n, s)
      source.append(slice(c, c + length))
      output.append(slice(p, p + length))
    return tuple(source), tuple(output)


def _check_size(size) -> tuple[int, int]:
  size = tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"size must be two positive integers, got {size}")
  return size


def centred(original, *, size) -> CropPad:
  """The `CropPad` that centres an (X, Y) extent ``original`` on a ``size`` canvas: a longer axis
  cropped symmetrically (the extra voxel of an odd difference cut from the end), a shorter one
  padded the same way."""
  original = (int(original[0]), int(original[1]))
  size = _check_size(size)
  crop = tuple(max(n - s, 0) // 2 for n, s in zip(original, size))
  pad = tuple(max(s - n, 0) // 2 for n, s in zip(original, size))
  return CropPad(original=original, size=size, crop_start=crop, pad_before=pad)


def brain_window(brain: np.ndarray, *, size, stride: int) -> CropPad:
  """The `CropPad` inference cuts slices with: the whole brain, at the networks' stride.

  Per axis: where today's centred crop/pad to ``size`` (`centred`) holds every brain voxel, it is
  kept as it is (so volumes that fit give exactly the numbers of the centred crop). Where it does
  not, the canvas is the larger of ``size`` and the brain's extent rounded up to a multiple of
  ``stride``; a canvas at least as long as the axis pads it symmetrically, a shorter one is the
  window nearest to the centred crop that holds the brain.

  Args:
    brain: bool (X, Y): where any axial slice has a brain voxel (e.g. ``np.any(image != 0,
      axis=2)``, or the union over a case's modalities).
    size: The training slice size (H, W); each side a multiple of ``stride``.
    stride: What each canvas side must be divisible by (2 ** the networks' number of downs).

  Returns:
    The `CropPad` from the (X, Y) plane to the canvas.
  """
  default = centred(brain.shape, size=size)
  occupied = (brain.any(axis=1), brain.any(axis=0))
  sizes, crops, pads = list(default.size), list(default.crop_start), list(default.pad_before)
  for axis, (n, s, crop, pad) in enumerate(zip(default.original, default.size,
                                               default.crop_start, default.pad_before)):
    where = np.flatnonzero(occupied[axis])
    if where.size == 0:
      continue
    first, last = int(where[0]), int(where[-1]) + 1  # the brain's [first, last) along the axis
    if crop <= first and last <= crop + min(n, s):
      continue  # the centred crop/pad sees the whole brain along this axis
    s = max(s, -(-(last - first) // stride) * stride)
    if s >= n:
      crop, pad = 0, (s - n) // 2
    else:
      crop, pad = min(max((n - s) // 2, last - s), first), 0
    sizes[axis], crops[axis], pads[axis] = s, crop, pad
  return CropPad(original=default.original, size=tuple(sizes), crop_start=tuple(crops),
                 pad_before=tuple(pads))


def apply_crop_pad(array: np.ndarray, crop_pad: CropPad, *, fill: float = 0) -> np.ndarray:
  """Axes 0 and 1 of an (X, Y, ...) array cropped/padded as ``crop_pad`` says."""
  if tuple(array.shape[:2]) != crop_pad.original:
    raise ValueError(f"array shape {array.shape} does not start with {crop_pad.original}")
  source, output = crop_pad._slices()
  out = np.full(crop_pad.size + array.shape[2:], fill, array.dtype)
  out[output] = array[source]
  return out


def center_crop_or_pad(array: np.ndarray, *, size: tuple[int, int],
                       fill: float = 0) -> tuple[np.ndarray, CropPad]:
  """Centres axes 0 and 1 of an (X, Y, ...) array on a (size[0], size[1], ...) canvas.

  An axis longer than the target is cropped symmetrically (the extra voxel of an odd
  difference is cut from the end), a shorter one is padded the same way; trailing axes are
  untouched.

  Args:
    array: Array with at least two axes.
    size: Target extent of axes 0 and 1.
    fill: Value of padded voxels.

  Returns:
    (the new array, the `CropPad` that `undo_center_crop_or_pad` inverts).
  """
  size = _check_size(size)
  if array.ndim < 2:
    raise ValueError(f"need an (X, Y, ...) array, got shape {array.shape}")
  crop_pad = centred(array.shape[:2], size=size)
  return apply_crop_pad(array, crop_pad, fill=fill), crop_pad


def undo_center_crop_or_pad(array: np.ndarray, crop_pad: CropPad, *,
                            fill: float = 0) -> np.ndarray:
  """Restores the original extent of axes 0 and 1 after `center_crop_or_pad`.

  Args:
    array: Array of shape (size[0], size[1], ...).
    crop_pad: The record `center_crop_or_pad` returned.
    fill: Value of the voxels the crop had cut away.

  Returns:
    Array of shape (original[0], original[1], ...).
  """
  if tuple(array.shape[:2]) != crop_pad.size:
    raise ValueError(f"array shape {array.shape} does not start with {crop_pad.size}")
  source, output = crop_pad._slices()
  out = np.full(crop_pad.original + array.shape[2:], fill, array.dtype)
  out[source] = array[output]
  return out


def volume_to_slices(
    image: np.ndarray, regions: np.ndarray | None, *, size: tuple[int, int], clip: float,
    window: CropPad | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, CropPad]:
  """Normalises a canonical volume and cuts it into axial slices.

  Args:
    image: Raw (X, Y, Z) intensities.
    regions: (X, Y, Z, 3) region masks (WT, TC, ET), or None.
    size: Slice extent (H, W) = the cropped/padded (X, Y).
    clip: Z-score clip, see `zscore_brain`.
    window: Where to cut the (X, Y) plane instead of the centred crop/pad to ``size`` (e.g.
      `brain_window`); the slices then have its extent.

  Returns:
    (slices float32 (Z, H, W), regions uint8 (Z, H, W, 3) or None, has_brain bool (Z,) = the
    raw slice has a non-zero voxel (before the crop), the `CropPad`).
  """
  if image.ndim != 3:
    raise ValueError(f"image must be (X, Y, Z), got shape {image.shape}")
  has_brain = np.any(image != 0, axis=(0, 1))
  crop_pad = centred(image.shape[:2], size=size) if window is None else window
  normalised = apply_crop_pad(zscore_brain(image, clip=clip), crop_pad)
  slices = np.ascontiguousarray(np.moveaxis(normalised, 2, 0))
  region_slices = None
  if regions is not None:
    if regions.shape != image.shape + (3,):
      raise ValueError(f"regions shape {regions.shape} does not match image {image.shape} + (3,)")
    cropped = apply_crop_pad(regions.astype(np.uint8, copy=False), crop_pad)
    region_slices = np.ascontiguousarray(np.moveaxis(cropped, 2, 0))
  return slices, region_slices, has_brain, crop_pad


def slices_to_volume(slices: np.ndarray, crop_pad: CropPad, *, fill: float = 0) -> np.ndarray:
  """Inverse of the geometry of `volume_to_slices`: (Z, H, W, ...) -> (X, Y, Z, ...).

  Args:
    slices: Per-slice arrays, e.g. predicted region maps (Z, H, W, 3).
    crop_pad: The record `volume_to_slices` returned for this volume.
    fill: Value of the voxels the crop had cut away.

  Returns:
    Array on the canonical volume grid, axes (X, Y, Z, ...).
  """
  return undo_center_crop_or_pad(np.moveaxis(slices, 0, 2), crop_pad, fill=fill)
