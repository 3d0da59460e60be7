"""Wall time of ``uagan-jax predict`` on one volume, from the command line, start-up included.

For each family (segan and uagan by default) a ``configs/<family>.py:demo`` model is trained for
two steps on synthetic phantoms (the time of a prediction does not depend on how long the model
trained; an existing workdir under ``--root`` is reused), then ``uagan-jax predict --timing`` is
run as a fresh process on ``--input``: first with an empty compilation cache (cold), then
``--runs`` times with the cache that run filled (warm). Each run prints its wall time (from
starting the process to its exit), the phases the command reports (import, load model, read,
compile, segment, write; ``start-up`` is the rest: the interpreter and what runs before the
command's own clock starts) and the load average, since on a shared machine the minimum over runs
is the figure to quote. Beside the wall time, the process's CPU time (user + system, all its
threads): on a machine others load it moves far less than the wall time does. The SHA-256 of the written label file shows that every run wrote the same
bytes.

  python benchmarks/predict_time.py --input CASE_DIR/UPENN-GBM-00003_11_FLAIR.nii.gz
  python benchmarks/predict_time.py --input FLAIR.nii.gz --families segan --runs 5
  python benchmarks/predict_time.py --input FLAIR.nii.gz --no-timing   # a tree without --timing
  python benchmarks/predict_time.py --input FLAIR.nii.gz --no-tta   # one pass per slice

``predict`` mirrors each slice by default (test-time augmentation; its mirrored passes are the
phase ``tta``); ``--no-tta`` times the single pass, the ``predict`` of before TTA.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# "[12:00:00] timing: import 1.21 s, load model 0.83 s, ..., total 4.49 s"
_TIMING = re.compile(r"timing: (.*)$", re.MULTILINE)
_PART = re.compile(r"([a-z][a-z ]*?) ([0-9.]+) s")


def _command(*argv: str) -> list[str]:
  return [sys.executable, "-m", "uagan_jax", *argv]


def _environment(compilation_cache: pathlib.Path | None) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # JAX's own variable would override the one below
  if compilation_cache is not None:
    env["UAGAN_JAX_COMPILATION_CACHE"] = str(compilation_cache)
  return env


def _loadavg() -> str:
  try:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
  except OSError:
    return "?"


def ensure_workdir(root: pathlib.Path, family: str) -> pathlib.Path:
  """A ``configs/<family>.py:demo`` workdir trained for two steps (made once, then reused)."""
  workdir = root / family
  if (workdir / "checkpoints").is_dir():
    return workdir
  data = root / "data"
  if not data.is_dir():
    subprocess.run(_command("synth", "--out", str(data), "--cases", "6", "--seed", "0"),
                   check=True, env=_environment(None))
  print(f"training {family} (configs/{family}.py:demo, 2 steps) into {workdir}", flush=True)
  subprocess.run(_command("train", "--config", str(ROOT / "configs" / f"{family}.py:demo"),
                          "--data", str(data), "--workdir", str(workdir),
                          "--config.train.steps=2", "--no-eval"),
                 check=True, env=dict(_environment(None), UAGAN_JAX_CACHE=str(root / "cache")),
                 stdout=subprocess.DEVNULL)
  return workdir


def run_predict(workdir: pathlib.Path, image: pathlib.Path, output: pathlib.Path, *,
                modality: str, compilation_cache: pathlib.Path, timing: bool,
                extra: tuple[str, ...] = ()) -> dict:
  """One ``uagan-jax predict`` process: {"wall": s, phase: s, ..., "sha256": of the output}.
  ``extra``: more arguments for predict (e.g. ``--no-tta``)."""
  argv = _command("predict", "--workdir", str(workdir), "--input", str(image), "--modality",
                  modality, "--output", str(output), *(["--timing"] if timing else []), *extra)
  load = _loadavg()
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  started = time.perf_counter()
  done = subprocess.run(argv, env=_environment(compilation_cache), capture_output=True, text=True)
  wall = time.perf_counter() - started
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  if done.returncode != 0:
    raise SystemExit(f"predict failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
  result = {"wall": wall, "cpu": cpu, "load": load,
            "sha256": hashlib.sha256(output.read_bytes()).hexdigest()[:16]}
  found = _TIMING.search(done.stdout)
  if timing and found is None:
    raise SystemExit(f"no timing line in the output of {' '.join(argv)}:\n{done.stdout}")
  if found is not None:
    result.update({name: float(value) for name, value in _PART.findall(found.group(1))})
    result["start-up"] = wall - result["total"]
  return result


def _row(label: str, result: dict, phases: list[str]) -> str:
  cells = [f"{result[p]:6.2f}" if p in result else "     -" for p in phases]
  return (f"{label:<14} {result['wall']:6.2f} {result['cpu']:6.2f}  " + "  ".join(cells)
          + f"   load {result['load']}  {result['sha256']}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--input", required=True, type=pathlib.Path,
                      help="the image to segment (e.g. a 240x240x155 1 mm FLAIR)")
  parser.add_argument("--modality", default="flair")
  parser.add_argument("--families", nargs="+", default=["segan", "uagan"])
  parser.add_argument("--runs", type=int, default=3, help="warm runs after the cold one")
  parser.add_argument("--root", type=pathlib.Path,
                      default=pathlib.Path(tempfile.gettempdir()) / "uagan_jax_predict_time",
                      help="where the workdirs, phantoms and outputs are kept (reused)")
  parser.add_argument("--no-timing", action="store_true",
                      help="wall time only (for a tree whose predict has no --timing)")
  parser.add_argument("--no-tta", action="store_true",
                      help="pass --no-tta: one pass per slice, no test-time mirroring")
  args = parser.parse_args(argv)

  args.root.mkdir(parents=True, exist_ok=True)
  phases = ["start-up", "import", "load model", "read", "compile", "segment", "tta", "write"]
  print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; input {args.input}")
  for family in args.families:
    workdir = ensure_workdir(args.root, family)
    with tempfile.TemporaryDirectory(prefix="uagan_jax_xla_", dir=args.root) as cache:
      results = []
      print(f"\n{family}: wall s, CPU s, then the phases (wall s): {', '.join(phases)}",
            flush=True)
      for run in range(args.runs + 1):
        result = run_predict(workdir, args.input, args.root / f"{family}_seg.nii.gz",
                             modality=args.modality, compilation_cache=pathlib.Path(cache),
                             timing=not args.no_timing,
                             extra=("--no-tta",) if args.no_tta else ())
        results.append(result)
        print(_row("cold cache" if run == 0 else f"warm {run}", result, phases), flush=True)
    warm = results[1:]
    if warm:
      best = {key: min(r[key] for r in warm) for key in warm[0] if key not in ("load", "sha256")}
      print(_row("warm min", dict(best, load="-", sha256="-"), phases))
      print(f"warm median wall {statistics.median(r['wall'] for r in warm):.2f} s; "
            f"outputs identical: {len({r['sha256'] for r in results}) == 1}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
