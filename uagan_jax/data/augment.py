"""On-device data augmentation, per example, inside the compiled step.

Each example's randomness comes from its own key, ``fold_in(step_key, global_example_index)``, so
the augmented batch is the same whether one device or eight share it, and a resumed run
augments exactly as an uninterrupted one.

Two layers. The original one (``data.augment``): random in-plane flips and an affine intensity
jitter. The scanner-shift one (``data.augmentations``, every transform off by default): in-plane
rotation, scaling, elastic deformation (one combined sampling grid), then, on the brain only, a
bias field, Gaussian noise, Gaussian blur, brightness, contrast, simulated low resolution and
gamma, each applied to an example with its own probability. A transform whose probability is 0 is
not traced at all, so with every probability at 0 the step is the original program, bit for bit.
Each transform draws from its own key, ``fold_in(example_key, TRANSFORM_KEYS[name])``, so turning
one on or off never changes another's draws.

The probabilities and ranges of the full recipes follow nnU-Net's 2D defaults (Isensee et al.
2021, ``nnUNetTrainer.get_training_transforms``) where nnU-Net has the transform; the elastic
deformation and the bias field follow TorchIO's ``RandomElasticDeformation`` and
``RandomBiasField`` (Pérez-García et al. 2021). See configs/*.py and uagan_jax/config.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

# The fold_in tag of each transform's key. Fixed numbers (never positions in a list), so that a
# new transform takes a new number and every other transform keeps its draws.
TRANSFORM_KEYS = {
    "rotation": 101, "scale": 102, "elastic": 103, "bias": 104, "noise": 105, "blur": 106,
    "brightness": 107, "contrast": 108, "low_resolution": 109, "gamma": 110,
}
# The intensity transforms, in the order they are applied (nnU-Net's order for its own: noise,
# blur, brightness, contrast, low resolution, gamma; the bias field first, as in a scanner it
# multiplies the signal before the noise is added).
INTENSITY_TRANSFORMS = ("bias", "noise", "blur", "brightness", "contrast", "low_resolution",
                        "gamma")
_EPS = 1e-7


def augment_example(image: jax.Array, regions: jax.Array, key: jax.Array, *,
                    flip: bool = True, intensity_scale: float = 0.0,
                    intensity_shift: float = 0.0,
                    augmentations: Mapping | None = None) -> tuple[jax.Array, jax.Array]:
  """Augments one [H, W, C] slice and its [H, W, R] region maps.

  Flips of both in-plane axes (image and regions together), then the scanner-shift transforms of
  ``augmentations`` (the keys of ``config.data.augmentations``; None or every ``*_p`` at 0: none),
  with the affine jitter between the spatial and the other intensity transforms. The jitter
  multiplies the z-scored image by ``1 + U(-scale, scale)`` and adds ``U(-shift, shift)``. Every
  intensity change acts inside the brain only: background stays exactly 0, as after
  preprocessing.
  """
  flip_key, scale_key, shift_key = jax.random.split(key, 3)
  settings = dict(augmentations or {})
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (2,))
    for axis in (0, 1):
      image = jnp.where(flips[axis], jnp.flip(image, axis), image)
      regions = jnp.where(flips[axis], jnp.flip(regions, axis), regions)
  if any(settings.get(f"{name}_p", 0.0) > 0 for name in ("rotation", "scale", "elastic")):
    image, regions = _random_spatial(image, regions, key, settings)
  brain = image != 0
  scale = 1.0 + jax.random.uniform(scale_key, minval=-intensity_scale, maxval=intensity_scale)
  shift = jax.random.uniform(shift_key, minval=-intensity_shift, maxval=intensity_shift)
  image = jnp.where(brain, image * scale + shift, 0.0)
  for name in INTENSITY_TRANSFORMS:
    probability = settings.get(f"{name}_p", 0.0)
    if probability > 0:  # static: a transform that is off is not in the program
      draw_key, apply_key = jax.random.split(_transform_key(key, name))
      changed = jnp.where(brain, _INTENSITY[name](image, brain, draw_key, settings), 0.0)
      image = jnp.where(jax.random.bernoulli(apply_key, probability), changed, image)
  return image, regions


def augment_batch(image: jax.Array, regions: jax.Array, example_keys: jax.Array, **kwargs
                  ) -> tuple[jax.Array, jax.Array]:
  """`augment_example` over a batch, one key per example."""
  return jax.vmap(lambda x, y, k: augment_example(x, y, k, **kwargs))(image, regions, example_keys)


def _transform_key(key: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(key, TRANSFORM_KEYS[name])


# --------------------------------------------------------------------------------------------
# Spatial: rotation, scaling and elastic deformation as one sampling grid
# --------------------------------------------------------------------------------------------


def sampling_grid(shape: tuple[int, int], *, degrees: jax.Array | float = 0.0,
                  scale: jax.Array | tuple = (1.0, 1.0),
                  displacement: jax.Array | None = None) -> jax.Array:
  """Where each output pixel of an [H, W] slice reads the input: [2, H, W] pixel coordinates.

  The content is rotated by ``degrees`` (counter-clockwise in (row, column) index space) and
  scaled by ``scale`` (per axis; > 1 enlarges) about the slice centre; ``displacement`` [2, H, W]
  (pixels) then moves each read point, the elastic part. One grid, so the image is interpolated
  once, whatever the combination.
  """
  height, width = shape
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  offset = jnp.stack([rows - centre[0], cols - centre[1]])
  angle = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # The inverse map: the output at offset o shows the input at R(-angle) o / scale.
  source_rows = cos * offset[0] + sin * offset[1]
  source_cols = -sin * offset[0] + cos * offset[1]
  scale = jnp.asarray(scale, jnp.float32)
  grid = jnp.stack([source_rows / scale[0] + centre[0], source_cols / scale[1] + centre[1]])
  if displacement is not None:
    grid = grid + displacement
  return grid


def warp(image: jax.Array, regions: jax.Array, grid: jax.Array
         ) -> tuple[jax.Array, jax.Array]:
  """Resamples [H, W, C] image and [H, W, R] binary regions at ``grid`` [2, H, W].

  Bilinear (``map_coordinates`` order 1, 0 outside the slice) for everything. Region maps are
  interpolated bilinearly and thresholded at 0.5, which keeps them binary and, unlike nearest
  neighbour, puts their border where the image's moved. The brain mask (image != 0) is resampled
  the same way and the image set to exactly 0 outside it, so that the interpolated rim of the
  brain does not become a halo of near-zero "brain".
  """
  def resample(channels):
    return jnp.stack([ndimage.map_coordinates(channels[..., c], list(grid), order=1,
                                              mode="constant", cval=0.0)
                      for c in range(channels.shape[-1])], axis=-1)

  brain = resample((image != 0).astype(image.dtype)) > 0.5
  warped_image = jnp.where(brain, resample(image), 0.0)
  warped_regions = (resample(regions) > 0.5).astype(regions.dtype)
  return warped_image, warped_regions


def elastic_displacement(key: jax.Array, shape: tuple[int, int], *, control_points: int,
                         magnitude: jax.Array | float) -> jax.Array:
  """A smooth random displacement field [2, H, W] in pixels (TorchIO's elastic deformation).

  ``control_points`` x ``control_points`` displacements drawn from ``U(-1, 1) * magnitude *
  side`` (``magnitude`` a fraction of the slice side), interpolated (cubic) to every pixel.
  """
  coarse = jax.random.uniform(key, (2, control_points, control_points), minval=-1.0, maxval=1.0)
  field = jax.image.resize(coarse, (2,) + tuple(shape), method="cubic")
  sides = jnp.array(shape, jnp.float32).reshape(2, 1, 1)
  return field * magnitude * sides


def _random_spatial(image, regions, key, settings):
  """Rotation, scaling and elastic deformation, each with its probability, as one warp."""
  shape = image.shape[:2]
  applied = []
  degrees = 0.0
  if settings.get("rotation_p", 0.0) > 0:
    draw, apply = jax.random.split(_transform_key(key, "rotation"))
    on = jax.random.bernoulli(apply, settings["rotation_p"])
    limit = settings["rotation_degrees"]
    degrees = jnp.where(on, jax.random.uniform(draw, minval=-limit, maxval=limit), 0.0)
    applied.append(on)
  scale = (1.0, 1.0)
  if settings.get("scale_p", 0.0) > 0:
    draw, apply = jax.random.split(_transform_key(key, "scale"))
    on = jax.random.bernoulli(apply, settings["scale_p"])
    low, high = settings["scale_range"]
    factors = jax.random.uniform(draw, (2 if settings["scale_per_axis"] else 1,),
                                 minval=low, maxval=high)
    scale = jnp.where(on, jnp.broadcast_to(factors, (2,)), 1.0)
    applied.append(on)
  displacement = None
  if settings.get("elastic_p", 0.0) > 0:
    draw, size_key, apply = jax.random.split(_transform_key(key, "elastic"), 3)
    on = jax.random.bernoulli(apply, settings["elastic_p"])
    magnitude = jax.random.uniform(size_key, maxval=settings["elastic_magnitude"])
    displacement = on * elastic_displacement(
        draw, shape, control_points=settings["elastic_control_points"], magnitude=magnitude)
    applied.append(on)
  warped_image, warped_regions = warp(image, regions, sampling_grid(
      shape, degrees=degrees, scale=scale, displacement=displacement))
  # An example no spatial transform was drawn for keeps its exact pixels.
  moved = jnp.any(jnp.stack(applied))
  return (jnp.where(moved, warped_image, image), jnp.where(moved, warped_regions, regions))


# --------------------------------------------------------------------------------------------
# Intensity, on the brain only
# --------------------------------------------------------------------------------------------


def _brain_mean_std(image, brain):
  weights = brain.astype(image.dtype)
  count = jnp.maximum(weights.sum(), 1.0)
  mean = (image * weights).sum() / count
  std = jnp.sqrt((jnp.square(image - mean) * weights).sum() / count)
  return mean, std


def _brain_min_max(image, brain):
  return (jnp.min(jnp.where(brain, image, jnp.inf)), jnp.max(jnp.where(brain, image, -jnp.inf)))


def _uniform(key, bounds):
  low, high = bounds
  return jax.random.uniform(key, minval=low, maxval=high)


def bias_field(key: jax.Array, shape: tuple[int, int], *, coefficient: float) -> jax.Array:
  """A smooth multiplicative field [H, W]: exp of a random quadratic over the slice.

  The quadratic's five non-constant coefficients (u, v, u^2, v^2, uv on [-1, 1] coordinates) are
  each drawn from ``U(-coefficient, coefficient)`` (TorchIO's RandomBiasField, order 2).
  """
  u, v = jnp.meshgrid(jnp.linspace(-1.0, 1.0, shape[0]), jnp.linspace(-1.0, 1.0, shape[1]),
                      indexing="ij")
  coefs = jax.random.uniform(key, (5,), minval=-coefficient, maxval=coefficient)
  poly = coefs[0] * u + coefs[1] * v + coefs[2] * u * u + coefs[3] * v * v + coefs[4] * u * v
  return jnp.exp(poly)


def _bias(image, brain, key, settings):
  # The image is z-scored (negative values): the field multiplies the signal above the brain's
  # darkest voxel, as a receive field multiplies the raw signal above the noise floor.
  low, _ = _brain_min_max(image, brain)
  field = bias_field(key, image.shape[:2], coefficient=settings["bias_coefficient"])[..., None]
  return (image - low) * field + low


def _noise(image, brain, key, settings):
  variance_key, noise_key = jax.random.split(key)
  sigma = jnp.sqrt(_uniform(variance_key, settings["noise_variance"]))
  return image + sigma * jax.random.normal(noise_key, image.shape, image.dtype)


def gaussian_blur(image: jax.Array, sigma: jax.Array | float, *, max_sigma: float) -> jax.Array:
  """Separable Gaussian blur of the in-plane axes of [H, W, C], 0 beyond the borders.

  The kernel has a fixed ``2 * ceil(3 * max_sigma) + 1`` taps (a traced shape cannot depend on
  the drawn ``sigma``); its weights follow ``sigma``.
  """
  radius = max(1, math.ceil(3 * max_sigma))
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(taps / jnp.maximum(sigma, _EPS)))
  weights = weights / weights.sum()
  for axis in (0, 1):
    size = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad)
    image = sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + size, axis=axis)
                for i in range(2 * radius + 1))
  return image


def _blur(image, brain, key, settings):
  low, high = settings["blur_sigma"]
  return gaussian_blur(image, _uniform(key, (low, high)), max_sigma=high)


def _brightness(image, brain, key, settings):
  return image * _uniform(key, settings["brightness_range"])


def _contrast(image, brain, key, settings):
  # nnU-Net's ContrastAugmentationTransform with preserve_range: stretch about the brain mean,
  # clip to the brain's former range.
  mean, _ = _brain_mean_std(image, brain)
  low, high = _brain_min_max(image, brain)
  return jnp.clip((image - mean) * _uniform(key, settings["contrast_range"]) + mean, low, high)


def low_resolution(image: jax.Array, zoom: jax.Array | float) -> jax.Array:
  """Simulated low resolution of [H, W, C]: nearest-neighbour downsampling by ``zoom`` (<= 1)
  per in-plane axis, then linear upsampling back to the grid (nnU-Net upsamples cubically).

  The coarse grid has ``ceil(side * zoom)`` cells; its size is traced as an index bound, not a
  shape, so ``zoom`` may be drawn per example. ``zoom`` 1 returns the image unchanged.
  """
  for axis in (0, 1):
    size = image.shape[axis]
    cells = jnp.ceil(size * zoom).astype(jnp.int32)
    # Output pixel i lies at coarse coordinate (i + 0.5) * zoom - 0.5 (pixel centres aligned).
    coarse = jnp.clip((jnp.arange(size, dtype=jnp.float32) + 0.5) * zoom - 0.5, 0.0, None)
    lower = jnp.floor(coarse).astype(jnp.int32)
    weight = coarse - lower
    lower = jnp.minimum(lower, cells - 1)
    upper = jnp.minimum(lower + 1, cells - 1)

    def source(cell):  # the input pixel nearest a coarse cell's centre
      return jnp.clip(jnp.round((cell + 0.5) / zoom - 0.5).astype(jnp.int32), 0, size - 1)

    shape = [1] * image.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    image = ((1 - weight) * jnp.take(image, source(lower), axis=axis) +
             weight * jnp.take(image, source(upper), axis=axis))
  return image


def _low_resolution(image, brain, key, settings):
  return low_resolution(image, _uniform(key, settings["low_resolution_zoom"]))


def _gamma(image, brain, key, settings):
  # nnU-Net's GammaTransform with retain_stats: gamma on the brain's range mapped to [0, 1],
  # mapped back, then the brain's mean and std restored. Half the draws below 1, half above.
  side_key, value_key = jax.random.split(key)
  low, high = settings["gamma_range"]
  below = _uniform(value_key, (low, min(high, 1.0)))
  above = _uniform(value_key, (max(low, 1.0), high))
  gamma = jnp.where(jax.random.bernoulli(side_key, 0.5), below, above)
  mean, std = _brain_mean_std(image, brain)
  lowest, highest = _brain_min_max(image, brain)
  span = highest - lowest + _EPS
  unit = jnp.clip((image - lowest) / span, 0.0, 1.0)
  changed = jnp.power(unit, gamma) * span + lowest
  new_mean, new_std = _brain_mean_std(changed, brain)
  return (changed - new_mean) / (new_std + _EPS) * std + mean


_INTENSITY = {"bias": _bias, "noise": _noise, "blur": _blur, "brightness": _brightness,
              "contrast": _contrast, "low_resolution": _low_resolution, "gamma": _gamma}
