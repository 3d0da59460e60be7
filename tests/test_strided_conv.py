"""The 4x4 stride-2 convs as an im2col matmul or with canonical-conv gradients
(``model.strided_conv``) against XLA's conv and autodiff.

``"im2col"`` and ``"canonical_vjp"`` compute the same sums as ``"xla"`` in another order, so
values, gradients and the gradient penalty's second-order gradients are compared within float32
rounding; parameters are compared exactly (a checkpoint loads under any); the default leaves the
networks' arithmetic exactly as nn.Conv computes it; a train step with each runs on two devices
and matches the ``"xla"`` step; with ``"canonical_vjp"`` every convolution of the compiled
stargan step is in the layout XLA:CPU hands to its Eigen kernels, which is the point of it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (ROOT, assert_steps_agree, load_test_config,
                      one_step_on_two_devices)

from uagan_jax import config as config_lib
from uagan_jax import losses
from uagan_jax.errors import UserError
from uagan_jax.models import segan, stargan, uagan
from uagan_jax.models import strided_conv as strided_conv_lib

# Float32 tolerance. Both implementations form the same products and add them in another order,
# so the difference is rounding: a sum of n terms is exact to about n * 2^-24 of the sum of the
# terms' magnitudes. The outputs sum 16 C <= 256 terms, the kernel gradients B H/2 W/2 <= 512:
# 1e-5 relative to the largest value leaves a factor ~10 over that bound and is still ~1e4 times
# smaller than any slip in the taps (a wrong or shifted tap changes values by O(1) of them).
_RTOL = 1e-5


def _assert_close(actual, expected, rtol=_RTOL):
  expected = np.asarray(expected, np.float32)
  scale = float(np.max(np.abs(expected)))  # 0 for a parameter the loss does not read: exact
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=0, atol=rtol * scale)


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _xla_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _value_and_vjp(fn, operands, cotangent=None, *, seed=9):
  """``fn(*operands)`` and its VJP at ``cotangent`` (default: `_normal` of the output's shape,
  ``seed``) as one jitted program: op by op, each of the dozens of primitives of a VJP is
  compiled on its own. Returns (value, cotangent, gradients)."""
  if cotangent is None:
    cotangent = _normal(jax.eval_shape(fn, *operands).shape, seed)

  def run(operands, cotangent):
    y, vjp = jax.vjp(fn, *operands)
    return y, vjp(cotangent)
  y, grads = jax.jit(run)(operands, cotangent)
  return y, cotangent, grads


_DOWN_FUNCTIONS = {"im2col": strided_conv_lib.im2col_down,
                   "canonical_vjp": strided_conv_lib.canonical_down}
_SHAPES = [((2, 8, 8, 1), 3), ((3, 16, 12, 5), 4), ((1, 4, 6, 16), 2), ((2, 6, 6, 3), 2)]


@pytest.mark.parametrize("impl", sorted(_DOWN_FUNCTIONS))
@pytest.mark.parametrize("shape,features", _SHAPES)
def test_down_values_and_gradients_equal_xla_conv(impl, shape, features):
  x = _normal(shape, 0)
  kernel = _normal((4, 4, shape[-1], features), 1)
  cotangent = _normal((shape[0], shape[1] // 2, shape[2] // 2, features), 2)
  y_ref, _, grads_ref = _value_and_vjp(_xla_conv, (x, kernel), cotangent)
  y, _, grads = _value_and_vjp(_DOWN_FUNCTIONS[impl], (x, kernel), cotangent)
  assert y.shape == y_ref.shape
  _assert_close(y, y_ref)
  for grad, grad_ref in zip(grads, grads_ref):
    _assert_close(grad, grad_ref)


def _autodiff_up(g, kernel):
  """StarGAN's up layer as flax computes it: nn.ConvTranspose(**UP) with ``kernel``."""
  return nn.ConvTranspose(kernel.shape[-2], **strided_conv_lib.UP, use_bias=False).apply(
      {"params": {"kernel": kernel}}, g)


