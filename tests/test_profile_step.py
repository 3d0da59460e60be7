"""benchmarks/profile_step.py: its attribution of XLA instructions and its ablations' arithmetic."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step  # pylint: disable=g-import-not-at-top,wrong-import-position

_HLO = """\
HloModule jit_train_step

%fused_conv (param_0: f32[16,48,48,8], param_1: f32[4,4,8,16]) -> f32[16,24,24,16] {
  %param_0 = f32[16,48,48,8]{3,2,1,0} parameter(0)
  %param_1 = f32[4,4,8,16]{3,2,1,0} parameter(1)
  ROOT %conv_general_dilated.3 = f32[16,24,24,16]{3,2,1,0} convolution(%param_0, %param_1), window={size=4x4 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(Generator)/down0/conv_general_dilated"}
}

ENTRY %main.1 (a: f32[16,48,48,8], b: f32[4,4,8,16]) -> f32[16,24,24,16] {
  %a = f32[16,48,48,8]{3,2,1,0} parameter(0)
  %b = f32[4,4,8,16]{3,2,1,0} parameter(1)
  %ynn_fusion.1 = f32[16,24,24,16]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_conv, metadata={op_name="jit(train_step)/jvp(Generator)/down0/conv_general_dilated"}
  %convolution-base-dilated.2 = f32[16,4,4,8]{3,2,1,0} convolution(%a, %b), window={size=48x48 pad=1_1x1_1 rhs_dilate=2x2 rhs_reversal=1x1}, dim_labels=01fb_o01i->f01b
  %up = f32[16,96,96,8]{3,2,1,0} convolution(%a, %b), window={size=4x4 pad=2_2x2_2 lhs_dilate=2x2}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/transpose(jvp(Generator))/up1/conv_transpose"}
  %gp = f32[16,6,6,128]{3,2,1,0} convolution(%a, %b), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(transpose(jvp(Discriminator)))/src/conv_general_dilated"}
  %norm = f32[16,48,48,8]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_conv2, metadata={op_name="jit(train_step)/jvp(Generator)/stem_norm/norm/mul"}
  %resize = f32[16,96,96,8]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_conv2, metadata={op_name="jit(train_step)/jvp(Segmentor)/jit(_resize)/dot_general"}
  %stencil = f32[16,96,96,8]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_conv2, metadata={op_name="jit(train_step)/transpose(jvp(Segmentor))/resize_stencil/mul"}
  %transpose_copy_fusion.4 = f32[8,48,48,16]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_conv2
  ROOT %adam = f32[4,4,8,16]{3,2,1,0} add(%b, %b), metadata={op_name="jit(train_step)/add"}
}
"""


def test_categorise_attributes_every_kind_of_instruction():
  instructions, computations = profile_step.parse_hlo(_HLO)
  categorise = lambda name: profile_step.categorise(name, instructions, computations)
  assert categorise("ynn_fusion.1") == ("convolution", "forward")
  assert categorise("convolution-base-dilated.2") == (
      "rhs-dilated conv (gradients of stride-2 layers)", "backward")
  assert categorise("up") == (
      "conv, lhs-dilated (transposed conv; input gradient of stride-2)", "backward")
  assert categorise("gp") == ("convolution", "gradient penalty (2nd order)")
  assert categorise("norm") == ("norm (instance/batch)", "forward")
  assert categorise("resize")[0] == "bilinear resize"
  assert categorise("stencil") == ("bilinear resize", "backward")  # model.resize=stencil
  assert categorise("transpose_copy_fusion.4") == ("layout (copy/transpose)", "-")
  assert categorise("adam") == ("losses, Adam, RNG, metrics", "-")
  convolutions = {name for name in instructions if profile_step.is_convolution(categorise(name)[0])}
  assert convolutions == {"ynn_fusion.1", "convolution-base-dilated.2", "up", "gp",
                          "conv_general_dilated.3"}


def test_rewritten_conv_is_the_strided_conv():
  make = profile_step._space_to_depth_conv  # pylint: disable=protected-access
  x = jax.random.normal(jax.random.key(0), (2, 12, 10, 3))
  strided = nn.Conv(5, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))
  variables = strided.init(jax.random.key(1), x)
  s2d = make(nn.Conv)(5, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))
  assert (jax.tree.map(jnp.shape, s2d.init(jax.random.key(1), x))
          == jax.tree.map(jnp.shape, variables))
  np.testing.assert_allclose(s2d.apply(variables, x), strided.apply(variables, x), atol=1e-5)
  # Any other conv is left to nn.Conv itself.
  plain = nn.Conv(4, (3, 3))
  plain_variables = plain.init(jax.random.key(2), x)
  np.testing.assert_array_equal(
      make(nn.Conv)(4, (3, 3)).apply(plain_variables, x),
      plain.apply(plain_variables, x))


def test_ablations_patch_and_restore():
  from uagan_jax import losses  # pylint: disable=g-import-not-at-top
  from uagan_jax.models import segan  # pylint: disable=g-import-not-at-top
  original_penalty, original_conv = losses.gradient_penalty, nn.Conv
  with profile_step.ablation("no_gp"):
    assert float(losses.gradient_penalty(critic_fn=None, real=None, fake=None, alpha=None)) == 0.0
  with profile_step.ablation("s2d_down"):
    assert nn.Conv is not original_conv and issubclass(nn.Conv, original_conv)
  with profile_step.ablation("resize_nearest"):
    np.testing.assert_array_equal(segan.upsample2x(jnp.arange(4.0).reshape(1, 2, 2, 1))[0, :, :, 0],
                                  [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  assert losses.gradient_penalty is original_penalty and nn.Conv is original_conv


def test_versus_builds_the_config_with_the_overrides():
  assert profile_step.versus_overrides("model.strided_conv=im2col, model.dtype=bfloat16") == [
      "--config.model.strided_conv=im2col", "--config.model.dtype=bfloat16"]
  with pytest.raises(ValueError, match="KEY=VALUE"):
    profile_step.versus_overrides("model.strided_conv")
  config = profile_step.load_config("configs/test.py:stargan",
                                    profile_step.versus_overrides("model.strided_conv=im2col"))
  assert config.model.strided_conv == "im2col"
  assert config.train.num_devices == 1 and not config.data.augment
  # Without overrides, the config's own value (the stargan variant's canonical_vjp).
  assert profile_step.load_config("configs/test.py:stargan", []).model.strided_conv == \
      "canonical_vjp"


def test_run_steps_advances_the_state_and_takes_zero_steps():
  """benchmarks/step.py's run_steps, which every benchmark times: ``count`` steps from the state
  (0 is a warm-up of nothing, e.g. ``compare_torch.py --warmup 0``)."""
  import step as step_bench  # pylint: disable=g-import-not-at-top
  compiled = step_bench.CompiledStep(
      run=jax.jit(lambda state, batch, key: (state + batch["x"], {"state": state})),
      state=jnp.zeros(()), batch={"x": jnp.ones(())}, key=jax.random.key(0), mesh=None,
      flops=None, compile_seconds=0.0)
  state, seconds = step_bench.run_steps(compiled, compiled.state, 3)
  assert float(state) == 3.0 and seconds >= 0
  state, _ = step_bench.run_steps(compiled, state, 0)
  assert float(state) == 3.0
