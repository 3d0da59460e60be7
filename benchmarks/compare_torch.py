"""The project's compiled train step side by side with a PyTorch step of the same networks.

For each family and size, the JAX step (benchmarks/step.py's `compile_step`, one device) and its
PyTorch twin (benchmarks/torch_twins.py: the same networks, losses and Adam) run alternately in
pairs of timed runs, the order flipping every pair; each pair gives a ratio JAX speed / PyTorch
speed (>1: JAX is faster) and the table reports the median ratio, which stays fair when other
jobs load the machine, beside each side's median steps/s. Every thread setting runs in its own
subprocess, because XLA reads its thread flags when jax is imported: "N threads" gives both
frameworks the same N threads (XLA's Eigen pool, torch.set_num_threads) and pins the process to
N cores; "1 thread" runs XLA single-threaded (--xla_cpu_multi_thread_eigen=false) and
torch.set_num_threads(1) on one pinned core. Augmentation is off on both sides.

With ``--breakdown`` each side is then profiled over ``steps`` more steps and its time split in
two: the convolutions (every forward, gradient and transposed conv: XLA's executed convolution
thunks, classified as in benchmarks/profile_step.py; PyTorch's self CPU time of its convolution
ops under torch.profiler) and everything else. "ratio bound" is PyTorch's timed step (the median
of the pairs) over the JAX step's convolution time alone: the ratio JAX would reach if everything
but its convolutions took no time, i.e. how far XLA:CPU's convolution kernels can take the step;
"GFLOP/s bound" likewise is the step's FLOPs over its convolution time. One-thread runs only:
with more threads both profilers record operations that overlap in time (XLA runs independent
thunks concurrently, PyTorch's ops fan out to its pool), so their times do not add up to a step.

The roofline is measured in the same process: a large matmul and a large 3x3 conv in both
frameworks, best GFLOP/s of several runs. A step's achieved GFLOP/s is XLA's cost-analysis FLOPs
of the compiled step over its time (the same count for the PyTorch twin, which does the same
arithmetic), and its fraction of the measured JAX conv roofline.

Needs the optional extra (the CPU build of PyTorch):
  pip install -e '.[torch]'
  python benchmarks/compare_torch.py --families segan,stargan --sizes demo --pairs 5
  python benchmarks/compare_torch.py --threads 1 --families uagan --sizes demo,full
  python benchmarks/compare_torch.py --threads 1 --families stargan --sizes demo \
      --override model.strided_conv=im2col
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

FAMILIES = ("unet", "segan", "stargan", "uagan")
_RESULT = "RESULT "


def thread_env(threads: int) -> dict[str, str]:
  """The environment of a worker that runs everything on ``threads`` threads."""
  env = dict(os.environ)
  env.pop("JAX_NUM_CPU_DEVICES", None)  # one device: the step's own threads do the work
  env["JAX_PLATFORMS"] = "cpu"
  if threads == 1:
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  else:
    env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
  env["OMP_NUM_THREADS"] = str(threads)
  env["MKL_NUM_THREADS"] = str(threads)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                  env.get("PYTHONPATH")) if p)
  return env


def load() -> str:
  """The 1-minute load average (/proc/loadavg), the machine's load beside every figure."""
  try:
    with open("/proc/loadavg", encoding="ascii") as f:
      return f.read().split()[0]
  except OSError:
    return "n/a"


# ------------------------------------------------------------------------------------------------
# The worker: one thread setting, in its own process
# ------------------------------------------------------------------------------------------------


