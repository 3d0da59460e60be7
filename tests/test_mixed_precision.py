"""``model.dtype=bfloat16``: every family trains with bfloat16 convolutions and activations, float32
parameters, optimizer state and losses, and its first step's losses are float32's within
bfloat16's precision."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uagan_jax import families, parallel, train, train_state
from uagan_jax.models import stargan

from conftest import load_test_config, random_train_batch

# bfloat16 keeps an 8-bit significand (7 stored bits), so one rounding is off by at most 2**-9 of
# the value and a few roundings in a row by a few times that. Each loss is a float32 mean over
# thousands of elements (pixels, patches, examples) whose rounding errors partly cancel, so it is
# off by far less than one element (segan's and unet's by about 1e-4 relative); a bound of 2**-8
# of the loss (plus 2**-8 absolute, for the WGAN terms that are differences of means near 0)
# holds with margin, and a loss that lost its float32 inputs altogether is off by far more.
BF16_TOLERANCE = 2.0 ** -8
GLOBAL_BATCH = 8
STEPS = 3


def _batch(seed=0, size=32):
  return random_train_batch(GLOBAL_BATCH, size, seed)


def _variant(family: str) -> str:
  return "" if family == "segan" else family  # configs/test.py: segan is its default


def _train(family: str, dtype: str, steps: int):
  """``steps`` compiled steps on one device: (the initial state, the final state, every step's
  metrics, the convolutions of the step's StableHLO)."""
  config = load_test_config(f"--config.model.dtype={dtype}", variant=_variant(family))
  mesh = parallel.make_mesh(1)
  state = train_state.init_state(config, mesh)
  initial = jax.device_get(state)
  step = train.make_step(config, mesh, donate=False)
  batch = parallel.shard_batch(_batch(), mesh)
  key = jax.random.fold_in(state.base_key, 0)
  convolutions = re.findall(r"stablehlo\.convolution.*", step.lower(state, batch, key).as_text())
  history = []
  for t in range(steps):
    state, metrics = step(state, batch, jax.random.fold_in(state.base_key, t))
    history.append(metrics)
  return initial, jax.device_get(state), jax.device_get(history), convolutions


def _float_leaves(state) -> dict[str, jnp.dtype]:
  """Every floating leaf of the networks' parameters, statistics and optimizer states (Adam's
  step counts are integers and stay so)."""
  leaves = jax.tree_util.tree_leaves_with_path(state.nets)
  return {jax.tree_util.keystr(path): np.asarray(leaf).dtype for path, leaf in leaves
          if np.issubdtype(np.asarray(leaf).dtype, np.floating)}


def _losses(metrics: dict) -> dict[str, float]:
  """The step's loss terms: its metrics but the norms. The gradient norms are left out: much of a
  first step's gradient lies in directions whose true value is about 0 (a conv's scale ahead of a
  norm), where bfloat16's rounding noise is the gradient (unet's seg/grad_norm: 0.217 against
  float32's 0.233); Adam's update norm is insensitive to it and the losses agree."""
  return {k: float(v) for k, v in metrics.items() if not k.endswith("_norm")}


@functools.lru_cache(maxsize=None)
def _bfloat16_run(family: str):
  """`_train` in bfloat16, shared by the tests of one family (a compile is the slow part)."""
  return _train(family, "bfloat16", STEPS)


# In CI: segan (the segmentor and critic) and uagan (segmentor, generator, discriminator and the
# gradient penalty's double backward in one step); unet's and stargan's networks are parts of those,
# and their own runs (a bfloat16 compile each, minutes on 2 cores) are slow tests.
@pytest.mark.parametrize("family", [
    pytest.param(name, marks=[] if name in ("segan", "uagan") else [pytest.mark.slow])
    for name in families.names()])
def test_bfloat16_trains_with_float32_state_and_losses(family):
  initial, final, history, convolutions = _bfloat16_run(family)

  # Everything the state holds (parameters, BatchNorm statistics, Adam's moments) is float32 at
  # creation and stays float32 through the updates, which moved the parameters.
  for state in (initial, final):
    dtypes = _float_leaves(state)
    assert dtypes and set(dtypes.values()) == {np.dtype(np.float32)}, dtypes
    assert any("opt_state" in path for path in dtypes)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial.nets),
                                                      jax.tree.leaves(final.nets)))

  # The networks really compute in bfloat16: every convolution of the step (forward, backward,
  # and the gradient penalty's double backward) takes bfloat16 operands.
  assert convolutions and all("bf16" in c for c in convolutions), convolutions[:3]

  # Losses and metrics are float32 scalars, finite at every step.
  for metrics in history:
    for name, value in metrics.items():
      assert np.asarray(value).dtype == np.float32, name
      assert np.isfinite(value), (name, value)


