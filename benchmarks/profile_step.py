"""Where the compiled train step's time goes on a CPU: a per-category profile and ablations.

Profile: the step runs under jax.profiler; every executed XLA thunk's time is summed and
attributed, through the compiled HLO's metadata (op_name: the network, the layer and the pass),
to a category (convolutions, the generator's transposed convolutions, norms, bilinear resize,
layout copies/transposes, the rest of the networks, losses + Adam + RNG) and a pass (forward,
backward, the gradient penalty's second-order pass). XLA's cost analysis gives the step's FLOPs.

Ablations (--ablations): throwaway variants of the step, each patched into the models in this
process only (uagan_jax/ is not changed), timed against the unchanged step in alternating pairs
(median ratio of step times, variant / baseline: < 1 means the variant is faster):
  s2d_down        every 4x4 stride-2 conv as space-to-depth + 2x2 stride-1 conv (the same sum)
  no_gp           the WGAN-GP penalty removed (its second-order pass with it)
  up_resize_conv  the generator's 4x4 stride-2 transposed convs replaced by nearest x2 + 3x3 conv
  no_gen_norm     the generator's instance norms removed (an upper bound of their cost)
  no_batch_norm   the segmentor's BatchNorms removed (an upper bound of their cost)
  resize_nearest  the segmentor's bilinear x2 replaced by nearest (jnp.repeat)

Config variants (--versus KEY=VALUE[,KEY=VALUE...], repeatable): the step built with those config
overrides (a setting of uagan_jax/ itself, e.g. model.strided_conv=canonical_vjp or
model.resize=stencil), timed against the config as given in the same alternating pairs.

  python benchmarks/profile_step.py --config configs/stargan.py:demo --ablations no_gp,up_resize_conv
  python benchmarks/profile_step.py --config configs/stargan.py:demo --no-profile \
      --versus model.strided_conv=canonical_vjp
  python benchmarks/profile_step.py --config configs/segan.py:demo --steps 5
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

_NETWORKS = ("UnifiedNet", "Generator", "Discriminator", "Segmentor", "Critic")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = .*? (?P<op>[a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+) \(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_CALLS = re.compile(r"calls=%(?P<called>[\w.\-]+)")
_HOUSEKEEPING = ("ThreadpoolListener", "ThunkExecutor", "end: ")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """The compiled HLO's instructions {name: (opcode, op_name, called computation, line)} and its
  computations {name: [instruction lines]}."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith("{"):
      current = header.group("name")
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    op_name = _OP_NAME.search(line)
    called = _CALLS.search(line)
    instructions.setdefault(match.group("name"), (
        match.group("op"), op_name.group("op_name") if op_name else "",
        called.group("called") if called else None, line))
    if current:
      computations[current].append(line)
  return instructions, computations


def categorise(name: str, instructions: dict, computations: dict) -> tuple[str, str]:
  """(category, pass) of an executed instruction, from its opcode, its fused computation and
  the op_name metadata JAX wrote (e.g. ``jit(train_step)/transpose(jvp(Generator))/up0/...``)."""
  opcode, op_name, called, line = instructions.get(name, ("?", "", None, ""))
  body = "\n".join(computations.get(called, [])) if called else line
  convolution = " convolution(" in body or opcode == "convolution"
  network = next((n for n in _NETWORKS if n in op_name), None)
  layer = op_name.split(f"{network})", 1)[-1] if network else ""
  layer = layer.strip("/").split("/")[0] if layer else ""
  jvps = op_name.count("jvp(")
  if jvps >= 2:
    phase = "gradient penalty (2nd order)"
  elif "transpose(" in op_name:
    phase = "backward"
  else:
    phase = "forward"
  if convolution and "rhs_dilate" in body:
    # XLA's form of a stride-2 layer's gradients: a conv with the output gradients dilated by
    # the stride; for the kernel gradient its window is the whole feature map (and it carries
    # no op_name metadata).
    category, phase = "rhs-dilated conv (gradients of stride-2 layers)", "backward"
    return category, phase
  if convolution and "lhs_dilate" in body:
    category = "conv, lhs-dilated (transposed conv; input gradient of stride-2)"
  elif convolution:
    if network in ("Generator", "UnifiedNet") and re.fullmatch(r"(gen_)?up\d", layer):
      category = "transposed conv (G's up layers)"
    else:
      category = "convolution"
  elif "norm" in layer.lower():
    category = "norm (instance/batch)"
  elif "resize" in op_name or "scale_and_translate" in op_name:
    category = "bilinear resize"
  elif opcode in ("copy", "transpose") or re.match(r"(copy|transpose)", name):
    category = "layout (copy/transpose)"
  elif network:
    category = "other network ops (activations, concat, pad, gates)"
  else:
    category = "losses, Adam, RNG, metrics"
  if not network and phase == "forward" and "transpose(" not in op_name:
    phase = "-"
  return category, phase


def profile(compiled, steps: int, state=None) -> tuple[dict, float, object]:
  """Thunk time (seconds per step) by executed instruction name, the wall time per step, and
  the state after the steps (the step donates its input state: pass the latest one as ``state``
  once ``compiled.state`` has been stepped)."""
  state = compiled.state if state is None else state
  for _ in range(2):
    state, metrics = compiled.run(state, compiled.batch, compiled.key)
  jax.block_until_ready(metrics)
  folder = tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(folder)
  started = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled.run(state, compiled.batch, compiled.key)
  jax.block_until_ready((state, metrics))
  wall = (time.perf_counter() - started) / steps
  jax.profiler.stop_trace()
  (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
  data = jax.profiler.ProfileData.from_file(path)
  seconds = collections.Counter()
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if not event.name.startswith(_HOUSEKEEPING):
          seconds[event.name] += event.duration_ns * 1e-9 / steps
  return seconds, wall, state


def is_convolution(category: str) -> bool:
  """Whether a category of ``categorise`` is a convolution of some kind (forward, gradient,
  transposed)."""
  return "conv" in category


def print_profile(compiled, steps: int, load_average: str):
  """Prints the per-category table and the top instructions; returns the state after."""
  seconds, wall, state = profile(compiled, steps)
  instructions, computations = parse_hlo(compiled.run.as_text())
  by_category, by_pair = collections.Counter(), collections.Counter()
  for name, value in seconds.items():
    category, phase = categorise(name, instructions, computations)
    by_category[category] += value
    by_pair[(category, phase)] += value
  total = sum(seconds.values())
  print(f"wall {1000 * wall:.1f} ms/step; thunks {1000 * total:.1f} ms/step (summed over "
        f"threads); {compiled.flops / 1e9:.2f} GFLOP/step (XLA cost analysis) = "
        f"{compiled.flops / wall / 1e9:.1f} GFLOP/s; load {load_average}")
  print("| category | pass | ms/step | share |")
  print("| --- | --- | --- | --- |")
  for category, value in by_category.most_common():
    print(f"| {category} | all | {1000 * value:.1f} | {100 * value / total:.1f}% |")
    for (cat, phase), pair_value in sorted(by_pair.items(), key=lambda kv: -kv[1]):
      if cat == category and len([k for k in by_pair if k[0] == category]) > 1:
        print(f"|  | {phase} | {1000 * pair_value:.1f} | {100 * pair_value / total:.1f}% |")
  print("\ntop 12 instructions:")
  for name, value in seconds.most_common(12):
    opcode, op_name, _, line = instructions.get(name, ("?", "", None, ""))
    shape = line.split(" = ", 1)[-1].split(" ", 1)[0] if line else ""
    window = re.search(r"window=\{[^}]*\}", line)
    print(f"  {1000 * value:7.1f} ms  {name} ({opcode} {shape} {window.group(0) if window else ''}"
          f") {op_name[:100]}")
  return state


# ------------------------------------------------------------------------------------------------
# Ablations: throwaway patches of the model code, in this process only
# ------------------------------------------------------------------------------------------------


def _space_to_depth_conv(conv_class):
  """A Conv whose 4x4 stride-2 pad-1 layers compute the same sum as a 2x2 stride-1 conv on the
  space-to-depth input (same parameter, [4, 4, C, O]); so their gradients are stride-1 convs."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class SpaceToDepthConv(conv_class):  # pylint: disable=missing-class-docstring

    @nn.compact
    def __call__(self, inputs):
      if (tuple(self.kernel_size) != (4, 4) or tuple(self.strides or (1, 1)) != (2, 2)
          or self.padding != ((1, 1), (1, 1))):
        return super().__call__(inputs)
      b, h, w, c = inputs.shape
      kernel = self.param("kernel", self.kernel_init, (4, 4, c, self.features), self.param_dtype)
      x = jnp.pad(inputs.astype(self.dtype or inputs.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
      hp, wp = (h + 2) // 2, (w + 2) // 2
      x = x.reshape(b, hp, 2, wp, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, 4 * c)
      k = kernel.reshape(2, 2, 2, 2, c, self.features).transpose(0, 2, 1, 3, 4, 5)
      k = k.reshape(2, 2, 4 * c, self.features).astype(x.dtype)
      y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      if self.use_bias:
        y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      return y

  SpaceToDepthConv.__name__ = conv_class.__name__
  return SpaceToDepthConv


@contextlib.contextmanager
def ablation(name: str):
  """Patches the model code for one variant of the step; restores it on exit."""
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  from uagan_jax import losses
  from uagan_jax.models import segan, stargan
  # pylint: enable=g-import-not-at-top
  patches = []

  def patch(module, attribute, value):
    patches.append((module, attribute, getattr(module, attribute)))
    setattr(module, attribute, value)

  if name == "no_gp":
    patch(losses, "gradient_penalty", lambda **kwargs: jnp.zeros((), jnp.float32))
  elif name == "up_resize_conv":
    def up(x, features, norm, *, name, dtype, **_):
      b, h, w, c = x.shape
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = nn.Conv(features, (3, 3), use_bias=False, dtype=dtype, name=name)(x)
      return nn.relu(norm(f"{name}_norm")(x))
    patch(stargan, "generator_up", up)
  elif name == "no_gen_norm":
    original = stargan.generator_norm
    patch(stargan, "generator_norm", lambda *a, **k: (lambda name: (lambda x: x)))
    del original
  elif name == "no_batch_norm":
    patch(segan, "segmentor_batch_norm", lambda **kwargs: (lambda: (lambda x: x)))
  elif name == "s2d_down":
    patch(nn, "Conv", _space_to_depth_conv(nn.Conv))
  elif name == "resize_nearest":
    patch(segan, "upsample2x",
          lambda x, **_: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
  elif name != "baseline":
    raise ValueError(f"unknown ablation {name!r}")
  try:
    yield
  finally:
    for module, attribute, value in reversed(patches):
      setattr(module, attribute, value)


def time_steps(compiled, holder: dict, count: int) -> float:
  """Seconds per step of ``count`` steps from ``holder["state"]``, which they advance."""
  holder["state"], seconds = step_bench.run_steps(compiled, holder["state"], count)
  return seconds / count


def load() -> str:
  with open("/proc/loadavg", encoding="ascii") as f:
    return f.read().split()[0]


def load_config(spec: str, overrides):
  """The config to profile: ``spec`` with ``overrides``, on one device, augmentation off."""
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config(spec, ["--config.train.num_devices=1",
                                       "--config.data.augment=false", *overrides])


def versus_overrides(spec: str) -> list[str]:
  """``--versus`` ``"a.b=1,c.d=x"`` as config overrides ``["--config.a.b=1", "--config.c.d=x"]``."""
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if not items or any("=" not in item for item in items):
    raise ValueError(f"--versus {spec!r}: expected KEY=VALUE[,KEY=VALUE...]")
  return [f"--config.{item}" for item in items]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/stargan.py:demo")
  parser.add_argument("--steps", type=int, default=3, help="profiled steps")
  parser.add_argument("--ablations", default="", help="comma-separated, see the docstring")
  parser.add_argument("--versus", action="append", default=[],
                      help="KEY=VALUE[,KEY=VALUE...]: a config variant to time against the config")
  parser.add_argument("--pairs", type=int, default=3, help="alternating pairs per ablation")
  parser.add_argument("--pair-steps", type=int, default=2, help="steps per timed run")
  parser.add_argument("--no-profile", dest="profile", action="store_false")
  args, overrides = parser.parse_known_args(argv)
  config = load_config(args.config, overrides)
  print(f"{args.config}: {config.model.name}, {config.data.image_size[0]}x"
        f"{config.data.image_size[1]}, batch {config.train.batch_size}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {jax.device_count()} device(s)")
  baseline = step_bench.compile_step(config)
  state = baseline.state
  if args.profile:
    state = print_profile(baseline, args.steps, load())
  variants = [(name, functools.partial(ablation, name))
              for name in args.ablations.split(",") if name]
  for spec in args.versus:
    variant_config = load_config(args.config, [*overrides, *versus_overrides(spec)])
    variants.append((spec, functools.partial(contextlib.nullcontext, variant_config)))
  if not variants:
    return 0
  holders = {"baseline": {"state": state}}
  print("\n| ablation | GFLOP/step | step time variant / baseline (median of pairs) | pairs "
        "| baseline ms | load |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, context in variants:
    with context() as variant_config:
      variant = step_bench.compile_step(variant_config or config)
    holder = {"state": variant.state}
    time_steps(variant, holder, 1)
    ratios, base_times, loads = [], [], []
    for pair in range(args.pairs):
      if pair % 2 == 0:
        base = time_steps(baseline, holders["baseline"], args.pair_steps)
        other = time_steps(variant, holder, args.pair_steps)
      else:
        other = time_steps(variant, holder, args.pair_steps)
        base = time_steps(baseline, holders["baseline"], args.pair_steps)
      ratios.append(other / base)
      base_times.append(base)
      loads.append(load())
    print(f"| {name} | {variant.flops / 1e9:.2f} (baseline {baseline.flops / 1e9:.2f}) "
          f"| {statistics.median(ratios):.2f} | {', '.join(f'{r:.2f}' for r in ratios)} "
          f"| {1000 * statistics.median(base_times):.0f} | {min(loads)}-{max(loads)} |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
