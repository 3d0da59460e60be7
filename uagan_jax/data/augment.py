"""On-device data augmentation, per example, inside the compiled step.

Each example's randomness comes from its own key, ``fold_in(step_key, global_example_index)``, so
the augmented batch is the same whether one device or eight share it, and a resumed run
augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment_example(image: jax.Array, regions: jax.Array, key: jax.Array, *,
                    flip: bool = True, intensity_scale: float = 0.0,
                    intensity_shift: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Random flips of both in-plane axes and an intensity jitter of one [H, W, C] slice.

  The jitter multiplies the z-scored image by ``1 + U(-scale, scale)`` and adds
  ``U(-shift, shift)`` inside the brain only (background stays exactly 0, as after
  preprocessing). Region maps are flipped with the image and otherwise untouched.
  """
  flip_key, scale_key, shift_key = jax.random.split(key, 3)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (2,))
    for axis in (0, 1):
      image = jnp.where(flips[axis], jnp.flip(image, axis), image)
      regions = jnp.where(flips[axis], jnp.flip(regions, axis), regions)
  brain = image != 0
  scale = 1.0 + jax.random.uniform(scale_key, minval=-intensity_scale, maxval=intensity_scale)
  shift = jax.random.uniform(shift_key, minval=-intensity_shift, maxval=intensity_shift)
  image = jnp.where(brain, image * scale + shift, 0.0)
  return image, regions


def augment_batch(image: jax.Array, regions: jax.Array, example_keys: jax.Array, **kwargs
                  ) -> tuple[jax.Array, jax.Array]:
  """`augment_example` over a batch, one key per example."""
  return jax.vmap(lambda x, y, k: augment_example(x, y, k, **kwargs))(image, regions, example_keys)
