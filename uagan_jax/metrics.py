"""Image-translation metrics (MAE, PSNR, SSIM) as plain numpy functions.

They compare a translated image with the true image of the target modality, both in the
normalised space of training (z-scores clipped to [-clip, clip]), so numbers are comparable
across cases and scanners. MAE and PSNR are computed over the brain (the true image's non-zero
voxels); SSIM over whole 2D slices (the background is 0 in both), averaged over slices.
"""

from __future__ import annotations

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