def roofline(repeats: int = 5) -> dict[str, float]:
  """GFLOP/s of a 2048^3 matmul and a 3x3 conv (16 x 96 x 96, 64 -> 64 channels), best of
  ``repeats``, in JAX (NHWC, as the models) and PyTorch (NCHW)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch.nn.functional as F
  # pylint: enable=g-import-not-at-top
  n, (b, h, w, c) = 2048, (16, 96, 96, 64)
  matmul_flops, conv_flops = 2.0 * n ** 3, 2.0 * b * h * w * c * c * 9
  rng = np.random.default_rng(0)
  a = rng.normal(size=(n, n)).astype(np.float32)
  x = rng.normal(size=(b, h, w, c)).astype(np.float32)
  k = rng.normal(size=(3, 3, c, c)).astype(np.float32)

  def best(fn) -> float:
    fn()
    times = []
    for _ in range(repeats):
      started = time.perf_counter()
      fn()
      times.append(time.perf_counter() - started)
    return min(times)

  ja, jx, jk = jnp.asarray(a), jnp.asarray(x), jnp.asarray(k)
  jmatmul = jax.jit(lambda m: m @ m)
  jconv = jax.jit(lambda v, f: jax.lax.conv_general_dilated(
      v, f, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  ta, tx = torch.from_numpy(a), torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
  with torch.no_grad():
    return {
        "jax_matmul": matmul_flops / best(lambda: jmatmul(ja).block_until_ready()) / 1e9,
        "torch_matmul": matmul_flops / best(lambda: ta @ ta) / 1e9,
        "jax_conv": conv_flops / best(lambda: jconv(jx, jk).block_until_ready()) / 1e9,
        "torch_conv": conv_flops / best(lambda: F.conv2d(tx, tk, padding=1)) / 1e9,
    }


def is_torch_convolution(op_name: str) -> bool:
  """Whether a torch.profiler op (``aten::mkldnn_convolution``, ``aten::convolution_backward``,
  ``aten::conv_transpose2d``...) is a convolution's forward or backward."""
  return op_name.startswith("aten::") and "conv" in op_name


def torch_breakdown(twin, batch, steps: int) -> dict:
  """Milliseconds per twin step: all ops' self CPU time, and that of its convolutions."""
  from torch import profiler  # pylint: disable=g-import-not-at-top
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as trace:
    for _ in range(steps):
      twin.step(batch)
  total = convolutions = 0.0
  for event in trace.key_averages():
    total += event.self_cpu_time_total
    if is_torch_convolution(event.key):
      convolutions += event.self_cpu_time_total
  return {"step_ms": total / 1e3 / steps, "conv_ms": convolutions / 1e3 / steps}


def jax_breakdown(compiled, state, steps: int) -> tuple[dict, object]:
  """Milliseconds per JAX step: all executed XLA thunks, and its convolutions; and the state
  after (the step donates its input)."""
  import profile_step  # pylint: disable=g-import-not-at-top
  seconds, _, state = profile_step.profile(compiled, steps, state=state)
  instructions, computations = profile_step.parse_hlo(compiled.run.as_text())
  convolutions = sum(value for name, value in seconds.items() if profile_step.is_convolution(
      profile_step.categorise(name, instructions, computations)[0]))
  return {"step_ms": 1e3 * sum(seconds.values()), "conv_ms": 1e3 * convolutions}, state