# A second compile per family (float32): segan's in CI, the others' slow tests.
@pytest.mark.parametrize("family", [
    pytest.param(name, marks=[] if name == "segan" else [pytest.mark.slow])
    for name in families.names()])
def test_bfloat16_first_step_is_float32s_within_bfloat16_precision(family):
  initial, _, history, convolutions = _bfloat16_run(family)
  reference_initial, _, reference, reference_convolutions = _train(family, "float32", 1)
  # The same initial parameters (param_dtype float32, the same keys), the same program shape.
  for a, b in zip(jax.tree.leaves(initial.nets), jax.tree.leaves(reference_initial.nets)):
    np.testing.assert_array_equal(a, b)
  assert len(convolutions) == len(reference_convolutions)
  assert not any("bf16" in c for c in reference_convolutions)
  bf16_losses, f32_losses = _losses(history[0]), _losses(reference[0])
  assert bf16_losses.keys() == f32_losses.keys()
  for name, value in f32_losses.items():
    assert bf16_losses[name] == pytest.approx(value, rel=BF16_TOLERANCE, abs=BF16_TOLERANCE), name


def _randomised(variables, seed=1):
  """``variables`` with every leaf drawn anew, so that scales, offsets and masks are not their
  identity initialisation."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(1.0, 0.5, x.shape), x.dtype), variables)


def test_conditional_instance_norm_rounds_once_to_bfloat16():
  """Normalised, scaled and shifted in float32, then rounded to bfloat16 once: exactly the float32
  layer's output rounded (an affine step in bfloat16 would round twice, off by a bfloat16 ulp in
  places)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3.0, 2.0, (4, 8, 8, 16)), jnp.bfloat16)
  modality = jnp.asarray([0, 1, 2, 3])
  layer = stargan.ConditionalInstanceNorm(4, dtype=jnp.bfloat16)
  variables = _randomised(layer.init(jax.random.key(0), x, modality))
  out = layer.apply(variables, x, modality)
  reference = stargan.ConditionalInstanceNorm(4, dtype=jnp.float32).apply(
      variables, x.astype(jnp.float32), modality)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(reference.astype(jnp.bfloat16), np.float32))


def test_blend_output_takes_its_mask_sigmoid_in_float32():
  """The blend head's mask logits leave the bfloat16 conv and meet the sigmoid as float32, as the
  head's meet the tanh: the output is the float32 formula of the two convs' outputs."""
  class Head(nn.Module):
    @nn.compact
    def __call__(self, features, image):
      return stargan.generator_output(features, image, kind="blend", out_channels=1, name="head",
                                      dtype=jnp.bfloat16)

  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.bfloat16)
  image = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
  variables = _randomised(Head().init(jax.random.key(0), features, image))
  out, state = Head().apply(variables, features, image, capture_intermediates=True)
  head = state["intermediates"]["head"]["__call__"][0]
  mask = state["intermediates"]["head_mask"]["__call__"][0]
  assert head.dtype == mask.dtype == jnp.bfloat16  # the convs ran in bfloat16
  m = jax.nn.sigmoid(mask.astype(jnp.float32))
  expected = m * image + (1.0 - m) * jnp.tanh(head.astype(jnp.float32))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
