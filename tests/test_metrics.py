"""Translation metrics against hand-computed values."""

import numpy as np
import pytest

from uagan_jax import metrics


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