def compare(family: str, size: str, *, pairs: int, steps: int, warmup: int,
            overrides: Sequence[str] = (), breakdown: bool = False) -> dict:
  """The JAX step and its PyTorch twin, ``pairs`` alternating pairs of ``steps`` timed steps;
  ``overrides`` (``"KEY=VALUE"``) change the config (the twin follows its sizes and ignores
  JAX-only keys such as ``model.strided_conv``); ``breakdown`` adds each
  side's convolution time (profiled after the timed pairs)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import torch
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import step as step_bench
  import torch_twins
  from uagan_jax import config as config_lib
  # pylint: enable=g-import-not-at-top
  recipe = f"configs/{family}.py" + (":demo" if size == "demo" else "")
  config = config_lib.load_config(recipe, ["--config.train.num_devices=1",
                                           "--config.data.augment=false",
                                           *(f"--config.{item}" for item in overrides)])
  compiled = step_bench.compile_step(config)
  jax_state = {"state": compiled.state}

  def run_jax(count: int) -> float:
    jax_state["state"], seconds = step_bench.run_steps(compiled, jax_state["state"], count)
    return seconds

  twin = torch_twins.TorchStep(config)
  batch = torch_twins.torch_batch(step_bench.random_batch(config))

  def run_torch(count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
      twin.step(batch)
    return time.perf_counter() - started

  started = time.perf_counter()
  run_torch(1)
  torch_first = time.perf_counter() - started
  run_jax(warmup)
  run_torch(warmup)
  jax_speeds, torch_speeds, ratios, loads = [], [], [], []
  for pair in range(pairs):
    if pair % 2 == 0:
      jax_seconds, torch_seconds = run_jax(steps), run_torch(steps)
    else:
      torch_seconds, jax_seconds = run_torch(steps), run_jax(steps)
    jax_speeds.append(steps / jax_seconds)
    torch_speeds.append(steps / torch_seconds)
    ratios.append(torch_seconds / jax_seconds)
    loads.append(float(load()) if load() != "n/a" else float("nan"))
  jax_sps = statistics.median(jax_speeds)
  times = {}
  if breakdown:
    times["jax"], jax_state["state"] = jax_breakdown(compiled, jax_state["state"], steps)
    times["torch"] = torch_breakdown(twin, batch, steps)
  return {"breakdown": times, "family": family, "size": size, "recipe": recipe,
          "image_size": list(config.data.image_size), "batch": config.train.batch_size,
          "jax_steps_per_s": jax_sps, "torch_steps_per_s": statistics.median(torch_speeds),
          "ratio": statistics.median(ratios), "ratios": ratios,
          "flops": compiled.flops, "jax_compile_s": compiled.compile_seconds,
          "torch_first_step_s": torch_first,
          "load": f"{min(loads):.2f}-{max(loads):.2f}"}


def worker(args) -> int:
  """Runs one thread setting and prints one RESULT line of JSON per measurement."""
  threads = args.threads_one
  cores = sorted(os.sched_getaffinity(0))
  if threads <= len(cores):
    os.sched_setaffinity(0, cores[:threads])
  # pylint: disable=g-import-not-at-top
  import torch
  # pylint: enable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)
  if args.roofline:
    print(_RESULT + json.dumps({"roofline": roofline(), "threads": threads, "load": load()}),
          flush=True)
  for size in args.sizes.split(","):
    for family in args.families.split(","):
      result = compare(family, size, pairs=args.pairs, steps=args.steps, warmup=args.warmup,
                       overrides=args.override, breakdown=args.breakdown and threads == 1)
      result["overrides"] = list(args.override)
      result["threads"] = threads
      print(_RESULT + json.dumps(result), flush=True)
  return 0


# ------------------------------------------------------------------------------------------------
# The parent: one worker per thread setting, then the table
# ------------------------------------------------------------------------------------------------


def format_table(results: list[dict], rooflines: dict[int, dict]) -> str:
  """The Markdown table of every measurement, with its thread setting and load."""
  lines = ["| step | threads | JAX steps/s | PyTorch steps/s | ratio JAX/PyTorch (median of "
           "pairs) | JAX GFLOP/s | of JAX conv roofline | PyTorch GFLOP/s | of PyTorch conv "
           "roofline | load (1 min) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    flops = r["flops"] or float("nan")
    gflops = flops * r["jax_steps_per_s"] / 1e9
    torch_gflops = flops * r["torch_steps_per_s"] / 1e9  # the same arithmetic, XLA's count
    roof = rooflines.get(r["threads"], {})
    fraction = f"{100 * gflops / roof['jax_conv']:.0f}%" if roof else "n/a"
    torch_fraction = f"{100 * torch_gflops / roof['torch_conv']:.0f}%" if roof else "n/a"
    height, width = r["image_size"]
    overrides = "".join(f", {item}" for item in r.get("overrides", ()))
    lines.append(
        f"| {r['family']} `{r['size']}` ({height}x{width}, batch {r['batch']}{overrides}) "
        f"| {r['threads']} "
        f"| {r['jax_steps_per_s']:.2f} | {r['torch_steps_per_s']:.2f} | {r['ratio']:.2f} "
        f"| {gflops:.1f} | {fraction} | {torch_gflops:.1f} | {torch_fraction} | {r['load']} |")
  for threads, roof in sorted(rooflines.items()):
    lines.append(
        f"| matmul 2048^3 / conv 3x3 16x96x96x64->64 (roofline, GFLOP/s) | {threads} "
        f"| {roof['jax_matmul']:.0f} / {roof['jax_conv']:.0f} "
        f"| {roof['torch_matmul']:.0f} / {roof['torch_conv']:.0f} "
        f"| {roof['jax_matmul'] / roof['torch_matmul']:.2f} / "
        f"{roof['jax_conv'] / roof['torch_conv']:.2f} | | | | | {roof['load']} |")
  return "\n".join(lines)


def format_breakdown(results: list[dict]) -> str:
  """The Markdown table of the steps' convolution time, for results measured with breakdown."""
  lines = ["| step | threads | JAX ms/step: convs / rest | PyTorch ms/step: convs / rest "
           "| convs JAX/PyTorch time | ratio bound (PyTorch's timed step / JAX convs) "
           "| GFLOP/s bound (step FLOPs / JAX convs) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    if not r.get("breakdown"):
      continue  # a multi-threaded run (see the docstring)
    jax_times, torch_times = r["breakdown"]["jax"], r["breakdown"]["torch"]
    lines.append(
        f"| {r['family']} `{r['size']}` | {r['threads']} "
        f"| {jax_times['conv_ms']:.0f} / {jax_times['step_ms'] - jax_times['conv_ms']:.0f} "
        f"| {torch_times['conv_ms']:.0f} / {torch_times['step_ms'] - torch_times['conv_ms']:.0f} "
        f"| {jax_times['conv_ms'] / torch_times['conv_ms']:.2f} "
        f"| {1e3 / r['torch_steps_per_s'] / jax_times['conv_ms']:.2f} "
        f"| {(r['flops'] or float('nan')) / jax_times['conv_ms'] / 1e6:.1f} |")
  return "\n".join(lines)


def save_json(path: str, results: list[dict], rooflines: dict[int, dict]) -> None:
  """Every result and roofline so far to ``path`` (replaced whole, through a temporary file)."""
  temporary = f"{path}.tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump({"results": results, "rooflines": {str(k): v for k, v in rooflines.items()}}, f,
              indent=1)
  os.replace(temporary, path)


