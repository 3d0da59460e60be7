"""Shapes and conditioning of the SegAN segmentor and critic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uagan_jax.errors import UserError
from uagan_jax.models import bilinear, segan
from uagan_jax.models.segan import Critic, Segmentor, mask_image

from conftest import assert_steps_agree, load_test_config, one_step_on_two_devices


def test_segmentor_outputs_one_logit_map_per_region():
  model = Segmentor(features=(4, 8, 16))
  image = jnp.ones((2, 32, 48, 1))
  modality = jnp.array([0, 3])
  variables = model.init(jax.random.key(0), image, modality, train=False)
  logits = model.apply(variables, image, modality, train=False)
  assert logits.shape == (2, 32, 48, 3)
  assert logits.dtype == jnp.float32
  # The first encoder layer sees the image and the 4 modality one-hot planes.
  assert variables["params"]["down0"]["kernel"].shape == (4, 4, 1 + 4, 4)


def test_segmentor_is_conditioned_on_the_modality():
  model = Segmentor(features=(4, 8))
  image = jax.random.normal(jax.random.key(1), (1, 16, 16, 1))
  variables = model.init(jax.random.key(0), image, jnp.array([0]), train=False)
  outputs = [model.apply(variables, image, jnp.array([m]), train=False) for m in range(4)]
  for other in outputs[1:]:
    assert not np.allclose(outputs[0], other)


def test_segmentor_train_mode_updates_batch_statistics():
  model = Segmentor(features=(4, 8))
  image = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  variables = model.init(jax.random.key(0), image, jnp.zeros(2, jnp.int32), train=False)
  _, updated = model.apply(variables, image, jnp.zeros(2, jnp.int32), train=True,
                           mutable=["batch_stats"])
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updated["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_critic_returns_input_and_every_scale(norm):
  critic = Critic(features=(4, 8, 16), norm=norm)
  masked = jnp.ones((2, 32, 32, 3))
  variables = critic.init(jax.random.key(0), masked)
  features, _ = critic.apply({"params": variables["params"]}, masked, mutable=["batch_stats"])
  assert [f.shape for f in features] == [(2, 32, 32, 3), (2, 16, 16, 4), (2, 8, 8, 8),
                                         (2, 4, 4, 16)]
  np.testing.assert_array_equal(features[0], masked)


def test_mask_image_multiplies_each_channel_by_each_region():
  image = jnp.arange(4.0).reshape(1, 2, 2, 1)
  regions = jnp.stack([jnp.ones((2, 2)), jnp.zeros((2, 2)), jnp.eye(2)], axis=-1)[None]
  masked = mask_image(image, regions)
  assert masked.shape == (1, 2, 2, 3)
  np.testing.assert_array_equal(masked[0, ..., 0], image[0, ..., 0])
  np.testing.assert_array_equal(masked[0, ..., 1], 0)
  np.testing.assert_array_equal(masked[0, ..., 2], [[0.0, 0.0], [0.0, 3.0]])


def test_sizes_come_from_the_config():
  config = load_test_config("--config.model.segmentor_features=(4, 8, 16)",
                            "--config.model.critic_features=(2, 6)")
  from uagan_jax import train_state  # pylint: disable=g-import-not-at-top
  networks = train_state.build_networks(config, bn_axis_name=None)
  assert tuple(networks["segmentor"].features) == (4, 8, 16)
  assert tuple(networks["critic"].features) == (2, 6)
  assert "critic" not in train_state.build_networks(load_test_config("--config.model.name=unet"))


def test_image_size_must_fit_the_encoder_depth():
  with pytest.raises(UserError, match="data.image_size"):
    load_test_config("--config.data.image_size=(34, 34)")  # 2 levels: sides must divide by 4


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 12, 12, 2), (3, 1, 2, 1)])
def test_stencil_resize_equals_jax_image_with_gradients(shape):
  """``model.resize="stencil"`` is the same bilinear x2 as jax.image.resize: outputs and input
  gradients to float32 rounding (each output sums at most 4 weighted inputs, each gradient
  element at most 16 terms), edges and a 1-pixel axis included."""
  x = _random(shape, 0)
  y_ref, vjp_ref = jax.vjp(lambda v: segan.upsample2x(v, method="jax_image"), x)
  y, vjp = jax.vjp(lambda v: segan.upsample2x(v, method="stencil"), x)
  assert y.shape == y_ref.shape == (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-6)
  cotangent = _random(y.shape, 1)
  np.testing.assert_allclose(vjp(cotangent)[0], vjp_ref(cotangent)[0], rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="unknown resize"):
    segan.upsample2x(x, method="nearest")


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (1, 1, 3, 2)])
def test_stencil_resize_second_order_gradients_equal_jax_image(shape):
  """The stencil's VJP is its adjoint under a custom VJP whose own VJP is the stencil again: the
  gradient of a function of the VJP (what a penalty on input gradients differentiates) equals
  autodiff of jax.image.resize's, and the adjoint is the transpose (<up x, g> = <x, down g>)."""
  x, cotangent = _random(shape, 3), _random((shape[0], 2 * shape[1], 2 * shape[2], shape[3]), 4)

  def second_order(method):
    def of_vjp(g):
      return jnp.sum(jnp.sin(jax.vjp(lambda v: segan.upsample2x(v, method=method), x)[1](g)[0]))
    return jax.grad(of_vjp)(cotangent)

  np.testing.assert_allclose(second_order("stencil"), second_order("jax_image"), rtol=0,
                             atol=1e-5)
  down = bilinear.down_along(bilinear.down_along(cotangent, 1), 2)
  np.testing.assert_allclose(jnp.vdot(bilinear.upsample2x(x), cotangent), jnp.vdot(x, down),
                             rtol=1e-5)


def test_stencil_resize_keeps_the_segmentor_parameters_and_output():
  image, modality = _random((2, 16, 16, 1), 2), jnp.array([0, 2])
  variables = Segmentor(features=(4, 8)).init(jax.random.key(0), image, modality, train=False)
  stencil = Segmentor(features=(4, 8), resize="stencil")
  assert jax.tree.structure(stencil.init(jax.random.key(0), image, modality, train=False)) == \
      jax.tree.structure(variables)
  np.testing.assert_allclose(stencil.apply(variables, image, modality, train=False),
                             Segmentor(features=(4, 8)).apply(variables, image, modality,
                                                              train=False), rtol=0, atol=1e-5)


def test_config_rejects_unknown_resize():
  with pytest.raises(UserError, match="model.resize"):
    load_test_config("--config.model.resize=nearest")


def test_stencil_resize_train_step_matches_jax_image_on_two_devices():
  """One segan step of configs/test.py on a 2-device mesh (shard_map: the stencil's custom VJPs
  see device-varying activations) gives jax_image's metrics and parameters to rounding."""
  assert_steps_agree(one_step_on_two_devices("--config.model.resize=stencil"),
                     one_step_on_two_devices("--config.model.resize=jax_image"))