def _autodiff_kernel_grad(x, g):
  kernel = jnp.zeros((4, 4, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda k: _xla_conv(x, k), kernel)[1](g)[0]


_CANONICAL = {  # each custom-VJP function, autodiff's version of it, its operands' shapes
    "down": (strided_conv_lib.canonical_down, _xla_conv,
             lambda b, h, w, c, o: [(b, h, w, c), (4, 4, c, o)]),
    "up": (strided_conv_lib.canonical_up, _autodiff_up,
           lambda b, h, w, c, o: [(b, h // 2, w // 2, o), (4, 4, c, o)]),
    "kernel_grad": (strided_conv_lib.canonical_kernel_grad, _autodiff_kernel_grad,
                    lambda b, h, w, c, o: [(b, h, w, c), (b, h // 2, w // 2, o)]),
}


@pytest.mark.parametrize("function", sorted(_CANONICAL))
@pytest.mark.parametrize("shape,features", _SHAPES)
def test_canonical_functions_equal_autodiff_to_second_order(function, shape, features):
  """Each of the three bilinear maps, its VJP, and the gradient of a function of its VJP (the
  penalty's second order) equal autodiff of XLA's own convs; the (2, 6, 6, 3) case has a 3x3
  map under the up conv (the interleaved path)."""
  canonical, reference, shapes = _CANONICAL[function]
  operands = [_normal(s, seed) for seed, s in enumerate(shapes(*shape, features))]
  y, cotangent, grads = _value_and_vjp(canonical, operands, seed=9)
  y_ref, _, grads_ref = _value_and_vjp(reference, operands, cotangent)
  assert y.shape == y_ref.shape
  _assert_close(y, y_ref)
  for grad, grad_ref in zip(grads, grads_ref):
    _assert_close(grad, grad_ref)

  def second_order(fn):
    def norm_of_vjp(*args):
      return sum(jnp.sum(jnp.sin(g)) for g in jax.vjp(fn, *args)[1](cotangent))
    # One jitted program (op by op, every primitive of the second order compiles on its own).
    return jax.jit(jax.grad(norm_of_vjp, argnums=tuple(range(len(operands)))))(*operands)
  for grad, grad_ref in zip(second_order(canonical), second_order(reference)):
    _assert_close(grad, grad_ref, rtol=1e-4)


def test_im2col_rejects_odd_sizes_and_unknown_implementations():
  with pytest.raises(ValueError, match="even"):
    strided_conv_lib.im2col_down(jnp.zeros((1, 5, 4, 1)), jnp.zeros((4, 4, 1, 1)))
  with pytest.raises(ValueError, match="unknown strided conv"):
    strided_conv_lib.down_conv(2, name="down0", implementation="fft")


def test_im2col_under_vmap_equals_xla_conv_per_example():
  x = _normal((3, 2, 8, 8, 2), 3)  # vmapped over the first axis, each a batch of 2
  kernel = _normal((4, 4, 2, 3), 4)
  _assert_close(jax.jit(jax.vmap(strided_conv_lib.im2col_down, (0, None)))(x, kernel),
                jax.jit(jax.vmap(_xla_conv, (0, None)))(x, kernel))


@pytest.mark.parametrize("impl", ["im2col", "canonical_vjp"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_has_nn_conv_parameters_and_output(use_bias, impl):
  """Same names, shapes, dtypes and init values as nn.Conv (so checkpoints load under either),
  and the same output."""
  x = _normal((2, 8, 8, 3), 5)
  xla = strided_conv_lib.down_conv(4, use_bias=use_bias, name="down0")
  im2col = strided_conv_lib.down_conv(4, use_bias=use_bias, name="down0", implementation=impl)
  assert isinstance(xla, nn.Conv)
  variables = xla.init(jax.random.key(0), x)
  variables_im2col = im2col.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(variables_im2col)
  assert set(variables["params"]) == ({"kernel", "bias"} if use_bias else {"kernel"})
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables_im2col)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  if use_bias:  # a non-zero bias, so that adding it is tested too
    variables = {"params": {**variables["params"], "bias": _normal((4,), 6)}}
  _assert_close(im2col.apply(variables, x), xla.apply(variables, x))


@pytest.mark.parametrize("use_bias", [True, False])
def test_up_layer_has_nn_conv_transpose_parameters_and_output(use_bias):
  x = _normal((2, 4, 4, 3), 12)
  xla = strided_conv_lib.up_conv(5, use_bias=use_bias, name="up0")
  canonical = strided_conv_lib.up_conv(5, use_bias=use_bias, name="up0",
                                       implementation="canonical_vjp")
  assert isinstance(xla, nn.ConvTranspose)
  assert isinstance(strided_conv_lib.up_conv(5, name="up0", implementation="im2col"),
                    nn.ConvTranspose)
  variables = xla.init(jax.random.key(0), x)
  variables_canonical = canonical.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(variables_canonical)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables_canonical)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  if use_bias:
    variables = {"params": {**variables["params"], "bias": _normal((5,), 13)}}
  _assert_close(canonical.apply(variables, x), xla.apply(variables, x))
  with pytest.raises(ValueError, match="unknown strided conv"):
    strided_conv_lib.up_conv(2, name="up0", implementation="fft")


@pytest.mark.parametrize("impl", ["im2col", "canonical_vjp"])
def test_layer_computes_in_bfloat16_with_float32_parameters(impl):
  x = _normal((2, 8, 8, 3), 7)
  xla = strided_conv_lib.down_conv(4, dtype=jnp.bfloat16, name="down0")
  im2col = strided_conv_lib.down_conv(4, dtype=jnp.bfloat16, name="down0",
                                      implementation=impl)
  variables = xla.init(jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  y, y_ref = im2col.apply(variables, x), xla.apply(variables, x)
  assert y.dtype == y_ref.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: each implementation rounds its inputs alike but may round
  # partial sums differently, so they agree to a few bfloat16 ulps (2^-8 relative), not exactly.
  _assert_close(y, y_ref, rtol=3 * 2.0 ** -8)


def _network_cases():
  image = _normal((2, 32, 32, 1), 8)
  modality = jnp.array([0, 3])
  return {
      "segmentor": (lambda impl: segan.Segmentor(features=(4, 8), strided_conv=impl),
                    (image, modality), {"train": True}),
      "critic": (lambda impl: segan.Critic(features=(4, 8), norm="none", strided_conv=impl),
                 (jnp.tile(image, (1, 1, 1, 3)),), {}),
      "generator": (lambda impl: stargan.Generator(base_features=4, num_residual=1,
                                                   strided_conv=impl),
                    (image, modality), {}),
      "discriminator": (lambda impl: stargan.Discriminator(base_features=4, num_layers=3,
                                                           strided_conv=impl),
                        (image,), {}),
      "unified": (lambda impl: uagan.UnifiedNet(seg_features=(4, 8, 8), gen_features=4,
                                                num_residual=1, strided_conv=impl),
                  (image, modality, modality), {"train": True}),
  }


@pytest.mark.parametrize("impl", ["im2col", "canonical_vjp"])
@pytest.mark.parametrize("network", ["segmentor", "critic", "generator", "discriminator",
                                     "unified"])
def test_networks_have_identical_parameters_and_close_outputs(network, impl):
  build, args, kwargs = _network_cases()[network]
  key = jax.random.key(0, impl="rbg")
  variables = jax.jit(lambda k: build("xla").init(k, *args, **kwargs))(key)
  variables_im2col = jax.jit(lambda k: build(impl).init(k, *args, **kwargs))(key)
  assert jax.tree.structure(variables) == jax.tree.structure(variables_im2col)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables_im2col)):
    np.testing.assert_array_equal(a, b)

  def apply(impl):
    return jax.jit(lambda v: build(impl).apply(v, *args, **kwargs, mutable=["batch_stats"]))(
        variables)[0]
  for a, b in zip(jax.tree.leaves(apply(impl)), jax.tree.leaves(apply("xla"))):
    _assert_close(a, b, rtol=1e-4)  # several layers deep, each adding its rounding


def test_default_discriminator_computes_exactly_nn_conv():
  """With ``"xla"`` (the default) the down layers are nn.Conv itself: a stack of nn.Conv(**DOWN)
  with the same parameters gives bit-identical scores (the program before the other
  implementations, unchanged)."""
  image = _normal((2, 32, 32, 1), 9)
  model = stargan.Discriminator(base_features=4, num_layers=3)
  variables = model.init(jax.random.key(0), image)
  src, _ = model.apply(variables, image)
  params = variables["params"]
  x = image
  for level in range(3):
    x = nn.Conv(4 * 2 ** level, **strided_conv_lib.DOWN).apply(
        {"params": params[f"down{level}"]}, x)
    x = nn.leaky_relu(x, 0.01)
  reference = nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).apply(
      {"params": params["src"]}, x)
  np.testing.assert_array_equal(src, reference)


@pytest.mark.parametrize("impl", ["im2col", "canonical_vjp"])
def test_gradient_penalty_second_order_gradients_equal_xla(impl):
  """The WGAN-GP penalty differentiates D's input gradient again with respect to D's parameters:
  im2col's layers are plain JAX operations and canonical_vjp's backward passes are custom VJPs
  themselves, so that works and equals XLA's to rounding."""
  real, fake = _normal((2, 32, 32, 1), 10), _normal((2, 32, 32, 1), 11)
  alpha = jnp.array([0.3, 0.8])
  variables = stargan.Discriminator(base_features=4, num_layers=3).init(jax.random.key(0), real)

  def penalty_grads(impl):
    model = stargan.Discriminator(base_features=4, num_layers=3, strided_conv=impl)

    def penalty(params):
      def critic_fn(x):
        return jnp.mean(model.apply({"params": params}, x)[0], axis=(1, 2, 3))
      return losses.gradient_penalty(critic_fn=critic_fn, real=real, fake=fake, alpha=alpha)
    return jax.jit(jax.value_and_grad(penalty))(variables["params"])

  (value, grads), (value_ref, grads_ref) = penalty_grads(impl), penalty_grads("xla")
  _assert_close(value, value_ref)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
  for level in range(3):  # the penalty reaches every down layer
    assert np.max(np.abs(grads_ref[f"down{level}"]["kernel"])) > 0
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    _assert_close(a, b, rtol=1e-4)  # a second-order sum through three layers


def test_config_rejects_unknown_strided_conv():
  with pytest.raises(UserError, match="model.strided_conv"):
    load_test_config("--config.model.strided_conv=fft")
  assert config_lib.base_config().model.strided_conv == "xla"
  for recipe in ("stargan", "uagan"):  # measured there (docs/EXPERIMENTS.md)
    recipe_config = config_lib.load_config(f"{ROOT / 'configs' / recipe}.py:demo", [])
    assert recipe_config.model.strided_conv == "canonical_vjp"
    assert load_test_config(variant=recipe).model.strided_conv == "canonical_vjp"


# Two compiles each (minutes on 2 cores): canonical_vjp's stargan under shard_map (whose custom
# VJPs meet varying and replicated values) in CI, the others slow tests.
@pytest.mark.parametrize("variant,mode,impl", [
    ("stargan", "shard_map", "canonical_vjp"),
    pytest.param("stargan", "shard_map", "im2col", marks=pytest.mark.slow),
    pytest.param("stargan", "pmap", "im2col", marks=pytest.mark.slow),
    pytest.param("stargan", "pmap", "canonical_vjp", marks=pytest.mark.slow),
    pytest.param("uagan", "shard_map", "im2col", marks=pytest.mark.slow),
    pytest.param("uagan", "shard_map", "canonical_vjp", marks=pytest.mark.slow)])
def test_train_step_matches_xla_on_two_devices(variant, mode, impl):
  """One step of configs/test.py (stargan's and uagan's D with the gradient penalty) on a
  2-device mesh under each parallel mode: ``impl`` runs and gives XLA's metrics and
  parameters to rounding."""
  results = {implementation: one_step_on_two_devices(
      f"--config.train.parallel_mode={mode}", f"--config.model.strided_conv={implementation}",
      variant=variant) for implementation in ("xla", impl)}
  assert_steps_agree(results[impl], results["xla"])


def _non_canonical_convolutions(strided_conv: str) -> list[str]:
  """The convolutions of the compiled configs/test.py stargan step that XLA:CPU cannot hand to
  Eigen: a reversed window or another layout than NHWC input, HWIO kernel, NHWC output. At
  48x48 with 4 levels D's last down conv gives a 3x3 map, as the :demo recipe's 96x96 with 5
  levels does, whose transpose XLA would swap (fewer pixels than the 4x4 window) but for the
  interleaved path."""
  from uagan_jax import parallel, train, train_state  # pylint: disable=g-import-not-at-top
  config = load_test_config("--config.data.augment=false", "--config.data.image_size=(48, 48)",
                            "--config.model.discriminator_layers=4",
                            f"--config.model.strided_conv={strided_conv}", variant="stargan")
  mesh = parallel.make_mesh(1)
  # Shapes only (the step is lowered, never run): no initialisation program to compile and run.
  state = train_state.abstract_state(config)
  batch_size, (height, width) = config.train.batch_size, config.data.image_size
  batch = parallel.shard_batch({
      "image": np.zeros((batch_size, height, width, 1), np.float32),
      "regions": np.zeros((batch_size, height, width, 3), np.float32),
      "modality": np.arange(batch_size, dtype=np.int32) % 4}, mesh)
  hlo = train.make_step(config, mesh).lower(state, batch, jax.random.key(0)).compile().as_text()
  convolutions = [line for line in hlo.splitlines() if " convolution(" in line]
  assert convolutions
  return [line.strip() for line in convolutions
          if "reversal" in line or "dim_labels=b01f_01io->b01f" not in line]


def test_canonical_vjp_leaves_every_convolution_of_the_step_canonical():
  """The reason for ``"canonical_vjp"``: XLA's autodiff of the transposed convs and of the
  penalty's second order gives reversed, batch-feature-swapped kernel-gradient convs (present
  with ``"xla"``, so this test can fail); the custom VJPs leave none."""
  assert _non_canonical_convolutions("xla")
  assert _non_canonical_convolutions("canonical_vjp") == []
