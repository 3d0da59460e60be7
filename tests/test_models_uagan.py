"""UAGAN's two-stream network: shapes, the attention fusion's wiring and its ablation switches;
without fusion, exactly StarGAN's Generator beside SegAN's Segmentor; every parameter named for
its stream.

One tiny network (widths 4-8 on 32x32 slices), parameters drawn with "rbg" keys (see
test_models_stargan.py: threefry's unrolled rounds compile slowly on CPU and the values do not matter).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uagan_jax.models.segan import Segmentor
from uagan_jax.models.stargan import Generator
from uagan_jax.models.uagan import UnifiedNet

_IMAGE = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 1)), jnp.float32)
_SOURCE = jnp.array([0, 1])


def _net(**kwargs) -> UnifiedNet:
  return UnifiedNet(seg_features=(4, 8, 16), gen_features=4, num_residual=1, **kwargs)


def _variables(*, fuse=True, fuse_reverse=True, gen_norm="instance"):
  return _cached_variables(fuse, fuse_reverse, gen_norm)


@functools.cache
def _cached_variables(fuse, fuse_reverse, gen_norm):
  """Initial variables, with every fusion output projection W_o made non-zero (as after training)."""
  net = _net(fuse=fuse, fuse_reverse=fuse_reverse, gen_norm=gen_norm)
  variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(0, impl="rbg"), _IMAGE, _SOURCE, _SOURCE)
  params = dict(variables["params"])
  for name in params:
    if name.startswith("fuse_"):
      kernel = params[name]["out"]["kernel"]
      params[name] = {**params[name], "out": {**params[name]["out"], "kernel": 0.5 + jnp.arange(
          kernel.size, dtype=kernel.dtype).reshape(kernel.shape) / kernel.size}}
  return {**variables, "params": params}


def _apply(variables, target, *, source=_SOURCE, image=_IMAGE, **kwargs):
  return _net(**kwargs).apply(variables, image, source, target, train=False)


def test_outputs_translation_in_tanh_range_and_one_logit_map_per_region():
  translated, logits = _apply(_variables(), jnp.array([2, 3]))
  assert translated.shape == (2, 32, 32, 1) and logits.shape == (2, 32, 32, 3)
  assert np.all(np.abs(translated) <= 1.0)


@pytest.mark.parametrize("fuse", [True, False])
def test_fusion_carries_the_translation_target_into_the_segmentation(fuse):
  # The segmentation stream is conditioned on the source modality only; the target reaches it
  # through the fusion gates alone.
  variables = _variables(fuse=fuse)
  _, logits_a = _apply(variables, jnp.array([2, 2]), fuse=fuse)
  _, logits_b = _apply(variables, jnp.array([3, 3]), fuse=fuse)
  assert (not np.allclose(logits_a, logits_b, atol=1e-6)) == fuse


@pytest.mark.parametrize("fuse_reverse", [True, False])
def test_reverse_fusion_carries_the_segmentation_input_into_the_translation(fuse_reverse):
  # Changing only the segmentation stream's conditioning (the source id) changes the translation
  # only when the segmentation stream feeds the translation stream.
  variables = _variables(fuse_reverse=fuse_reverse)
  target = jnp.array([2, 3])
  translated_a, _ = _apply(variables, target, source=jnp.array([0, 0]), fuse_reverse=fuse_reverse)
  translated_b, _ = _apply(variables, target, source=jnp.array([1, 1]), fuse_reverse=fuse_reverse)
  assert (not np.allclose(translated_a, translated_b, atol=1e-6)) == fuse_reverse


def test_fusion_starts_as_two_independent_streams():
  # W_o starts at zero: the initialised fused network computes exactly what the unfused one does
  # (each gate adds an exact 0.0).
  init = lambda net: jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(0, impl="rbg"), _IMAGE, _SOURCE, _SOURCE)
  fused = init(_net())
  unfused_params = {k: v for k, v in fused["params"].items() if not k.startswith("fuse_")}
  unfused = {**fused, "params": unfused_params}
  target = jnp.array([2, 3])
  for got, want in zip(_apply(fused, target), _apply(unfused, target, fuse=False)):
    np.testing.assert_array_equal(got, want)
  assert set(fused["params"]) - set(unfused_params) == {
      "fuse_gen_to_seg0", "fuse_gen_to_seg1", "fuse_seg_to_gen0", "fuse_seg_to_gen1"}


def test_conditional_norm_holds_a_scale_and_offset_per_modality():
  params = _variables(gen_norm="conditional_instance")["params"]
  assert params["gen_stem_norm"]["scale"].shape == (4, 4)
  assert params["gen_res0_norm1"]["bias"].shape == (4, 16)
  assert _variables()["params"]["gen_stem_norm"]["scale"].shape == (4,)


@pytest.mark.parametrize("output", ["residual", "blend"])
def test_translation_output_kinds_start_from_the_input(output):
  # residual: the translation stream starts as the identity; blend: half its input, half its
  # drawn image (mask head at zero). Either way the input is the translation input (the image
  # scaled into [-1, 1]), not the segmentation stream's image.
  translation_input = jnp.tanh(_IMAGE)
  net = _net(gen_output=output)
  variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(0, impl="rbg"), _IMAGE, _SOURCE, _SOURCE)
  target = jnp.array([2, 3])
  translated, _ = net.apply(variables, _IMAGE, _SOURCE, target, train=False,
                            translation_input=translation_input)
  if output == "residual":
    np.testing.assert_allclose(translated, jnp.clip(translation_input, -0.98, 0.98), rtol=1e-5,
                               atol=1e-6)
    return
  assert set(variables["params"]) - set(_variables()["params"]) == {"gen_head_mask"}
  params = {k: v for k, v in variables["params"].items() if k != "gen_head_mask"}
  drawn, _ = _net().apply({**variables, "params": params}, _IMAGE, _SOURCE, target, train=False,
                          translation_input=translation_input)
  np.testing.assert_allclose(translated, 0.5 * translation_input + 0.5 * drawn, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("output", ["residual", "blend"])
def test_pair_heads_give_each_source_target_pair_its_own_head(output):
  # 16 heads side by side in the head (and mask head) convs; the example of pair (source, target)
  # uses column source * 4 + target, so it equals a shared-head network holding that column, and
  # changing another pair's column leaves it unchanged.
  translation_input = jnp.tanh(_IMAGE)
  net = _net(gen_output=output, gen_pair_heads=True)
  variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(0, impl="rbg"), _IMAGE, _SOURCE, _SOURCE)
  params = dict(variables["params"])
  heads = ("gen_head", "gen_head_mask") if output == "blend" else ("gen_head",)
  rng = np.random.default_rng(1)
  for name in heads:  # non-zero, distinct heads (they start at zero where that is the identity)
    params[name] = {key: jnp.asarray(rng.normal(0.0, 0.3, value.shape), jnp.float32)
                    for key, value in params[name].items()}
    assert params[name]["kernel"].shape[-1] == 16
  source, target = jnp.array([0, 2]), jnp.array([1, 3])
  translated, _ = net.apply({**variables, "params": params}, _IMAGE, source, target, train=False,
                            translation_input=translation_input)
  shared = _net(gen_output=output)
  for example, pair in enumerate((0 * 4 + 1, 2 * 4 + 3)):
    column = {name: {key: value[..., pair:pair + 1] for key, value in params[name].items()}
              for name in heads}
    want, _ = shared.apply({**variables, "params": {**params, **column}}, _IMAGE, source, target,
                           train=False, translation_input=translation_input)
    # A 16-column conv and a 1-column one sum in different orders: float32 rounding reaches
    # 1.2e-6 on some CPUs (AMD EPYC), while another pair's head would be off by ~0.1.
    np.testing.assert_allclose(translated[example], want[example], rtol=1e-5, atol=1e-5)
  # Pair t1 -> t1ce's head (column 1) moved: only example 0 changes.
  moved = {**params, "gen_head": {**params["gen_head"], "kernel": params["gen_head"]["kernel"].at[
      ..., 1].add(0.5)}}
  changed, _ = net.apply({**variables, "params": moved}, _IMAGE, source, target, train=False,
                         translation_input=translation_input)
  assert float(jnp.abs(changed[0] - translated[0]).max()) > 1e-3
  np.testing.assert_array_equal(changed[1], translated[1])


def test_pair_heads_residual_starts_as_the_identity_for_every_pair():
  translation_input = jnp.tanh(_IMAGE)
  net = _net(gen_output="residual", gen_pair_heads=True)
  variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(0, impl="rbg"), _IMAGE, _SOURCE, _SOURCE)
  for source, target in ((0, 1), (3, 2)):
    translated, _ = net.apply(variables, _IMAGE, jnp.full((2,), source), jnp.full((2,), target),
                              train=False, translation_input=translation_input)
    np.testing.assert_allclose(translated, jnp.clip(translation_input, -0.98, 0.98), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_reverse_gate_stop_gradient_keeps_translation_gradients_out_of_the_segmentation(
    stop_gradient):
  # The same translation either way; but the gradient of a translation-only loss reaches the
  # segmentation stream's own weights (its encoder, seg_down0) only without the stop-gradient.
  # The reverse gate itself still learns from it.
  variables = _variables()
  target = jnp.array([2, 3])
  net = _net(fuse_reverse_stop_gradient=stop_gradient)
  translated, _ = net.apply(variables, _IMAGE, _SOURCE, target, train=False)
  np.testing.assert_array_equal(translated, _apply(variables, target)[0])

  def translation_loss(params):
    out, _ = net.apply({**variables, "params": params}, _IMAGE, _SOURCE, target, train=False)
    return jnp.mean(out ** 2)

  # One jitted program: op by op, the ~220 primitives of this gradient each compile on their own.
  grads = jax.jit(jax.grad(translation_loss))(variables["params"])
  seg_encoder = float(jnp.abs(grads["seg_down0"]["kernel"]).max())
  assert (seg_encoder == 0.0) == stop_gradient
  assert float(jnp.abs(grads["fuse_seg_to_gen0"]["gate"]["kernel"]).max()) > 0.0
  assert float(jnp.abs(grads["gen_stem"]["kernel"]).max()) > 0.0


# ------------------------------------------------------------------------------------------------
# Without fusion, UnifiedNet is StarGAN's Generator next to SegAN's Segmentor
# ------------------------------------------------------------------------------------------------

_CLIP = 5.0  # config.data.clip: the step translates z-scores clipped to +-clip, divided by clip
_ZSCORES = jnp.clip(2.0 * _IMAGE, -_CLIP, _CLIP)
_BATCH_NORM = re.compile(r"BatchNorm_\d+")


def _split_streams(tree: dict) -> tuple[dict, dict]:
  """UnifiedNet's top-level collection -> (`Generator`'s, `Segmentor`'s), renamed to theirs.

  ``gen_X`` is the Generator's ``X`` (``gen_head`` its ``head``), ``seg_X`` the Segmentor's ``X``
  (``seg_head_conv`` and ``seg_logits`` its ``head_conv`` and ``logits``). The segmentation
  stream's BatchNorms carry no prefix: Flax names them ``BatchNorm_<k>`` in the order they are
  created, which is the Segmentor's order (encoder, decoder coarse to fine, head). The gates
  (``fuse_*``) have no counterpart and are left out.
  """
  generator, segmentor = {}, {}
  for name, subtree in tree.items():
    if name.startswith("gen_"):
      generator[name[len("gen_"):]] = subtree
    elif name.startswith("seg_"):
      segmentor[name[len("seg_"):]] = subtree
    elif _BATCH_NORM.fullmatch(name):
      segmentor[name] = subtree
    elif not name.startswith("fuse_"):
      raise KeyError(f"UnifiedNet layer {name!r} belongs to neither stream")
  return generator, segmentor


def _perturbed(variables: dict, *, keep_gate_outputs: bool) -> dict:
  """Every variable moved off its initial value (norms off the identity, BatchNorm statistics off
  (0, 1)), so that a layer mapped onto the wrong one cannot go unnoticed; with
  ``keep_gate_outputs`` the gates' output convs W_o stay at their zero initialisation."""
  rng = np.random.default_rng(7)

  def move(path, leaf):
    key = jax.tree_util.keystr(path)
    if keep_gate_outputs and "fuse_" in key and "['out']" in key:
      return leaf
    if key.startswith("['batch_stats']") and key.endswith("['var']"):
      return leaf * jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    return leaf + jnp.asarray(0.05 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(move, variables)


@pytest.mark.parametrize("fuse, gen_norm, gen_output", [
    (False, "instance", "tanh"), (False, "instance", "residual"),
    (False, "conditional_instance", "blend"), (True, "conditional_instance", "residual"),
    (True, "instance", "tanh")])
def test_without_fusion_the_streams_are_stargan_generator_and_segan_segmentor(fuse, gen_norm,
                                                                              gen_output):
  """UnifiedNet(fuse=False), or fused with every gate's W_o at its zero initialisation, computes
  exactly `stargan.Generator` on the translation input and `segan.Segmentor` on the image.

  Its variables, renamed by `_split_streams`, are exactly theirs (names, tree and shapes), and
  with them the translation, the logits and (train=True) the updated BatchNorm statistics are
  bit-identical (assert_array_equal, no tolerance), in inference and in training mode, compiled
  as the step compiles them: the streams run the same ops in the same order (a zero gate adds an
  exact 0.0). Seen exact on CPU (jax 0.10) and on an H200 GPU (jax 0.11). Shared output heads
  only: Generator has no per-pair heads (gen_pair_heads).
  """
  net = _net(fuse=fuse, gen_norm=gen_norm, gen_output=gen_output)
  generator = Generator(base_features=4, num_residual=1, norm=gen_norm, output=gen_output)
  segmentor = Segmentor(features=(4, 8, 16))
  translation_input = _ZSCORES / _CLIP
  source, target = jnp.array([0, 3]), jnp.array([2, 1])
  variables = _perturbed(net.init(jax.random.key(0, impl="rbg"), _ZSCORES, source, target,
                                  train=False), keep_gate_outputs=True)
  gen_params, seg_params = _split_streams(variables["params"])
  gen_stats, seg_stats = _split_streams(variables["batch_stats"])
  assert not gen_stats
  # The renamed trees are exactly the single-task networks' (names, nesting, shapes).
  key = jax.random.key(0, impl="rbg")
  want_gen = jax.eval_shape(generator.init, key, translation_input, target)
  want_seg = jax.eval_shape(functools.partial(segmentor.init, train=False), key, _ZSCORES, source)
  shapes = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)
  assert shapes({"params": gen_params}) == shapes(want_gen)
  assert shapes({"params": seg_params, "batch_stats": seg_stats}) == shapes(want_seg)
  if fuse:
    assert {name for name in variables["params"] if name.startswith("fuse_")} == {
        "fuse_gen_to_seg0", "fuse_gen_to_seg1", "fuse_seg_to_gen0", "fuse_seg_to_gen1"}

  for train in (False, True):
    @jax.jit
    def unified(variables):
      (translated, logits), updated = net.apply(
          variables, _ZSCORES, source, target, train=train, translation_input=translation_input,
          mutable=["batch_stats"])
      return translated, logits, _split_streams(updated["batch_stats"])[1]

    @jax.jit
    def separate(gen_params, seg_params, seg_stats):
      translated = generator.apply({"params": gen_params}, translation_input, target)
      logits, updated = segmentor.apply({"params": seg_params, "batch_stats": seg_stats}, _ZSCORES,
                                        source, train=train, mutable=["batch_stats"])
      return translated, logits, updated["batch_stats"]

    got, want = unified(variables), separate(gen_params, seg_params, seg_stats)
    # Not degenerate: the translation is mostly off tanh's +-1, the logits vary.
    assert float(jnp.mean(jnp.abs(got[0]) < 0.99)) > 0.5 and float(jnp.std(got[1])) > 0.01
    jax.tree.map(np.testing.assert_array_equal, got, want)
    if train:  # the statistics did move
      assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got[2]),
                                                          jax.tree.leaves(seg_stats)))


