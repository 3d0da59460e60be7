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


def occupancy(image: np.ndarray) -> Occupancy:
  """The `Occupancy` of a raw volume (any number of axes; one pass over it, one over its inside).

  Args:
    image: raw intensities, e.g. an (X, Y, Z) volume from `readers.load_case`.
  """
  image = np.asarray(image)
  if image.size == 0:
    return Occupancy(nonzero=0.0, border_nonzero=0.0)
  total = int(np.count_nonzero(image))
  inside = tuple(slice(BORDER_LAYERS, n - BORDER_LAYERS) if n > 2 * BORDER_LAYERS
                 else slice(None) for n in image.shape)
  inner = image[inside]
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
    image: the raw volume read from ``path``.
    path: the file it was read from, named in the warning (`image_name`).
  """
  return warning_for(occupancy(image), path=path)
