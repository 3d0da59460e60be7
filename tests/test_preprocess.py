"""Tests for uagan_jax.data.preprocess: brain z-score, centred crop/pad and slicing."""

import numpy as np
import pytest

from uagan_jax.data import preprocess


def _brain_volume(seed: int = 0) -> np.ndarray:
  """Gaussian "brain" intensities (mean 300, std 40) inside a box, exact zeros outside."""
  rng = np.random.default_rng(seed)
  image = np.zeros((20, 16, 8), np.float32)
  image[3:17, 2:14, 1:7] = rng.normal(300.0, 40.0, (14, 12, 6))
  return image


def test_zscore_brain_statistics_and_background():
  image = _brain_volume()
  brain = image != 0
  out = preprocess.zscore_brain(image, clip=10.0)  # |z| < 10 everywhere: clipping never bites
  assert out.dtype == np.float32 and out.shape == image.shape
  assert abs(out[brain].mean()) < 1e-5
  assert abs(out[brain].std() - 1.0) < 1e-5
  assert np.all(out[~brain] == 0.0)
  expected = (image[brain] - image[brain].astype(np.float64).mean()) / image[brain].std()
  np.testing.assert_allclose(out[brain], expected, rtol=1e-5, atol=1e-5)


def test_zscore_brain_clips():
  image = _brain_volume()
  out = preprocess.zscore_brain(image, clip=1.5)  # ~13% of a Gaussian lies beyond 1.5 std
  assert out.max() == 1.5 and out.min() == -1.5
  unclipped = preprocess.zscore_brain(image, clip=10.0)
  np.testing.assert_array_equal(out, np.clip(unclipped, -1.5, 1.5))
  assert np.all(out[image == 0] == 0.0)


def test_zscore_brain_degenerate_inputs():
  assert not preprocess.zscore_brain(np.zeros((4, 4, 2)), clip=5.0).any()
  constant = np.zeros((4, 4, 2), np.float32)
  constant[1:3, 1:3] = 7.0
  out = preprocess.zscore_brain(constant, clip=5.0)
  assert np.isfinite(out).all() and not out.any()
  with pytest.raises(ValueError):
    preprocess.zscore_brain(constant, clip=0.0)


@pytest.mark.parametrize("shape, size", [
    ((12, 10), (8, 6)),     # crop both, even differences
    ((11, 9), (8, 6)),      # crop both, odd differences
    ((5, 4), (8, 9)),       # pad both, odd and even
    ((12, 5), (7, 8)),      # crop one axis, pad the other
    ((7, 8), (7, 8)),       # identity
])
def test_center_crop_or_pad_round_trip(shape, size):
  rng = np.random.default_rng(0)
  array = rng.integers(1, 100, shape + (3, 2)).astype(np.int32)  # trailing axes ride along
  out, crop_pad = preprocess.center_crop_or_pad(array, size=size)
  assert out.shape == size + (3, 2)
  back = preprocess.undo_center_crop_or_pad(out, crop_pad, fill=-1)
  assert back.shape == array.shape
  kept = back != -1
  np.testing.assert_array_equal(back[kept], array[kept])
  # Exactly min(n, s) voxels per axis survive; the rest were cropped away.
  rows = min(shape[0], size[0])
  cols = min(shape[1], size[1])
  assert kept[..., 0, 0].sum() == rows * cols
  # Padding is 0 and the kept block is centred.
  assert (out != 0).sum() == rows * cols * 6
  for axis in (0, 1):
    n, s = shape[axis], size[axis]
    if n >= s:
      assert crop_pad.crop_start[axis] == (n - s) // 2 and crop_pad.pad_before[axis] == 0
    else:
      assert crop_pad.pad_before[axis] == (s - n) // 2 and crop_pad.crop_start[axis] == 0


def test_center_crop_or_pad_by_hand():
  array = np.arange(5)[:, None] * 10 + np.arange(3)[None, :]  # 5 x 3
  out, crop_pad = preprocess.center_crop_or_pad(array, size=(3, 5))
  assert out.tolist() == [[0, 10, 11, 12, 0], [0, 20, 21, 22, 0], [0, 30, 31, 32, 0]]
  assert crop_pad.crop_start == (1, 0) and crop_pad.pad_before == (0, 1)
  back = preprocess.undo_center_crop_or_pad(out, crop_pad)
  assert back.tolist() == [[0, 0, 0], [10, 11, 12], [20, 21, 22], [30, 31, 32], [0, 0, 0]]
  with pytest.raises(ValueError):
    preprocess.undo_center_crop_or_pad(out[:2], crop_pad)