def worker_command(args, threads: int) -> list[str]:
  """The command line of the worker that measures one thread setting."""
  command = [sys.executable, os.path.abspath(__file__), "--worker", f"--threads-one={threads}",
             f"--families={args.families}", f"--sizes={args.sizes}", f"--pairs={args.pairs}",
             f"--steps={args.steps}", f"--warmup={args.warmup}",
             *(f"--override={item}" for item in args.override)]
  if not args.roofline:
    command.append("--no-roofline")
  if args.breakdown:
    command.append("--breakdown")
  return command


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--sizes", default="demo,full", help="demo (configs/X.py:demo), full")
  parser.add_argument("--pairs", type=int, default=5, help="alternating timed pairs")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
  parser.add_argument("--threads", default=f"{len(os.sched_getaffinity(0))},1",
                      help="thread settings, each in its own process (default: cores, then 1)")
  parser.add_argument("--no-roofline", dest="roofline", action="store_false")
  parser.add_argument("--breakdown", action="store_true",
                      help="also profile each side: its convolutions' time against the rest "
                           "(one-thread runs)")
  parser.add_argument("--json", default="", help="also write every result to this file")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override, e.g. model.strided_conv=im2col (repeatable; "
                           "the PyTorch twin takes the sizes, e.g. train.batch_size, and ignores "
                           "the JAX-only keys)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--threads-one", type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for family in args.families.split(","):
    if family not in FAMILIES:
      parser.error(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
  for size in args.sizes.split(","):
    if size not in ("demo", "full"):
      parser.error(f"unknown size {size!r} (known: demo, full)")
  for item in args.override:
    if "=" not in item or item.startswith("-"):
      parser.error(f"--override {item!r}: expected KEY=VALUE, e.g. model.strided_conv=im2col")
  if args.worker:
    return worker(args)

  results, rooflines = [], {}
  for threads in (int(t) for t in args.threads.split(",")):
    print(f"# {threads} thread(s): XLA_FLAGS={thread_env(threads)['XLA_FLAGS']!r}, "
          f"torch.set_num_threads({threads}), pinned to {threads} core(s)", flush=True)
    command = worker_command(args, threads)
    with subprocess.Popen(command, env=thread_env(threads), stdout=subprocess.PIPE,
                          text=True) as process:
      for line in process.stdout:
        if not line.startswith(_RESULT):
          continue
        result = json.loads(line[len(_RESULT):])
        if "roofline" in result:
          rooflines[threads] = {**result["roofline"], "load": result["load"]}
          print(f"  roofline: {json.dumps(rooflines[threads])}", flush=True)
        else:
          results.append(result)
          print(f"  {result['family']} {result['size']}: JAX {result['jax_steps_per_s']:.2f} "
                f"steps/s, PyTorch {result['torch_steps_per_s']:.2f} steps/s, ratio "
                f"{result['ratio']:.2f} (pairs {', '.join(f'{x:.2f}' for x in result['ratios'])}"
                f"), load {result['load']}", flush=True)
        if args.json:  # after every measurement: a full-size run stopped midway keeps its rows
          save_json(args.json, results, rooflines)
    if process.returncode:
      print(f"error: the {threads}-thread worker failed (exit {process.returncode})",
            file=sys.stderr)
      return 1
  print()
  print(format_table(results, rooflines))
  if args.breakdown:
    print()
    print(format_breakdown(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