def _stream_by_name(name: str) -> str | None:
  """The stream a top-level UnifiedNet parameter belongs to, by its name (None: neither).

  The unified optimizer's learning-rate partition (train.py) relies on this naming: ``gen_*`` and
  the gates into the translation stream follow the generator's learning rate, the rest the
  segmentor's. The segmentation stream's BatchNorms are named ``BatchNorm_<k>`` by Flax, without
  the ``seg_`` prefix (renaming them would break existing checkpoints), so they are listed here.
  """
  if name.startswith(("gen_", "fuse_seg_to_gen")):
    return "translation"
  if name.startswith(("seg_", "fuse_gen_to_seg")) or _BATCH_NORM.fullmatch(name):
    return "segmentation"
  return None


def test_every_parameter_belongs_to_exactly_one_stream_by_name():
  # Every optional layer present: both gates, the blend's mask head, per-pair heads,
  # conditional norms.
  net = _net(gen_output="blend", gen_pair_heads=True, gen_norm="conditional_instance")
  variables = jax.eval_shape(functools.partial(net.init, train=False),
                             jax.random.key(0, impl="rbg"), _IMAGE, _SOURCE, _SOURCE)
  streams = {name: _stream_by_name(name) for name in variables["params"]}
  assert None not in streams.values(), [n for n, s in streams.items() if s is None]
  translation = {n for n, s in streams.items() if s == "translation"}
  assert {"gen_stem", "gen_head", "gen_head_mask", "gen_up1_norm", "fuse_seg_to_gen0",
          "fuse_seg_to_gen1"} <= translation
  assert {"seg_down0", "seg_logits", "fuse_gen_to_seg1"} <= set(streams) - translation
  # SegAN's BatchNorms: after its encoder levels but the first, its decoder levels and its head.
  batch_norms = {n for n in streams if _BATCH_NORM.fullmatch(n)}
  assert batch_norms == {f"BatchNorm_{k}" for k in range(2 * len(net.seg_features) - 1)}
  assert set(variables["batch_stats"]) == batch_norms


