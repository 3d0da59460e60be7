"""The data path at BraTS size: prepare time, cache size, training memory and the loader's speed.

Writes N synthetic cases of 240x240x155 voxels (the BraTS volume), prepares them into the cache,
then, for the full-size recipes, runs a short ``train`` on the first 20 and on all 80 cases and
prints its peak resident memory and time to the first step, and the loader's slices per second
beside the slices per second the full-size step consumes on this machine.

  python benchmarks/input_pipeline.py --out runs/bench_input          # everything (long on a CPU)
  python benchmarks/input_pipeline.py --out runs/bench_input --recipes segan

The 80-case data folder is written once (``--out``/data80) and reused; the 20-case one holds
links to its first 20 case folders, so both share one cache. Targets: peak RSS for 80 cases
within 15% of 20 cases, time to the first step independent of N, the loader at least 5x faster
than the step consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = ("240", "240", "155")


def _uagan(*argv):
  return [sys.executable, "-m", "uagan_jax", *map(str, argv)]


def _du(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _train(recipe: str, data: pathlib.Path, cache: pathlib.Path, workdir: pathlib.Path,
           steps: int, extra: list[str]) -> dict:
  """Runs a short full-size ``train``; its peak RSS (MB), time to the first step and step rate."""
  shutil.rmtree(workdir, ignore_errors=True)
  command = _uagan("train", "--config", ROOT / "configs" / f"{recipe}.py", "--data", data,
                   "--workdir", workdir, "--cache", cache, "--no-eval",
                   f"--config.train.steps={steps}", "--config.train.log_every=1",
                   "--config.train.validate_every=0", "--config.data.val_fraction=0.0",
                   "--config.train.checkpoint_every=100000", *extra)
  started = time.time()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  first_step = ready = None
  lines, step_times = [], []
  for line in process.stdout:
    lines.append(line)
    if re.search(r"\] step \d+/\d+ ", line):
      step_times.append(time.time())
    if ready is None and re.search(r"\] training \w+ on ", line):
      ready = time.time() - started  # data found, cache checked, slices indexed, state made
    if first_step is None and re.search(r"step 1/\d+", line):
      first_step = time.time() - started
  _, status, usage = os.wait4(process.pid, 0)
  if status != 0:
    sys.exit(f"{' '.join(map(str, command))} failed:\n{''.join(lines[-20:])}")
  batch = int(re.search(r"global batch (\d+)", "".join(lines)).group(1))
  # The steps after the first (which compiles): wall time between their log lines.
  per_step = (step_times[-1] - step_times[0]) / (len(step_times) - 1)
  slices = [line for line in lines if "training slices:" in line]
  return {"peak_rss_mb": usage.ru_maxrss / 1024, "first_step_s": first_step, "ready_s": ready,
          "step_img_per_s": batch / per_step, "step_s": per_step,
          "training_slices": slices[0].split("training slices: ")[1].split(" ")[0]
          if slices else None}


def _loader_rate(recipe: str, data: pathlib.Path, cache: pathlib.Path, steps: int,
                 extra: list[str]) -> float:
  """Slices per second the training input produces (threads, cache reads, normalisation)."""
  code = f"""
import time, pathlib
from uagan_jax import config as config_lib
from uagan_jax.data import input_pipeline
config = config_lib.load_config({str(ROOT / 'configs' / (recipe + '.py'))!r},
                                ["--config.train.steps={steps}", *{extra!r}])
data = input_pipeline.find_training_data(config, pathlib.Path({str(data)!r}))
train_input = input_pipeline.TrainInput(config, data, cache_dir=pathlib.Path({str(cache)!r}),
                                        log=lambda _: None)
started = time.time()
for step, batch in train_input.batches(0):
  pass
