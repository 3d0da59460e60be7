"""Shapes, conditioning and per-example independence of the StarGAN generator and discriminator.

Shape and parameter-count checks trace the modules with `jax.eval_shape` (nothing is compiled);
the numerical checks share one small jit-compiled generator and discriminator, to keep this fast.
For the same reason parameters are drawn with "rbg" keys: XLA on CPU takes seconds to compile
threefry's unrolled rounds for every parameter, and the values themselves do not matter here.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uagan_jax.models import stargan
from uagan_jax.models import strided_conv
from uagan_jax.models.stargan import Discriminator, Generator

_GENERATOR = Generator(base_features=4, num_residual=1)
_DISCRIMINATOR = Discriminator(base_features=4, num_layers=3)
_IMAGE = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 1)), jnp.float32)

_generate = jax.jit(_GENERATOR.apply)
_discriminate = jax.jit(_DISCRIMINATOR.apply)


def _key():
  return jax.random.key(0, impl="rbg")


@functools.cache
def _generator_vars():
  return jax.jit(_GENERATOR.init)(_key(), _IMAGE, jnp.zeros(2, jnp.int32))


@functools.cache
def _discriminator_vars():
  return jax.jit(_DISCRIMINATOR.init)(_key(), _IMAGE)


def _count(variables) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def _shapes(module, *args, **kwargs):
  """(variables, outputs) of ``module`` on ``args``, as shapes only (traced, never compiled)."""
  def init_and_apply(key):
    variables = module.init(key, *args)
    return variables, module.apply(variables, *args, **kwargs)
  return jax.eval_shape(init_and_apply, _key())


def test_generator_output_shape_and_range():
  model = Generator(base_features=4, num_residual=1, out_channels=2)
  variables, translated = _shapes(model, jnp.ones((2, 32, 32, 3)), jnp.array([0, 3]))
  assert translated.shape == (2, 32, 32, 2)
  assert translated.dtype == jnp.float32
  # The stem sees the image and the 4 target-modality planes.
  assert variables["params"]["stem"]["kernel"].shape == (7, 7, 3 + 4, 4)
  # Large inputs, so an unbounded head would leave [-1, 1].
  translated = _generate(_generator_vars(), 1e3 * _IMAGE, jnp.array([0, 3]))
  assert np.all(np.abs(translated) <= 1.0)
  assert np.all(np.isfinite(translated))


def test_generator_is_conditioned_on_the_target_modality():
  outputs = [_generate(_generator_vars(), _IMAGE, jnp.array([m, m])) for m in range(4)]
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.allclose(outputs[i], outputs[j]), (i, j)


def test_generator_examples_are_independent():
  # InstanceNorm, not BatchNorm: changing one example leaves the other's translation unchanged.
  target = jnp.array([0, 1])
  before = _generate(_generator_vars(), _IMAGE, target)
  after = _generate(_generator_vars(), _IMAGE.at[1].multiply(-3.0), target)
  np.testing.assert_allclose(before[0], after[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(before[1], after[1])


def test_upsampling_is_pytorch_conv_transpose_4_2_1():
  # PyTorch's ConvTranspose2d(k=4, s=2, p=1) is the adjoint (the VJP) of Conv2d(k=4, s=2, p=1).
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 3)), jnp.float32)
  layer = nn.ConvTranspose(6, **strided_conv.UP, use_bias=False)
  variables = layer.init(_key(), x)
  kernel = variables["params"]["kernel"]
  down = lambda z: jax.lax.conv_general_dilated(z, kernel, (2, 2), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(down, jnp.zeros((2, 10, 14, 6)))
  np.testing.assert_allclose(layer.apply(variables, x), vjp(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height,width,num_layers", [(32, 32, 3), (32, 32, 4), (32, 64, 3),
                                                     (16, 16, 4)])
def test_discriminator_output_shapes(height, width, num_layers):
  model = Discriminator(base_features=4, num_layers=num_layers, num_modalities=4)
  variables, (src, cls_logits) = _shapes(model, jnp.ones((2, height, width, 1)))
  h, w = height // 2 ** num_layers, width // 2 ** num_layers
  assert src.shape == (2, h, w, 1)
  assert cls_logits.shape == (2, 4)
  assert src.dtype == cls_logits.dtype == jnp.float32
  # The classifier's kernel covers the whole remaining map, so it collapses to one logit vector.
  assert variables["params"]["cls"]["kernel"].shape == (h, w, 4 * 2 ** (num_layers - 1), 4)


def test_discriminator_classifier_sees_the_whole_image():
  # Changing any corner pixel changes the logits: no part of the image is outside the head's view.
  _, base = _discriminate(_discriminator_vars(), _IMAGE)
  for corner in [(0, 0), (0, 31), (31, 0), (31, 31)]:
    _, moved = _discriminate(_discriminator_vars(), _IMAGE.at[(0,) + corner + (0,)].add(5.0))
    assert not np.allclose(base[0], moved[0]), corner


def test_discriminator_examples_are_independent():
  src, cls_logits = _discriminate(_discriminator_vars(), _IMAGE)
  src1, cls1 = _discriminate(_discriminator_vars(), _IMAGE.at[1].multiply(-3.0))
  np.testing.assert_allclose(src[0], src1[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cls_logits[0], cls1[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(src[1], src1[1])


def test_discriminator_rejects_indivisible_size():
  with pytest.raises(ValueError, match="divisible"):
    _shapes(Discriminator(base_features=4, num_layers=4), jnp.ones((1, 24, 32, 1)))


def test_per_modality_scores_pick_each_images_own_map():
  model = Discriminator(base_features=4, num_layers=3, num_modalities=4, per_modality_scores=True)
  variables = model.init(_key(), _IMAGE, jnp.zeros(2, jnp.int32))
  assert variables["params"]["src"]["kernel"].shape[-1] == 4
  # Keep only modality 2's map: images scored as 2 see it, the others a zero map.
  kernel = variables["params"]["src"]["kernel"]
  variables = {"params": {**variables["params"],
                          "src": {"kernel": jnp.zeros_like(kernel).at[..., 2].set(kernel[..., 2])}}}
  src, cls_logits = model.apply(variables, _IMAGE, jnp.array([2, 1]))
  assert src.shape == (2, 4, 4, 1) and cls_logits.shape == (2, 4)
  assert np.abs(src[0]).max() > 1e-4 and np.abs(src[1]).max() == 0.0
  swapped, _ = model.apply(variables, _IMAGE, jnp.array([0, 2]))
  assert np.abs(swapped[0]).max() == 0.0
  np.testing.assert_allclose(swapped[1], model.apply(variables, _IMAGE[::-1], jnp.array([2, 0]))[0][0],
                             rtol=1e-5, atol=1e-6)


def test_discriminator_modality_is_given_exactly_with_per_modality_scores():
  with pytest.raises(ValueError, match="modality must be given exactly"):
    _shapes(Discriminator(base_features=4, num_layers=3, per_modality_scores=True), _IMAGE)
  with pytest.raises(ValueError, match="modality must be given exactly"):
    _shapes(Discriminator(base_features=4, num_layers=3), _IMAGE, jnp.zeros(2, jnp.int32))


def test_jit_forward_matches_eager():
  target = jnp.array([2, 3])

  @jax.jit
  def forward(g_vars, d_vars, image, target):
    return _DISCRIMINATOR.apply(d_vars, _GENERATOR.apply(g_vars, image, target))

  src, cls_logits = forward(_generator_vars(), _discriminator_vars(), _IMAGE, target)
  assert src.shape == (2, 4, 4, 1) and cls_logits.shape == (2, 4)
  with jax.disable_jit():
    eager_src, eager_cls = forward(_generator_vars(), _discriminator_vars(), _IMAGE, target)
  np.testing.assert_allclose(src, eager_src, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(cls_logits, eager_cls, rtol=1e-4, atol=1e-5)


def test_parameter_counts_by_hand_and_scale_with_base_features():
  image = jnp.ones((1, 32, 32, 1))
  target = jnp.array([0])
  # Generator(base 4, 1 residual block, 1 + 4 input channels, 1 output), bias-free convs,
  # InstanceNorm scale + bias per channel:
  #   stem 7*7*5*4 = 980 + IN 8;  down0 4*4*4*8 = 512 + 16;  down1 4*4*8*16 = 2048 + 32;
  #   residual 2 * (3*3*16*16 + 32) = 4672;  up0 4*4*16*8 = 2048 + 16;  up1 4*4*8*4 = 512 + 8;
  #   head 7*7*4*1 = 196.  Total 11048.
  assert _count(_shapes(Generator(base_features=4, num_residual=1), image, target)[0]) == 11048
  # Discriminator(base 4, 3 layers) on 32x32x1, convs with bias, bias-free heads:
  #   4*4*1*4 + 4 = 68;  4*4*4*8 + 8 = 520;  4*4*8*16 + 16 = 2064;
  #   src 3*3*16*1 = 144;  cls (4x4 map) 4*4*16*4 = 1024.  Total 3820.
  assert _count(_shapes(Discriminator(base_features=4, num_layers=3), image)[0]) == 3820
  for module, args in [(Generator(base_features=8, num_residual=1), (image, target)),
                       (Discriminator(base_features=8, num_layers=3), (image,))]:
    small = _count(_shapes(module.clone(base_features=4), *args)[0])
    large = _count(_shapes(module, *args)[0])
    assert large > small, type(module).__name__


def test_conditional_instance_norm_scales_and_shifts_per_modality():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 5, 3)), jnp.float32)
  modality = jnp.array([3, 1])
  layer = stargan.ConditionalInstanceNorm(num_modalities=4)
  variables = layer.init(_key(), x, modality)
  normalised = (x - x.mean(axis=(1, 2), keepdims=True)) / np.sqrt(
      x.var(axis=(1, 2), keepdims=True) + 1e-5)
  # Initialised to plain (non-affine) InstanceNorm for every modality.
  np.testing.assert_allclose(layer.apply(variables, x, modality), normalised, atol=1e-5)
  scale = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + 1.0
  offset = -jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
  out = layer.apply({"params": {"scale": scale, "bias": offset}}, x, modality)
  for i, m in enumerate([3, 1]):
    np.testing.assert_allclose(out[i], normalised[i] * scale[m] + offset[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm, conditioned", [("instance", False), ("conditional_instance", True)])
def test_only_conditional_norm_conditions_without_the_input_planes(norm, conditioned):
  # With the stem's weights on the one-hot planes zeroed, plain InstanceNorm leaves G blind to the
  # target; the conditional norm still conditions every layer (tables perturbed from their
  # identity initialisation, as training does).
  model = Generator(base_features=4, num_residual=1, norm=norm)
  variables = model.init(_key(), _IMAGE, jnp.zeros(2, jnp.int32))
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf + 0.3 * jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape)
      / leaf.size if "scale" in jax.tree_util.keystr(path) else leaf, variables["params"])
  params["stem"]["kernel"] = params["stem"]["kernel"].at[:, :, 1:, :].set(0.0)
  outputs = [model.apply({"params": params}, _IMAGE, jnp.array([m, m])) for m in (0, 2)]
  assert (not np.allclose(outputs[0], outputs[1], atol=1e-6)) == conditioned


def test_conditional_norm_parameter_count():
  # As the 11048 of the plain generator, with each norm's scale and bias (2 * 72 = 144 in all)
  # held once per modality: 11048 - 144 + 4 * 144 = 11480.
  image, target = jnp.ones((1, 32, 32, 1)), jnp.array([0])
  model = Generator(base_features=4, num_residual=1, norm="conditional_instance")
  assert _count(_shapes(model, image, target)[0]) == 11480


def test_residual_output_starts_as_the_identity():
  # The head predicts a change of the input before tanh and starts at zero: G copies its input
  # (clipped to +-0.98), whatever the target, until it learns otherwise.
  model = Generator(base_features=4, num_residual=1, output="residual")
  image = jnp.tanh(_IMAGE)
  variables = model.init(_key(), image, jnp.zeros(2, jnp.int32))
  assert set(variables["params"]) == set(_generator_vars()["params"])  # no new parameters
  for target in (0, 3):
    out = model.apply(variables, image, jnp.array([target, target]))
    np.testing.assert_allclose(out, jnp.clip(image, -0.98, 0.98), rtol=1e-5, atol=1e-6)
  # The plain StarGAN head with the same (zero) kernel gives tanh(0) = 0 everywhere.
  np.testing.assert_array_equal(_GENERATOR.apply(variables, image, jnp.array([0, 0])), 0.0)


def test_blend_output_mixes_copying_and_drawing_per_pixel():
  model = Generator(base_features=4, num_residual=1, output="blend")
  image = jnp.tanh(_IMAGE)
  variables = model.init(_key(), image, jnp.zeros(2, jnp.int32))
  params = dict(variables["params"])
  # One extra conv, the mask head, with a bias and a zero kernel: m = 0.5 at the start.
  assert set(params) - set(_generator_vars()["params"]) == {"head_mask"}
  assert not np.any(params["head_mask"]["kernel"]) and not np.any(params["head_mask"]["bias"])
  target = jnp.array([1, 2])
  drawn = _GENERATOR.apply({"params": {k: v for k, v in params.items() if k != "head_mask"}},
                           image, target)
  np.testing.assert_allclose(model.apply({"params": params}, image, target),
                             0.5 * image + 0.5 * drawn, rtol=1e-5, atol=1e-6)
  # A mask bias of +-30 (m = 1 or 0): the input copied, or StarGAN's image.
  for bias, want in ((30.0, image), (-30.0, drawn)):
    params["head_mask"] = {**params["head_mask"], "bias": jnp.full((1,), bias)}
    out = model.apply({"params": params}, image, target)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  # A per-pixel mask: with only the centre tap of the 7x7 mask kernel set, m is a sigmoid of a
  # weighted sum of the head's input features at the same pixel.
  weights = jnp.array([0.5, -0.6, 0.2, 0.3])
  params["head_mask"] = {"kernel": jnp.zeros((7, 7, 4, 1)).at[3, 3, :, 0].set(weights),
                         "bias": jnp.array([0.3])}
  # The head's input is the last up block's ReLU of its norm's output (captured by Flax).
  out, captured = model.apply({"params": params}, image, target, capture_intermediates=True)
  features = nn.relu(captured["intermediates"]["up1_norm"]["__call__"][0])
  mask = jax.nn.sigmoid(features @ weights[:, None] + 0.3)
  assert float(mask.min()) < 0.4 and float(mask.max()) > 0.6  # really mixed, pixel by pixel
  np.testing.assert_allclose(out, mask * image + (1 - mask) * drawn, rtol=1e-5, atol=1e-5)
  assert np.all(np.abs(out) <= 1.0)


def test_generator_output_errors():
  with pytest.raises(ValueError, match="input channels"):
    _shapes(Generator(base_features=4, num_residual=1, output="blend", out_channels=2),
            jnp.ones((1, 32, 32, 1)), jnp.array([0]))
  with pytest.raises(ValueError, match="unknown generator output 'skip'"):
    _shapes(Generator(base_features=4, num_residual=1, output="skip"), jnp.ones((1, 32, 32, 1)),
            jnp.array([0]))


def test_generator_output_head_index_needs_several_heads():
  features, image = jnp.ones((2, 8, 8, 4)), jnp.zeros((2, 8, 8, 1))

  class Head(nn.Module):
    num_heads: int
    with_index: bool

    @nn.compact
    def __call__(self, x, y):
      index = jnp.array([0, 1]) if self.with_index else None
      return stargan.generator_output(x, y, kind="blend", out_channels=1, name="head",
                                      dtype=jnp.float32, head_index=index,
                                      num_heads=self.num_heads)

  for num_heads, with_index in ((4, False), (1, True)):
    with pytest.raises(ValueError, match="head_index must be given exactly when num_heads > 1"):
      Head(num_heads, with_index).init(jax.random.key(0), features, image)