def test_volume_to_slices():
  image = _brain_volume()
  regions = np.zeros(image.shape + (3,), bool)
  regions[8:10, 6:8, 2:4, 0] = True
  regions[8, 6, 3, 1:] = True
  slices, region_slices, has_brain, crop_pad = preprocess.volume_to_slices(
      image, regions, size=(16, 18), clip=5.0)
  assert slices.shape == (8, 16, 18) and slices.dtype == np.float32
  assert region_slices.shape == (8, 16, 18, 3) and region_slices.dtype == np.uint8
  assert has_brain.tolist() == [False, True, True, True, True, True, True, False]
  assert region_slices.sum(axis=(0, 1, 2)).tolist() == [8, 1, 1]
  # Slice z of the output is the normalised, cropped/padded axial slice image[:, :, z].
  normalised = preprocess.zscore_brain(image, clip=5.0)
  for z in range(8):
    expected, _ = preprocess.center_crop_or_pad(normalised[:, :, z], size=(16, 18))
    np.testing.assert_array_equal(slices[z], expected)
  np.testing.assert_array_equal(preprocess.slices_to_volume(region_slices, crop_pad),
                                regions.astype(np.uint8))
  no_regions = preprocess.volume_to_slices(image, None, size=(16, 18), clip=5.0)
  assert no_regions[1] is None
  np.testing.assert_array_equal(no_regions[0], slices)


def _brain(shape, xs, ys):
  brain = np.zeros(shape, bool)
  brain[xs[0]:xs[1], ys[0]:ys[1]] = True
  return brain


@pytest.mark.parametrize("shape", [(240, 240), (96, 96), (60, 50), (33, 47)])
def test_brain_window_is_the_centred_crop_where_that_holds_the_brain(shape):
  brain = _brain(shape, (shape[0] // 2 - 10, shape[0] // 2 + 10), (shape[1] // 2 - 12,
                                                                   shape[1] // 2 + 12))
  assert preprocess.brain_window(brain, size=(32, 32), stride=16) == \
      preprocess.centred(shape, size=(32, 32))


@pytest.mark.parametrize("shape,xs,ys", [
    ((240, 240), (40, 190), (30, 205)),   # a real brain against 96x96 slices: larger canvas
    ((240, 240), (2, 60), (180, 238)),    # a small brain off-centre: the window moves
    ((100, 70), (0, 100), (5, 66)),       # brain as long as the axis: padded to the stride
    ((97, 130), (10, 90), (0, 130))])
def test_brain_window_holds_every_brain_voxel_at_the_stride(shape, xs, ys):
  brain = _brain(shape, xs, ys)
  window = preprocess.brain_window(brain, size=(96, 96), stride=16)
  assert all(s % 16 == 0 and s >= 96 for s in window.size)
  canvas = preprocess.apply_crop_pad(brain, window)
  assert canvas.shape == window.size
  assert canvas.sum() == brain.sum()  # nothing of the brain cut away
  # The canvas is no larger than the brain (rounded up to the stride) or the training size.
  for axis, (first, last) in enumerate((xs, ys)):
    assert window.size[axis] == max(96, -(-(last - first) // 16) * 16)
  np.testing.assert_array_equal(preprocess.undo_center_crop_or_pad(canvas, window), brain)


def test_volume_to_slices_through_a_window():
  rng = np.random.default_rng(0)
  image = np.zeros((70, 64, 5), np.float32)
  image[3:67, 10:60] = rng.uniform(1, 2, (64, 50, 5))
  window = preprocess.brain_window(np.any(image != 0, axis=2), size=(32, 32), stride=8)
  slices, _, has_brain, crop_pad = preprocess.volume_to_slices(image, None, size=(32, 32),
                                                               clip=5.0, window=window)
  assert crop_pad == window and slices.shape == (5, 64, 56) and has_brain.all()
  np.testing.assert_array_equal(preprocess.slices_to_volume(slices, crop_pad),
                                preprocess.zscore_brain(image, clip=5.0))
