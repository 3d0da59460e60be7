"""On-device augmentation: image and regions move together, background stays 0, keys decide."""

import jax
import jax.numpy as jnp
import numpy as np

from uagan_jax.data import augment


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
