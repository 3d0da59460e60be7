"""Checks of raw input volumes that warn rather than stop: is this what the models expect?

Every model here is trained on skull-stripped brains: exactly 0 outside the brain. The brain
z-score (`preprocess.zscore_brain`) and the choice of slices with brain take every non-zero voxel
for brain, so a volume with its skull, scalp and background noise still in it is normalised over
the whole head and segmented from slices that are mostly not brain, silently (the `:demo` models
fall from FLAIR WT Dice 0.90 to about 0.1 on such phantoms). `skull_strip_warning` looks at the
raw volume, before any of that, and returns one line naming the file, what it saw and what to do.

It sees the background, not the skull itself: what gives a scan that was not skull-stripped
away is noise (or anything non-zero) where a stripped brain has 0, that is nearly everywhere
and at the volume's border. A head whose skull is kept but whose background is exactly 0 (the
synthetic phantoms of `synthetic`, whose skull shell is part of their anatomy) passes.

A background that is one constant other than 0 is not "not skull-stripped": other pipelines
z-score a stripped brain and leave the background at the volume's minimum (-2.7 to -6.2 for
BraTS-style scans), or offset every voxel by a constant. `constant_background` recognises it (the
volume's minimum, which most of the border equals); `readers.load_case` sets those voxels to 0
before anything else sees the image, so the brain mask, z-score, slices and this check are those
of the same scan with a 0 background, and the commands say so in one line per file
(`background_note`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The border is the voxels within this many layers of a face of the volume (along every axis
# longer than twice this; a thin axis, e.g. of a single slice, has no border faces).
BORDER_LAYERS = 3
# Warn when at least this fraction of the border voxels is non-zero. Measured (fraction of the
# border non-zero, outer 3 layers): skull-stripped volumes 0.000-0.042 (synthetic phantoms,
# 32^3 to 240x240x155; the real UPENN-GBM case, all 4 modalities: 0.007, its brain touching the
# lowest slices), at most 0.036 (real) and 0.186 (a 32^3 phantom) even when cropped to the
# brain's own bounding box; not skull-stripped (Rician background noise of sigma 2% of the
# median brain intensity): 0.98-1.00; with a weak noise (sigma 0.2%, most of the background
# rounding to 0 in the phantoms' int16) 0.39-0.83 (0.14 for the real T2, whose background is
# then 86% zero: nearly stripped); every voxel non-zero: 1.00.
BORDER_NONZERO_THRESHOLD = 0.30
# Warn when at least this fraction of all voxels is non-zero. An ellipsoid fills pi/6 = 0.52 of
# its bounding box, so a brain alone cannot fill much more even cropped tightly. Measured:
# skull-stripped 0.18 (real, 240x240x155), 0.31-0.34 (phantoms), 0.47-0.53 cropped to the
# brain's box; not skull-stripped 0.98-1.00 (noise as above), 0.82-0.89 (weak noise); every voxel
# non-zero 1.00. This catches a whole head whose outermost layers were zero-padded.
NONZERO_THRESHOLD = 0.75
# A volume's minimum is its constant background when at least this fraction of the border
# voxels equals it: exactly the border the skull-strip check would let pass once that value is 0
# (a stripped brain touches at most 0.19 of its border even cropped to its box, see above).
BACKGROUND_BORDER_FRACTION = 1.0 - BORDER_NONZERO_THRESHOLD
# "Equals the minimum" within this tolerance, relative to the volume's range (max - min): a float
# file's background is normally one float value, but a pipeline that computed it in float64 and
# wrote float32 may leave voxels a few float32 steps (1.2e-7 relative) apart.
BACKGROUND_RTOL = 1e-6
ADVICE = ("skull-strip it first, e.g. with HD-BET or SynthStrip: the brain z-score and the slices "
          "take every non-zero voxel for brain, and the models are trained on skull-stripped "
          "brains (0 outside the brain)")


@dataclasses.dataclass(frozen=True)
class Occupancy:
  """How much of a volume is non-zero.

  Attributes:
    nonzero: fraction of all voxels that are non-zero.
    border_nonzero: fraction of the border voxels (`BORDER_LAYERS` of every face) that are
      non-zero; 0 where the volume has no border (every axis too thin).
  """
  nonzero: float
  border_nonzero: float

  def looks_skull_stripped(self) -> bool:
    return (self.border_nonzero < BORDER_NONZERO_THRESHOLD
            and self.nonzero < NONZERO_THRESHOLD)


def _inside(shape) -> tuple[slice, ...]:
  """The index of the voxels more than `BORDER_LAYERS` from every face (an axis too thin to
  have border faces is kept whole)."""
  return tuple(slice(BORDER_LAYERS, n - BORDER_LAYERS) if n > 2 * BORDER_LAYERS
               else slice(None) for n in shape)


def _background_tolerance(image: np.ndarray, value: float) -> float:
  # Relative to the volume's own range, never an absolute number: a volume stored at 1e-24 (a
  # scaling factor gone wrong) is no more "constant" than one at 1e3.
  return BACKGROUND_RTOL * float(np.max(image) - value)


def background_mask(image: np.ndarray, value: float, *, tolerance: float | None = None
                    ) -> np.ndarray:
  """Where ``image`` holds its constant background ``value`` (from `constant_background`, so
  its minimum): every voxel within `BACKGROUND_RTOL` of the volume's range (max - value) of it,
  wherever it is; ``tolerance`` gives that distance where ``image`` is part of a volume."""
  image = np.asarray(image)
  if tolerance is None:
    tolerance = _background_tolerance(image, value)
  return image <= value + tolerance


def constant_background(image: np.ndarray) -> float | None:
  """The value of a constant background other than 0, or None.

  Rule: the background is the volume's minimum when that is not 0 and at least
  `BACKGROUND_BORDER_FRACTION` of the border voxels (`BORDER_LAYERS` of every face) equal it
  (within `BACKGROUND_RTOL` of the volume's range). That is a skull-stripped brain z-scored with
  its background left at the minimum (-2.7 to -6.2 for BraTS-style scans), or a scan offset by a
  constant. Untouched:
  a volume whose minimum is 0 (a background already 0: every skull-stripped scan, the phantoms);
  one whose minimum is inside the brain (its border is not at the minimum, e.g. a z-scored brain
  whose background is 0); a head with skull, scalp and background noise (its border is not one
  value); a volume without border faces (every axis at most 2 * `BORDER_LAYERS` long).

  The voxels to set to 0 are every voxel equal to the value (`background_mask`), inside the
  brain too: where the pipeline put the background at the brain's own minimum, the brain's
  darkest voxels (59 of the 1.6 million of the real UPENN-GBM FLAIR) become background.

  Args:
    image: raw intensities, e.g. an (X, Y, Z) volume as read from its file.
  """
  image = np.asarray(image)
  inner = image[_inside(image.shape)]
  border_size = image.size - inner.size
  if border_size == 0:
    return None
  value = float(image.min())
  if value == 0.0:
    return None
  tolerance = _background_tolerance(image, value)
  at_value = (np.count_nonzero(background_mask(image, value, tolerance=tolerance))
              - np.count_nonzero(background_mask(inner, value, tolerance=tolerance)))
  if at_value < BACKGROUND_BORDER_FRACTION * border_size:
    return None
  return value


def zero_background(image: np.ndarray) -> tuple[np.ndarray, float | None]:
  """``(image with its constant background set to 0, the background's value)`` where
  `constant_background` recognises one; else ``(image itself, None)`` (no copy)."""
  value = constant_background(image)
  if value is None:
    return image, None
  image = np.asarray(image)
  return np.where(background_mask(image, value), np.zeros((), image.dtype), image), value


def background_note(value: float, *, path) -> str:
  """The one line (no "note: " prefix) saying that ``path``'s constant background ``value`` was
  treated as background."""
  return (f"{path}: background is a constant {value:.4g} (the volume's minimum), not 0; "
          "treated as background (0)")


def log_background_note(volume, case, modality: str, *, log) -> None:
  """Logs ``note: <background_note>`` where `readers.load_case` set the constant background of
  ``volume``'s ``modality`` (of `readers.CaseFiles` ``case``) to 0 (`Volume.backgrounds`)."""
  value = volume.backgrounds.get(modality)
  if value is not None:
    log(f"note: {background_note(value, path=image_name(case, modality))}")


def occupancy(image: np.ndarray) -> Occupancy:
  """The `Occupancy` of a raw volume (any number of axes; one pass over it, one over its inside).

  Args:
    image: raw intensities, e.g. an (X, Y, Z) volume from `readers.load_case`.
  """
  image = np.asarray(image)
  if image.size == 0:
    return Occupancy(nonzero=0.0, border_nonzero=0.0)
  total = int(np.count_nonzero(image))
  inner = image[_inside(image.shape)]
  border_size = image.size - inner.size
  border = (total - int(np.count_nonzero(inner))) / border_size if border_size else 0.0
  return Occupancy(nonzero=total / image.size, border_nonzero=border)


def warning_for(seen: Occupancy, *, path) -> str | None:
  """The one-line warning for a volume of this `Occupancy` read from ``path``, or None."""
  if seen.looks_skull_stripped():
    return None
  return (f"{path}: does not look skull-stripped ({seen.nonzero:.0%} of the voxels non-zero, "
          f"{seen.border_nonzero:.0%} of the border non-zero); {ADVICE}")


def image_name(case, modality: str) -> str:
  """How a warning names the ``modality`` image of a `readers.CaseFiles`: its file, and for a
  4D file of several modalities (msd) the channel too."""
  if case.channels:
    return f"{case.images[modality]} (channel {case.channels[modality]}, {modality})"
  return str(case.images[modality])


def skull_strip_warning(image: np.ndarray, *, path) -> str | None:
  """One line naming ``path``, what was seen and what to do, if ``image`` does not look
  skull-stripped (see `BORDER_NONZERO_THRESHOLD`, `NONZERO_THRESHOLD`); else None.

  Args:
    image: the volume read from ``path`` as `readers.load_case` gives it (a constant background
      already 0: `zero_background`).
    path: the file it was read from, named in the warning (`image_name`).
  """
  return warning_for(occupancy(image), path=path)
