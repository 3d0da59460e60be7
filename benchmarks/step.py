"""Speed of the compiled train step: steps/s, images/s, achieved FLOP/s, compile time.

FLOPs per step come from XLA's cost analysis of the compiled program (what XLA counts, for all
networks and both phases together), so achieved FLOP/s = FLOPs per step x steps/s. Data loading
is not included: the batch is fixed and already on the devices, as the prefetching loop makes it.

  python benchmarks/step.py --config configs/segan.py:demo
  python benchmarks/step.py --config configs/segan.py --batch 32 --steps 50
  python benchmarks/step.py --config configs/segan.py:demo --devices 4 --mode pmap
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np


class CompiledStep(NamedTuple):
  """The compiled train step ready to run: ``state, metrics = run(state, batch, key)``.

  ``flops`` is XLA's cost analysis of the whole step on the whole mesh (None under pmap);
  ``compile_seconds`` includes the first step; ``state`` is the state after that step.
  """
  run: Callable
  state: Any
  batch: dict
  key: jax.Array
  mesh: Any
  flops: float | None
  compile_seconds: float


def random_batch(config) -> dict[str, np.ndarray]:
  """A fixed random batch of the config's global size: images, region maps, modality ids."""
  batch_size = config.train.batch_size
  height, width = config.data.image_size
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(batch_size, height, width, 1)).astype(np.float32),
          "regions": (rng.random((batch_size, height, width, 3)) > 0.8).astype(np.float32),
          "modality": rng.integers(0, 4, batch_size).astype(np.int32)}


def compile_step(config) -> CompiledStep:
  """Builds, compiles and runs once the project's train step for ``config`` (train.make_step)."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import parallel, train, train_state
  # pylint: enable=g-import-not-at-top
  mesh = parallel.make_mesh(config.train.num_devices)
  batch = random_batch(config)
  if config.train.parallel_mode == "shard_map":
    batch = parallel.shard_batch(batch, mesh)
  state = train_state.init_state(config, mesh)
  key = jax.random.key(0)
  step = train.make_step(config, mesh)

  flops = None
  started = time.perf_counter()
  if config.train.parallel_mode == "shard_map":
    compiled = step.lower(state, batch, key).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else None
    if analysis and "flops" in analysis:
      # The shard_map program is the per-device program: scale to the whole mesh.
      flops = float(analysis["flops"]) * mesh.devices.size
    run = compiled
  else:
    run = step
  state, metrics = run(state, batch, key)
  jax.block_until_ready(metrics)
  return CompiledStep(run=run, state=state, batch=batch, key=key, mesh=mesh, flops=flops,
                      compile_seconds=time.perf_counter() - started)


def run_steps(compiled: CompiledStep, state, count: int):
  """Runs ``count`` steps of ``compiled`` from ``state`` (same batch and key each step); returns
  the last state and the wall seconds until its result is ready."""
  started = time.perf_counter()
  for _ in range(count):
    state, _ = compiled.run(state, compiled.batch, compiled.key)
  jax.block_until_ready(state)  # count may be 0 (no warm-up): then nothing ran
  return state, time.perf_counter() - started


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/segan.py:demo")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--devices", type=int, default=0, help="0 = all local devices")
  parser.add_argument("--mode", choices=("shard_map", "pmap"), default=None)
  args, overrides = parser.parse_known_args(argv)

  # pylint: disable=g-import-not-at-top
  from uagan_jax import config as config_lib
  from uagan_jax import parallel
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  try:
    extra = list(overrides)
    if args.batch:
      extra.append(f"--config.train.batch_size={args.batch}")
    if args.devices:
      extra.append(f"--config.train.num_devices={args.devices}")
    if args.mode:
      extra.append(f"--config.train.parallel_mode={args.mode}")
    config = config_lib.load_config(args.config, extra)
    mesh = parallel.make_mesh(config.train.num_devices)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  compiled = compile_step(config)
  state, run, key, batch, flops = (compiled.state, compiled.run, compiled.key, compiled.batch,
                                   compiled.flops)
  compile_seconds, mesh = compiled.compile_seconds, compiled.mesh
  batch_size = config.train.batch_size
  height, width = config.data.image_size

  for _ in range(args.warmup):
    state, metrics = run(state, batch, key)
  jax.block_until_ready(metrics)
  state, seconds = run_steps(compiled, state, args.steps)

  steps_per_second = args.steps / seconds
  device = mesh.devices.flat[0]
  print(f"config        {args.config} ({config.model.name}), slices {height}x{width}, "
        f"global batch {batch_size}, dtype {config.model.dtype}")
  print(f"devices       {mesh.devices.size} x {device.platform} ({device.device_kind}), "
        f"mode {config.train.parallel_mode}, jax {jax.__version__}")
  print(f"compile       {compile_seconds:.1f} s (first step included)")
  print(f"step time     {1000 * seconds / args.steps:.1f} ms  (mean of {args.steps} steps)")
  print(f"steps/s       {steps_per_second:.2f}")
  print(f"images/s      {steps_per_second * batch_size:.1f}")
  if flops is not None:
    print(f"FLOPs/step    {flops / 1e9:.2f} GFLOP (XLA cost analysis)")
    print(f"achieved      {flops * steps_per_second / 1e9:.1f} GFLOP/s")
  else:
    print("FLOPs/step    n/a (cost analysis is read from the shard_map program; use --mode shard_map)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