print((time.time() - started), config.train.batch_size)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  seconds, batch = out.stdout.split()
  return steps * int(batch) / float(seconds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for data and runs")
  parser.add_argument("--cases", type=int, nargs=2, default=(20, 80), metavar=("SMALL", "LARGE"))
  parser.add_argument("--recipes", nargs="*", default=("segan", "uagan"))
  parser.add_argument("--steps", type=int, default=3, help="training steps per run")
  parser.add_argument("--batch", action="append", default=[], metavar="RECIPE=N",
                      help="a smaller global batch for a recipe whose full-size step does not "
                           "fit this machine's time or memory (e.g. uagan=2); the slices and "
                           "networks stay full size")
  parser.add_argument("--reuse", action="store_true",
                      help="keep an existing cache instead of preparing it again")
  args = parser.parse_args()
  small, large = args.cases
  out = args.out.absolute()
  out.mkdir(parents=True, exist_ok=True)
  big = out / f"data{large}"
  if not (big / "README.txt").is_file() or len([p for p in big.iterdir() if p.is_dir()]) < large:
    print(f"writing {large} synthetic cases of {'x'.join(SHAPE)} into {big}", flush=True)
    subprocess.run(_uagan("synth", "--out", big, "--cases", large, "--seed", 0, "--shape", *SHAPE),
                   check=True)
  little = out / f"data{small}"
  shutil.rmtree(little, ignore_errors=True)
  little.mkdir()
  for folder in sorted(p for p in big.iterdir() if p.is_dir())[:small]:
    (little / folder.name).symlink_to(folder, target_is_directory=True)
  cache = out / "cache"
  if not args.reuse:
    shutil.rmtree(cache, ignore_errors=True)
  started = time.time()
  subprocess.run(_uagan("prepare", "--data", big, "--out", cache), check=True,
                 stdout=subprocess.DEVNULL)
  prepare_s = time.time() - started
  source_bytes = _du(big)
  cache_bytes = _du(cache / "cases")
  results = {"cases": large, "prepare_s_per_case": prepare_s / large,
             "workers": os.cpu_count(), "source_mb_per_case": source_bytes / large / 2**20,
             "cache_mb_per_case": cache_bytes / large / 2**20, "recipes": {}}
  print(f"prepare{' (reused: only checked)' if args.reuse else ''}: {prepare_s / large:.2f} s per case ({os.cpu_count()} workers, {large} cases); "
        f"cache {cache_bytes / large / 2**20:.1f} MB per case on disk (the .nii.gz sources: "
        f"{source_bytes / large / 2**20:.1f} MB)", flush=True)
  batches = dict(item.split("=") for item in args.batch)
  for recipe in args.recipes:
    extra = [f"--config.train.batch_size={batches[recipe]}"] if recipe in batches else []
    row = {"overrides": extra}
    for n, data in ((small, little), (large, big)):
      row[n] = _train(recipe, data, cache, out / f"train_{recipe}_{n}", args.steps, extra)
      print(f"{recipe} N={n}: peak RSS {row[n]['peak_rss_mb']:.0f} MB, ready to compile after "
            f"{row[n]['ready_s']:.1f} s, first step after {row[n]['first_step_s']:.1f} s, "
            f"{row[n]['training_slices']} training slices, "
            f"step {row[n]['step_s']:.1f} s: consumes {row[n]['step_img_per_s']:.2f} slices/s",
            flush=True)
    loader = _loader_rate(recipe, big, cache, steps=50, extra=extra)
    row["loader_slices_per_s"] = loader
    growth = row[large]["peak_rss_mb"] / row[small]["peak_rss_mb"] - 1
    consumed = row[large]["step_img_per_s"]
    print(f"{recipe}{' ' + ' '.join(extra) if extra else ''}: RSS N={large} vs N={small}: "
          f"{growth:+.1%} (target within 15%); loader "
          f"{loader:.0f} slices/s vs the step's {consumed:.2f} slices/s: "
          f"{loader / consumed:.0f}x (target >= 5x)", flush=True)
    results["recipes"][recipe] = row
  (out / "input_pipeline.json").write_text(json.dumps(results, indent=1))
  print(f"wrote {out / 'input_pipeline.json'}")


if __name__ == "__main__":
  main()