def test_without_fusion_each_stream_trains_only_its_own_parameters():
  # What the names claim, checked by gradients: unfused, a loss of the translation alone does
  # not reach a parameter named for the segmentation stream, and the other way round.
  net = _net(fuse=False, gen_output="blend", gen_norm="conditional_instance")
  variables = _perturbed(net.init(jax.random.key(0, impl="rbg"), _IMAGE, _SOURCE, _SOURCE,
                                  train=False), keep_gate_outputs=False)
  target = jnp.array([2, 3])

  @jax.jit
  def gradients(params):
    def loss(params, which):
      (translated, logits), _ = net.apply({**variables, "params": params}, _IMAGE, _SOURCE,
                                          target, train=True, translation_input=jnp.tanh(_IMAGE),
                                          mutable=["batch_stats"])
      return jnp.mean(translated ** 2) if which == "translation" else jnp.mean(logits ** 2)
    return {which: jax.grad(loss)(params, which) for which in ("translation", "segmentation")}

  grads = gradients(variables["params"])
  for name in variables["params"]:
    other = "segmentation" if _stream_by_name(name) == "translation" else "translation"
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(grads[other][name])), (name, other)
    assert any(np.any(leaf) for leaf in jax.tree.leaves(grads[_stream_by_name(name)][name])), name
