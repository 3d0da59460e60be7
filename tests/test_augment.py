"""On-device augmentation: image and regions move together, background stays 0, keys decide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uagan_jax import config
from uagan_jax.data import augment
from uagan_jax.errors import UserError

from conftest import ROOT


def _example():
  image = np.zeros((8, 8, 1), np.float32)
  image[1:6, 2:7, 0] = np.arange(25, dtype=np.float32).reshape(5, 5) + 1.0
  regions = np.zeros((8, 8, 3), np.float32)
  regions[2, 3, :] = 1.0
  return jnp.asarray(image), jnp.asarray(regions)


def test_flips_move_image_and_regions_together():
  image, regions = _example()
  seen = set()
  for seed in range(16):
    out_image, out_regions = augment.augment_example(image, regions, jax.random.key(seed))
    out_image, out_regions = np.asarray(out_image), np.asarray(out_regions)
    # Without jitter, the output is one of the four flips of the input, regions alike.
    candidates = {(fx, fy): (np.flip(np.flip(image, 0) if fx else image, 1) if fy else
                             (np.flip(image, 0) if fx else image))
                  for fx in (0, 1) for fy in (0, 1)}
    match = [k for k, v in candidates.items() if np.array_equal(v, out_image)]
    assert len(match) == 1
    fx, fy = match[0]
    expected = np.asarray(regions)
    expected = np.flip(expected, 0) if fx else expected
    expected = np.flip(expected, 1) if fy else expected
    np.testing.assert_array_equal(out_regions, expected)
    seen.add(match[0])
  assert len(seen) == 4  # all four flip combinations occur


def test_intensity_jitter_keeps_background_zero_and_is_keyed():
  image, regions = _example()
  kwargs = dict(flip=False, intensity_scale=0.2, intensity_shift=0.5)
  a, ra = augment.augment_example(image, regions, jax.random.key(1), **kwargs)
  b, _ = augment.augment_example(image, regions, jax.random.key(1), **kwargs)
  c, _ = augment.augment_example(image, regions, jax.random.key(2), **kwargs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  brain = np.asarray(image) != 0
  assert np.all(np.asarray(a)[~brain] == 0)
  assert not np.allclose(np.asarray(a)[brain], np.asarray(image)[brain])
  np.testing.assert_array_equal(ra, regions)  # jitter leaves the labels alone
  # The jitter is affine inside the brain: scale in [0.8, 1.2], shift in [-0.5, 0.5].
  x, y = np.asarray(image)[brain], np.asarray(a)[brain]
  scale, shift = np.polyfit(x, y, 1)
  assert 0.8 <= scale <= 1.2 and -0.5 <= shift <= 0.5


def test_batch_uses_one_key_per_example():
  image, regions = _example()
  images = jnp.stack([image] * 4)
  keys = jax.random.split(jax.random.key(0), 4)
  out, _ = augment.augment_batch(images, jnp.stack([regions] * 4), keys, intensity_scale=0.2)
  single, _ = augment.augment_example(image, regions, keys[2], intensity_scale=0.2)
  np.testing.assert_array_equal(out[2], single)
  assert len({np.asarray(o).tobytes() for o in out}) > 1


# --- The scanner-shift transforms ---------------------------------------------------------------


def _settings(**on):
  """`config.data.augmentations` as the step passes it, every transform off but those in ``on``."""
  settings = config.base_config().data.augmentations.to_dict()
  settings.update(on)
  return settings


def _brain_example(size=32):
  """A slice with a brain (positive values, 0 outside) and a bright square tumour region."""
  rng = np.random.default_rng(0)
  image = np.zeros((size, size, 1), np.float32)
  image[4:size - 4, 6:size - 6, 0] = rng.normal(1.0, 0.5, (size - 8, size - 12)) + 2.0
  regions = np.zeros((size, size, 3), np.float32)
  regions[10:18, 9:15, :] = 1.0
  image[10:18, 9:15, 0] = 10.0  # the tumour is bright, so its pixels can be found after a warp
  return jnp.asarray(image), jnp.asarray(regions)


def test_rotation_by_90_degrees_is_rot90():
  image, regions = _brain_example()
  out_image, out_regions = augment.warp(image, regions,
                                        augment.sampling_grid((32, 32), degrees=90.0))
  # Up to the interpolation's rounding (the grid's cos 90 is ~1e-8, not 0).
  np.testing.assert_allclose(out_image, np.rot90(np.asarray(image), 1), atol=1e-4)
  np.testing.assert_array_equal(out_regions, np.rot90(np.asarray(regions), 1))
  assert not np.allclose(out_image, np.rot90(np.asarray(image), -1), atol=1e-1)


def test_scale_one_rotation_zero_is_the_identity():
  image, regions = _brain_example()
  grid = augment.sampling_grid((32, 32), degrees=0.0, scale=(1.0, 1.0))
  out_image, out_regions = augment.warp(image, regions, grid)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_regions, regions)


def test_scaling_enlarges_the_content_about_the_centre():
  image, regions = _brain_example()
  _, bigger = augment.warp(image, regions, augment.sampling_grid((32, 32), scale=(1.4, 1.4)))
  _, wider = augment.warp(image, regions, augment.sampling_grid((32, 32), scale=(1.0, 1.4)))
  area = float(np.asarray(regions)[..., 0].sum())
  assert float(np.asarray(bigger)[..., 0].sum()) == pytest.approx(area * 1.4 ** 2, rel=0.25)
  rows = lambda r: np.flatnonzero(np.asarray(r)[..., 0].any(axis=1))
  cols = lambda r: np.flatnonzero(np.asarray(r)[..., 0].any(axis=0))
  # Anisotropic: the rows the region spans stay, its columns spread.
  np.testing.assert_array_equal(rows(wider), rows(regions))
  assert len(cols(wider)) > len(cols(regions))


def test_every_probability_zero_leaves_the_example_bit_identical():
  image, regions = _brain_example()
  key = jax.random.key(3)
  out_image, out_regions = augment.augment_example(image, regions, key, flip=False,
                                                   augmentations=_settings())
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_regions, regions)
  # With flips and jitter, the settings at 0 are today's step exactly.
  old = augment.augment_example(image, regions, key, intensity_scale=0.1, intensity_shift=0.1)
  new = augment.augment_example(image, regions, key, intensity_scale=0.1, intensity_shift=0.1,
                                augmentations=_settings())
  for a, b in zip(old, new):
    np.testing.assert_array_equal(a, b)


SPATIAL = ("rotation", "scale", "elastic")
INTENSITY = augment.INTENSITY_TRANSFORMS


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_transforms_keep_regions_binary_and_with_the_image(name):
  image, regions = _brain_example()
  changed = 0
  for seed in range(4):
    out_image, out_regions = augment.augment_example(
        image, regions, jax.random.key(seed), flip=False,
        augmentations=_settings(**{f"{name}_p": 1.0}, rotation_degrees=40.0,
                                elastic_magnitude=0.1))
    out_image, out_regions = np.asarray(out_image), np.asarray(out_regions)
    assert set(np.unique(out_regions)) <= {0.0, 1.0}
    changed += not np.array_equal(out_image, np.asarray(image))
    # The tumour (value 10 in the image) and its region moved together: interpolated, the two
    # disagree only along the region's border.
    tumour_pixels = out_image[..., 0] > 5.5
    disagree = np.logical_xor(tumour_pixels, out_regions[..., 0] > 0).sum()
    assert disagree <= 0.2 * out_regions[..., 0].sum()
    # Outside the (moved) brain the image is exactly 0: no faint halo of interpolated border
    # (the brain's values are >= ~1; a pixel more than half brain keeps at least half of that).
    values = np.abs(out_image[out_image != 0])
    assert values.size and values.min() >= 0.4 * np.abs(np.asarray(image)[np.asarray(image) != 0]).min()
  assert changed >= 3  # a transform at p 1 moves (almost) every draw


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_transforms_change_the_brain_only(name):
  image, regions = _brain_example()
  out_image, out_regions = augment.augment_example(
      image, regions, jax.random.key(5), flip=False, augmentations=_settings(**{f"{name}_p": 1.0}))
  out_image, image = np.asarray(out_image), np.asarray(image)
  background = image == 0
  assert np.all(out_image[background] == 0)  # exactly 0, as after preprocessing
  assert not np.allclose(out_image[~background], image[~background])
  np.testing.assert_array_equal(out_regions, regions)


def test_a_transform_applies_with_its_probability():
  image, regions = _brain_example()
  settings = _settings(brightness_p=0.3)
  changed = [not np.array_equal(augment.augment_example(image, regions, jax.random.key(s),
                                                        flip=False, augmentations=settings)[0],
                                image) for s in range(200)]
  assert 0.2 < np.mean(changed) < 0.4


def test_gamma_keeps_the_order_and_the_brain_statistics_and_stays_in_range():
  image, regions = _brain_example()
  brain = np.asarray(image)[..., 0] != 0
  inside = np.asarray(image)[..., 0][brain]
  gammas = set()
  for seed in range(12):
    out, _ = augment.augment_example(image, regions, jax.random.key(seed), flip=False,
                                     augmentations=_settings(gamma_p=1.0, gamma_range=(0.7, 1.5)))
    values = np.asarray(out)[..., 0][brain]
    assert values.mean() == pytest.approx(inside.mean(), abs=1e-4)
    assert values.std() == pytest.approx(inside.std(), rel=1e-4)
    assert np.all(np.diff(values[np.argsort(inside, kind="stable")]) >= -1e-5)  # monotone
    # Recover gamma from the map of the unit range: it lies in the configured range.
    unit_in = (inside - inside.min()) / np.ptp(inside)
    unit_out = (values - values.min()) / np.ptp(values)
    middle = (unit_in > 0.05) & (unit_in < 0.95)
    gamma = np.median(np.log(unit_out[middle]) / np.log(unit_in[middle]))
    assert 0.7 - 1e-3 <= gamma <= 1.5 + 1e-3
    gammas.add(gamma < 1)
  assert gammas == {True, False}  # draws on both sides of 1


def test_noise_level_follows_its_variance_range():
  image, regions = _brain_example(64)
  brain = np.asarray(image) != 0
  for variance in (0.01, 0.09):
    out, _ = augment.augment_example(
        image, regions, jax.random.key(0), flip=False,
        augmentations=_settings(noise_p=1.0, noise_variance=(variance, variance)))
    residual = (np.asarray(out) - np.asarray(image))[brain]
    assert residual.std() == pytest.approx(np.sqrt(variance), rel=0.1)


def test_low_resolution_blur_and_bias_field_by_hand():
  image, _ = _brain_example()
  np.testing.assert_array_equal(augment.low_resolution(image, 1.0), image)
  # Stripes one pixel wide along both axes: halved (nearest neighbour down by 2, linear up) they
  # are gone, every pixel one of the stripes' values.
  rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  stripes = (1.0 + 2.0 * (rows % 2) + 4.0 * (cols % 2)).astype(np.float32)[..., None]
  halved = np.asarray(augment.low_resolution(jnp.asarray(stripes), 0.5))
  assert np.ptp(halved) == 0 and halved[0, 0, 0] in (1.0, 3.0, 5.0, 7.0)
  # Three quarters keeps more of a smooth image than a half.
  smooth = np.asarray(augment.gaussian_blur(image, 2.0, max_sigma=2.0))
  errors = [np.abs(np.asarray(augment.low_resolution(jnp.asarray(smooth), z)) - smooth).mean()
            for z in (0.75, 0.5)]
  assert 0 < errors[0] < errors[1]
  constant = jnp.ones((16, 16, 1))
  blurred = np.asarray(augment.gaussian_blur(constant, 1.0, max_sigma=1.0))
  np.testing.assert_allclose(blurred[4:-4, 4:-4], 1.0, rtol=1e-6)  # weights sum to 1
  assert blurred[0, 0, 0] < 1.0  # 0 beyond the border
  np.testing.assert_array_equal(augment.bias_field(jax.random.key(0), (8, 8), coefficient=0.0),
                                np.ones((8, 8)))
  field = np.asarray(augment.bias_field(jax.random.key(0), (32, 32), coefficient=0.3))
  assert np.all(field > 0) and field.std() > 0.01
  assert np.abs(np.diff(field, axis=0)).max() < 0.1  # smooth


def test_same_key_same_output_and_each_transform_has_its_own_key():
  image, regions = _brain_example()
  everything = _settings(**{f"{name}_p": 1.0 for name in SPATIAL + INTENSITY})
  run = jax.jit(lambda k: augment.augment_example(image, regions, k, augmentations=everything))
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  # An elastic deformation of size 0 turned on beside the rotation leaves the rotation's draw.
  rotation = _settings(rotation_p=1.0)
  both = _settings(rotation_p=1.0, elastic_p=1.0, elastic_magnitude=0.0)
  for seed in range(3):
    alone = augment.augment_example(image, regions, jax.random.key(seed), augmentations=rotation)
    beside = augment.augment_example(image, regions, jax.random.key(seed), augmentations=both)
    np.testing.assert_array_equal(alone[0], beside[0])


@pytest.mark.parametrize("override, message", [
    ("--config.data.augmentations.gamma_p=1.5", "data.augmentations.gamma_p=1.5: a probability"),
    ("--config.data.augmentations.scale_range=(1.4, 0.7)", "data.augmentations.scale_range"),
    ("--config.data.augmentations.low_resolution_zoom=(0.5, 2.0)", "at most 1"),
    ("--config.data.augmentations.noise_variance=(-1.0, 0.1)", ">= 0"),
])
def test_bad_settings_are_one_line_errors(override, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config.load_config(str(ROOT / "configs" / "test.py"), [override])


def test_full_recipes_turn_it_on_and_the_demo_keeps_it_off():
  for recipe in ("segan", "uagan", "unet", "stargan"):
    full = config.load_config(str(ROOT / "configs" / f"{recipe}.py")).data.augmentations
    demo = config.load_config(str(ROOT / "configs" / f"{recipe}.py") + ":demo").data.augmentations
    assert {k: full[k] for k in config.FULL_RECIPE_AUGMENTATIONS} == \
        config.FULL_RECIPE_AUGMENTATIONS
    assert demo.to_dict() == config.base_config().data.augmentations.to_dict()


def _z_scored_batch(seed=0, batch=8, size=24):
  rng = np.random.default_rng(seed)
  image = np.zeros((batch, size, size, 1), np.float32)
  image[:, 4:20, 4:20, 0] = np.clip(rng.normal(0.0, 2.0, (batch, 16, 16)), -5.0, 5.0)
  regions = np.zeros((batch, size, size, 3), np.float32)
  regions[:, 8:14, 8:14, :] = 1.0
  return jnp.asarray(image), jnp.asarray(regions)


@pytest.mark.parametrize("clip_augmented", [True, False])
def test_the_augmented_training_image_is_clipped_back_into_range(clip_augmented):
  """data.clip_augmented: the intensity transforms push z-scores past data.clip (here a
  brightness x 1.5 and a wide noise); the step clips them back, or keeps them (the old way)."""
  from uagan_jax import train  # pylint: disable=g-import-not-at-top
  c = config.base_config()
  c.data.augmentations.update(brightness_p=1.0, brightness_range=(1.5, 1.5), noise_p=1.0,
                              noise_variance=(1.0, 1.0))
  c.data.clip_augmented = clip_augmented
  image, regions = _z_scored_batch()
  keys = jax.random.split(jax.random.key(0), image.shape[0])
  out, out_regions = train.augment_training_batch(image, regions, keys, config=c)
  out = np.asarray(out)
  brain = np.asarray(image) != 0
  np.testing.assert_array_equal(out[~brain], 0.0)  # background stays 0 either way
  if clip_augmented:
    assert np.abs(out).max() == pytest.approx(c.data.clip)
  else:
    assert np.abs(out).max() > c.data.clip + 1.0
  # The same draws either way: inside the range, the two agree; the regions are untouched by it.
  c.data.clip_augmented = not clip_augmented
  other, other_regions = train.augment_training_batch(image, regions, keys, config=c)
  inside = np.abs(np.asarray(other)) < c.data.clip
  np.testing.assert_array_equal(out[inside], np.asarray(other)[inside])
  np.testing.assert_array_equal(np.asarray(out_regions), np.asarray(other_regions))
