"""uagan_jax/data/resample.py: linear resampling between voxel spacings, numpy only.

scipy (a test dependency only) is the reference: ``ndimage.zoom(order=1, grid_mode=True)`` uses
the same extent-keeping grid.
"""

import numpy as np
import pytest
from scipy import ndimage

from uagan_jax.data import resample


@pytest.mark.parametrize("shape", [(22, 19, 27), (10, 9, 3), (40, 34, 18), (7, 17, 9)])
def test_resize_is_scipys_linear_zoom_on_the_same_grid(shape):
  volume = np.random.default_rng(0).normal(size=(20, 17, 9)).astype(np.float32)
  zoom = [m / n for m, n in zip(shape, volume.shape)]
  want = ndimage.zoom(volume, zoom, order=1, grid_mode=True, mode="nearest", prefilter=False)
  got = resample.resize(volume, shape)
  assert got.shape == shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("source, target", [((20, 17, 9, 3), (40, 34, 18)),
                                             ((24, 24, 16), (12, 11, 31)),
                                             ((5, 6, 7, 2, 2), (5, 13, 3))])
def test_resize_is_each_axis_in_turn_below_plus_difference_times_weight_to_the_bit(source,
                                                                                   target):
  # The definition, one axis after the other in float32, written the plain way; the module
  # computes it in another memory order (the axis first), which must not change a bit.
  volume = np.random.default_rng(2).normal(size=source).astype(np.float32)
  want = volume
  for axis, m in enumerate(target):
    n = want.shape[axis]
    if n == m:
      continue
    position = np.clip((np.arange(m) + 0.5) * (n / m) - 0.5, 0.0, n - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n - 1)
    weight = (position - lower).astype(np.float32).reshape((m,) + (1,) * (want.ndim - axis - 1))
    below, above = np.take(want, lower, axis=axis), np.take(want, upper, axis=axis)
    want = below + (above - below) * weight
  got = resample.resize(volume, target)
  assert got.shape == want.shape and got.dtype == np.float32 and got.flags.c_contiguous
  assert got.tobytes() == want.tobytes()


def test_resize_keeps_trailing_channels_apart_and_an_unchanged_shape_exact():
  volume = np.random.default_rng(1).random((12, 10, 8, 3)).astype(np.float32)
  got = resample.resize(volume, (6, 15, 8))
  for channel in range(3):
    np.testing.assert_array_equal(got[..., channel], resample.resize(volume[..., channel],
                                                                     (6, 15, 8)))
  np.testing.assert_array_equal(resample.resize(volume, volume.shape[:3]), volume)
  # Halving an axis averages each pair of voxels (the sample falls halfway between them).
  np.testing.assert_allclose(resample.resize(volume, (6, 10, 8)),
                             0.5 * (volume[0::2] + volume[1::2]), atol=1e-6)


def test_needs_resampling_has_a_one_percent_tolerance_and_shape_at_keeps_the_extent():
  assert not resample.needs_resampling((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
  assert not resample.needs_resampling((1.009, 0.995, 1.0), (1.0, 1.0, 1.0))
  assert resample.needs_resampling((1.0, 1.0, 1.02), (1.0, 1.0, 1.0))
  assert resample.needs_resampling((0.9, 0.9, 0.9), (1.0, 1.0, 1.0))
  assert resample.shape_at((240, 240, 155), (1, 1, 1), (2, 2, 2)) == (120, 120, 78)
  assert resample.shape_at((100, 100, 40), (0.9, 0.9, 3.0), (1, 1, 1)) == (90, 90, 120)
  with pytest.raises(ValueError, match="three positive numbers"):
    resample.needs_resampling((1.0, 0.0, 1.0), (1.0, 1.0, 1.0))


def test_image_to_spacing_keeps_the_background_zero_and_the_brain_its_size():
  image = np.zeros((60, 60, 30), np.float32)
  image[10:50, 16:46, 8:28] = np.random.default_rng(2).uniform(100, 200, (40, 30, 20))
  for target, brain_voxels in (((2.0, 2.0, 2.0), (20, 15, 10)), ((0.5, 1.0, 4.0), (80, 30, 5))):
    out = resample.image_to_spacing(image, (1.0, 1.0, 1.0), target)
    assert out.shape == resample.shape_at(image.shape, (1, 1, 1), target)
    brain = out != 0
    # The brain keeps its extent in mm: no rim of faint interpolated voxels around it.
    assert tuple(int(brain.any(axis=tuple(a for a in range(3) if a != axis)).sum())
                 for axis in range(3)) == brain_voxels
    # Linear: never outside the input's range (at the edge, a blend of brain and 0).
    assert out.min() == 0 and out.max() <= 200 + 1e-3


def test_labels_to_shape_round_trips_and_keeps_thin_structures():
  labels = np.zeros((40, 40, 20), np.uint8)
  labels[10:30, 10:30, 5:15] = 2
  labels[15:25, 15:25, 8:12] = 1
  labels[18:22, 18:22, 9:11] = 4
  up = resample.labels_to_shape(labels, (80, 80, 40))
  assert up.dtype == np.uint8 and set(np.unique(up)) == {0, 1, 2, 4}
  np.testing.assert_array_equal(resample.labels_to_shape(up, labels.shape), labels)
  # At 0.9 mm and back, almost every voxel keeps its label, every label survives.
  there = resample.labels_to_shape(labels, resample.shape_at(labels.shape, (1, 1, 1),
                                                             (0.9, 0.9, 0.9)))
  back = resample.labels_to_shape(there, labels.shape)
  assert set(np.unique(there)) == {0, 1, 2, 4}
  assert np.mean(back == labels) > 0.99
