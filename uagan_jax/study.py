"""``uagan-jax study``: train and score every arm x seed of a study file, then compare the arms.

A study file is a Python file like the recipes (configs/*.py): a docstring with the command
and a ``get_config(arg)`` returning an `ml_collections.ConfigDict` (or a dict) with the keys

  data         the training data folder (relative paths: to the current folder, as ``train``'s)
  external     external test sets: folders scored whole, as ``evaluate --data DIR`` (default ())
  seeds        the seeds every arm trains with (``config.seed``: init, split, sampling)
  arms         {name: {"recipe": "configs/x.py[:variant]", "overrides": ("--config.a=b", ...),
                       "per_modality": False}}; per_modality=True makes the arm one model per
               modality of the recipe's data.modalities (each trained and scored on its own
               modality, ``--config.data.modalities=('m',)``), combined into one arm
  comparisons  ((A, B), ...): arm A against arm B, paired per case and seed
  overrides    ``--config.a=b`` items for every arm, before the arm's own (default ())
  metrics      the metrics of `uagan_jax.evaluate` to report (default ("dice", "hd95"))
  bootstrap    {"resamples": 10000, "level": 0.95, "seed": 0} (any of them)

For example::

  def get_config(arg=""):
    s = ml_collections.ConfigDict()
    s.data = "data_synth"
    s.external = ("data_shifted",)
    s.seeds = (0, 1, 2)
    s.arms = {"unet": {"recipe": "configs/unet.py:demo"},
              "segan": {"recipe": "configs/segan.py:demo"}}
    s.comparisons = (("segan", "unet"),)
    return s

Each arm x seed (x modality) is an ordinary training workdir, ``OUT/runs/<arm>/seed<k>``
(``OUT/runs/<arm>/<modality>/seed<k>``), trained in this process by
`train.train_and_evaluate`: a run whose final checkpoint is there (its step is the config's
train.steps) is not trained again, only scored; a run that fails (diverged, bad data, any
error) is recorded and the others go on; so is a workdir whose config.json is not the study's
(the study file edited since: other keys than eval.* and train.steps, more steps resuming the
run). Every finished run is then segmented and scored as ``uagan-jax evaluate`` scores it
(`evaluate.evaluate_split`; translation is not scored): its held-out test split (test set "test")
and each external folder (test set = the folder's name). The statistics (`uagan_jax.stats`) go to
``OUT/study.json``, ``OUT/study.md`` and ``OUT/study.png``.

Cases per seed: the held-out split is drawn by ``config.seed``, so each seed scores other
held-out cases (the "nested" design); every seed scores the same external cases ("crossed").
`uagan_jax.stats` explains the bootstrap of each. The pooled modality "all" is, per case and
seed, the mean over the modalities the arm segments from (over those both arms segment from, in
a comparison); a Wilcoxon test's units are the cases, each case's difference averaged over the
seeds that scored it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from uagan_jax import config as config_lib
from uagan_jax import stats
from uagan_jax.errors import UserError

STUDY_KEYS = ("data", "external", "seeds", "arms", "comparisons", "overrides", "metrics",
              "bootstrap")
ARM_KEYS = ("recipe", "overrides", "per_modality")
BOOTSTRAP_DEFAULTS = {"resamples": 10_000, "level": 0.95, "seed": 0}
DEFAULT_METRICS = ("dice", "hd95")
HELD_OUT = "test"  # the name of the held-out test set (the runs' test split)
POOLED = "all"  # the modality entry of the mean over modalities
# Higher is better for these metrics (the others are distances or volumes).
_HIGHER_IS_BETTER = ("dice", "sensitivity", "specificity", "lesion_dice")
# What a study file's ``:smoke`` variant changes (`smoke`).
SMOKE_OVERRIDES = ("--config.train.steps=2", "--config.train.validate_every=0",
                   "--config.eval.max_cases=2")
# The overrides that turn on the full recipes' augmentation in a ``:study`` arm (study files'
# ``_on`` arms).
FULL_AUGMENTATION_OVERRIDES = tuple(f"--config.data.augmentations.{key}={value!r}"
                                    for key, value in config_lib.FULL_RECIPE_AUGMENTATIONS.items())
# S's and C's peak rate of the CPU budgets before 2026-12-08 (the recipes' is 3e-4 since).
PEAK_RATE_1E3_OVERRIDES = ("--config.optim.segmentor_lr=0.001", "--config.optim.critic_lr=0.001")
# The ``:study`` budget the first studies trained at: 400 steps, the rate decaying from step 100,
# S's and C's peak rate 1e-3 (the recipes' is 1,200 steps from 300, at 3e-4). The study files
# whose tables docs/EXPERIMENTS.md gives at that budget name it, so that their commands still
# train those runs bit for bit.
FIRST_BUDGET_OVERRIDES = ("--config.train.steps=400", "--config.optim.decay_start=100",
                          "--config.optim.decay_end=400", "--config.train.checkpoint_every=400",
                          ) + PEAK_RATE_1E3_OVERRIDES
_STEP_LINE = re.compile(r"^step (\d+)/(\d+)\b")


def smoke(study_config) -> None:
  """Makes a study file's config its ``:smoke`` variant, in place: every arm for 2 steps with one
  seed, two test cases and no external set; a check that the study runs end to end, not a result."""
  study_config.seeds = (0,)
  study_config.external = ()
  study_config.overrides = SMOKE_OVERRIDES


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: a recipe with overrides; ``per_modality``: one model per modality."""
  name: str
  recipe: str
  overrides: tuple[str, ...]
  per_modality: bool
  modalities: tuple[str, ...]  # what the arm segments from (the recipe's data.modalities)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of an arm: a seed (and, for a per-modality arm, a modality)."""
  arm: str
  seed: int
  modality: str | None
  workdir: pathlib.Path
  config: object  # the locked ml_collections.ConfigDict
  recipe: str
  overrides: tuple[str, ...]  # everything applied to the recipe, the seed's included

  @property
  def label(self) -> str:
    return f"{self.arm}{'/' + self.modality if self.modality else ''} seed {self.seed}"


@dataclasses.dataclass(frozen=True)
class Study:
  """A loaded, checked study file."""
  path: pathlib.Path
  spec: str
  data: pathlib.Path
  external: tuple[pathlib.Path, ...]
  seeds: tuple[int, ...]
  arms: dict[str, Arm]
  comparisons: tuple[tuple[str, str], ...]
  metrics: tuple[str, ...]
  resamples: int
  level: float
  bootstrap_seed: int
  configs: dict  # {(arm, seed, modality): (config, overrides)}

  def test_sets(self) -> dict[str, pathlib.Path]:
    """{test set name: data folder}: the held-out split, then the external folders."""
    return {HELD_OUT: self.data, **{folder.name: folder for folder in self.external}}


# ------------------------------------------------------------------------------------------------
# The study file
# ------------------------------------------------------------------------------------------------


def load_study(spec: str, *, overrides: Sequence[str] = (), data: pathlib.Path | None = None,
               external: Sequence[pathlib.Path] = ()) -> Study:
  """Reads and checks ``STUDY.py[:arg]``, and loads every run's config.

  Args:
    spec: the study file, optionally with ``:arg`` for its ``get_config``.
    overrides: ``--config.a=b`` items for every arm (after the study's own).
    data: replaces the study's data folder.
    external: more external test sets, after the study's.

  Raises:
    UserError: one line naming the study file and the problem (a missing file, an unknown key,
      an arm a comparison names that is not there, a recipe that does not load, ...).
  """
  from uagan_jax import evaluate, families  # pylint: disable=g-import-not-at-top
  path_text, _, arg = spec.partition(":")
  path = pathlib.Path(path_text)
  raw = _read_study_file(path, arg)

  def fail(problem: str):
    raise UserError(f"{path}: {problem}")

  unknown = [key for key in raw if key not in STUDY_KEYS]
  if unknown:
    fail(f"unknown key '{unknown[0]}' (known: {', '.join(STUDY_KEYS)})")
  for key in ("seeds", "arms"):
    if key not in raw:
      fail(f"no '{key}'")
  seeds = _tuple(raw["seeds"])
  if (not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
      or len(set(seeds)) != len(seeds)):
    fail(f"seeds {raw['seeds']!r}: give one or more distinct non-negative integers")
  metrics = _tuple(raw.get("metrics", DEFAULT_METRICS))
  bad = [m for m in metrics if m not in evaluate.SEGMENTATION_METRICS]
  if not metrics or bad:
    fail(f"metrics: unknown metric {bad[0] if bad else '(none given)'!r} (known: "
         f"{', '.join(evaluate.SEGMENTATION_METRICS)})")
  bootstrap = dict(raw.get("bootstrap", {}))
  unknown = [key for key in bootstrap if key not in BOOTSTRAP_DEFAULTS]
  if unknown:
    fail(f"unknown key 'bootstrap.{unknown[0]}' (known: {', '.join(BOOTSTRAP_DEFAULTS)})")
  bootstrap = {**BOOTSTRAP_DEFAULTS, **bootstrap}
  if not (isinstance(bootstrap["resamples"], int) and bootstrap["resamples"] >= 1
          and 0 < bootstrap["level"] < 1):
    fail(f"bootstrap {bootstrap}: resamples must be a positive integer, level in (0, 1)")
  # Applied in this order, a later one winning: the study's for every arm, the arm's own, the
  # command line's (for every arm), then the run's seed (and modality).
  common = tuple(str(o) for o in _tuple(raw.get("overrides", ())))

  arms_raw = raw["arms"]
  if not isinstance(arms_raw, dict) or not arms_raw:
    fail("arms: give {name: {'recipe': 'configs/x.py[:variant]', ...}, ...}")
  arms, configs = {}, {}
  for name, arm in arms_raw.items():
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or name in (".", ".."):
      fail(f"arm '{name}': use letters, digits, '_', '-' or '.' (it names a folder)")
    if not isinstance(arm, dict):
      fail(f"arm '{name}': give a dict with a 'recipe'")
    unknown = [key for key in arm if key not in ARM_KEYS]
    if unknown:
      fail(f"unknown key 'arms.{name}.{unknown[0]}' (known: {', '.join(ARM_KEYS)})")
    if not isinstance(arm.get("recipe"), str) or not arm["recipe"]:
      fail(f"arm '{name}': no 'recipe' (a configs/*.py file, optionally with :variant)")
    arm_overrides = (common + tuple(str(o) for o in _tuple(arm.get("overrides", ())))
                     + tuple(overrides))
    per_modality = bool(arm.get("per_modality", False))
    base = _arm_config(path, name, arm["recipe"], arm_overrides)
    family = families.get(base.model.name)
    if not family.segments:
      fail(f"arm '{name}': {base.model.name} does not segment; a study scores segmentation")
    modalities = tuple(base.data.modalities)
    arms[name] = Arm(name, arm["recipe"], arm_overrides, per_modality, modalities)
    for seed in seeds:
      for modality in (modalities if per_modality else (None,)):
        extra = [f"--config.seed={seed}"]
        if modality is not None:
          extra.append(f"--config.data.modalities=('{modality}',)")
        configs[(name, seed, modality)] = (
            _arm_config(path, name, arm["recipe"], arm_overrides + tuple(extra)),
            arm_overrides + tuple(extra))

  comparisons = []
  for pair in _tuple(raw.get("comparisons", ())):
    pair = _tuple(pair)
    if len(pair) != 2 or not all(isinstance(a, str) for a in pair):
      fail(f"comparisons: {pair!r} is not a pair of arm names (A, B)")
    for arm in pair:
      if arm not in arms:
        fail(f"comparison {pair[0]} vs {pair[1]}: no arm '{arm}' (arms: {', '.join(arms)})")
    if pair[0] == pair[1]:
      fail(f"comparison {pair[0]} vs {pair[1]}: an arm against itself")
    comparisons.append((pair[0], pair[1]))

  if data is None:
    if not raw.get("data"):
      fail("no 'data' (the training data folder; or give --data)")
    data = pathlib.Path(str(raw["data"]))
  folders = [pathlib.Path(str(f)) for f in _tuple(raw.get("external", ()))] + list(external)
  for folder in [pathlib.Path(data), *folders]:
    if not folder.is_dir():
      fail(f"data folder {folder}: not found")
  names = [HELD_OUT] + [f.name for f in folders]
  if len(set(names)) != len(names):
    fail(f"test sets {', '.join(names)}: two have the same name (a test set is named by its "
         f"folder; '{HELD_OUT}' is the held-out split's)")
  return Study(path=path, spec=spec, data=pathlib.Path(data), external=tuple(folders),
               seeds=tuple(seeds), arms=arms, comparisons=tuple(comparisons),
               metrics=tuple(metrics), resamples=int(bootstrap["resamples"]),
               level=float(bootstrap["level"]), bootstrap_seed=int(bootstrap["seed"]),
               configs=configs)


def _read_study_file(path: pathlib.Path, arg: str) -> dict:
  """``get_config(arg)`` of the study file, as a plain dict."""
  raw = config_lib.call_get_config(path, arg, kind="study")
  if hasattr(raw, "to_dict"):
    raw = raw.to_dict()
  if not isinstance(raw, dict):
    raise UserError(f"{path}: get_config() returned {type(raw).__name__}, not a ConfigDict")
  return raw


def _tuple(value) -> tuple:
  if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
    return (value,)
  return tuple(value)


def _arm_config(path: pathlib.Path, name: str, recipe: str, overrides: Sequence[str]):
  try:
    return config_lib.load_config(recipe, list(overrides))
  except UserError as e:
    raise UserError(f"{path}: arm '{name}': {e}") from None


def plan(study: Study, *, out: pathlib.Path) -> list[Run]:
  """Every run of the study, seed by seed (so a stopped study has whole seeds to compare)."""
  runs = []
  for seed in study.seeds:
    for arm in study.arms.values():
      for modality in (arm.modalities if arm.per_modality else (None,)):
        workdir = pathlib.Path(out) / "runs" / arm.name
        if modality is not None:
          workdir = workdir / modality
        config, overrides = study.configs[(arm.name, seed, modality)]
        runs.append(Run(arm.name, seed, modality, workdir / f"seed{seed}", config, arm.recipe,
                        overrides))
  return runs


def checkpoint_step(workdir: pathlib.Path) -> int | None:
  """The newest checkpoint's step in ``workdir/checkpoints`` (a folder named by its step: a
  save in progress has another name until it is complete), or None."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
  return max(steps) if steps else None


# Keys a finished workdir's config.json may differ in from the study's: how it is scored, and
# train.steps (more steps resume the run from its checkpoint, as ``train`` does).
_CHANGEABLE = ("eval", "train.steps")


def _config_difference(run: Run) -> str | None:
  """The first key (outside `_CHANGEABLE`) where the workdir's config.json differs from the
  run's config, or None: a study file edited since must not score a model of the old config."""
  path = run.workdir / "config.json"
  if not path.is_file():
    return None
  try:
    written = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return "config.json (unreadable)"
  planned = json.loads(config_lib.to_json(run.config))
  for key in _CHANGEABLE:
    written, planned = _without(written, key), _without(planned, key)
  return _first_difference(written, planned)


def _without(tree: dict, dotted: str) -> dict:
  """``tree`` without the key ``a.b.c`` (a copy)."""
  head, _, rest = dotted.partition(".")
  tree = dict(tree)
  if not rest:
    tree.pop(head, None)
  elif isinstance(tree.get(head), dict):
    tree[head] = _without(tree[head], rest)
  return tree


def _first_difference(a, b, prefix: str = "") -> str | None:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
      if found:
        return found
    return None
  return None if a == b else prefix.rstrip(".")


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


class _Stopped(BaseException):
  """SIGTERM outside a training loop (the loop itself stops at a checkpoint: Interrupted).

  A BaseException, as KeyboardInterrupt is: a run's ``except Exception`` (recording a failed run)
  must not take it for a failure of that run."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_stopped(signum, frame):
  del frame
  raise _Stopped(signum)


def _format_duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


class _Progress:
  """Done/total runs and an ETA over the whole study, from the training steps left and the
  step rate measured so far (scoring is not in it)."""

  def __init__(self, runs: Sequence[Run]):
    self.left = {run.workdir: run.config.train.steps - (checkpoint_step(run.workdir) or 0)
                 for run in runs}
    self.total = len(runs)
    self.done = 0
    self.steps = 0
    self.seconds = 0.0
    self._window = None  # (time, step) of the last step line of the run in training

  def start(self, run: Run):
    self._window = None

  def step_line(self, run: Run, step: int) -> str:
    now = time.time()
    if self._window is not None:
      self.seconds += now - self._window[0]
      self.steps += step - self._window[1]
    self._window = (now, step)
    self.left[run.workdir] = run.config.train.steps - step
    return self.text()

  def finish(self, run: Run):
    self.left[run.workdir] = 0
    self.done += 1
    self._window = None

  def text(self) -> str:
    left = sum(max(0, steps) for steps in self.left.values())
    eta = (f"ETA {_format_duration(left * self.seconds / self.steps)}" if self.steps
           else "ETA after the first steps" if left else "ETA 0 s")
    return f"study: {self.done}/{self.total} runs done, {eta}"


def run_study(study: Study, *, out: pathlib.Path,
              log: Callable[[str], None] = print) -> int:
  """Trains (or resumes) and scores every run, then writes study.json, study.md, study.png.

  Returns:
    The exit code: 0 every run finished and was scored; 1 some failed (recorded in study.json,
    the others scored and compared); 128 + the signal (143 SIGTERM, 130 SIGINT) when a signal
    stopped the study (one line on stderr; finished runs and the checkpoint kept: run the same
    command to resume).
  """
  # pylint: disable=g-import-not-at-top
  from uagan_jax import train
  from uagan_jax.train_utils import Interrupted
  # pylint: enable=g-import-not-at-top
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  runs = plan(study, out=out)
  progress = _Progress(runs)
  log(f"study {study.spec}: {len(study.arms)} arms x {len(study.seeds)} seeds = {len(runs)} runs "
      f"into {out / 'runs'}; test sets: {', '.join(study.test_sets())}")
  records, rows = [], []
  previous = None
  if threading.current_thread() is threading.main_thread():
    # SIGTERM stops the study with one line wherever it is; inside a training loop the loop's
    # own handler (train_utils.StopRequested) takes over, checkpoints and raises Interrupted.
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
  current = None
  try:
    for number, run in enumerate(runs, 1):
      current = f"run {number}/{len(runs)} ({run.label})"
      # Looked up at each call, not bound once: the tests replace it.
      record = _run_one(run, study=study, number=number, total=len(runs), progress=progress,
                        train_fn=lambda *a, **k: train.train_and_evaluate(*a, **k), log=log)
      if record["status"] != "failed":
        record, scored = _score(run, record, study=study, log=log)
        rows.extend(scored)
      records.append(record)
      progress.finish(run)
      log(f"{current}: {record['status']}"
          + (f": {record['error']}" if record.get("error") else "") + f"  [{progress.text()}]")
  except (Interrupted, _Stopped, KeyboardInterrupt) as e:
    signum = getattr(e, "signum", signal.SIGINT)
    kept = sum(r["status"] != "failed" for r in records)
    saved = "; its checkpoint saved" if isinstance(e, Interrupted) else ""
    print(f"study stopped by {signal.Signals(signum).name} during {current}{saved}; {kept} "
          f"finished run(s) kept in {out / 'runs'}: run the same command to resume",
          file=sys.stderr, flush=True)
    return 128 + signum
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)

  report = build_report(study, records=records, rows=rows)
  write_report(report, out=out)
  failed = [r for r in records if r["status"] == "failed"]
  log(f"study done: {len(records) - len(failed)}/{len(records)} runs scored"
      + (f", {len(failed)} failed (see study.json 'runs')" if failed else "")
      + f"; {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}")
  return 1 if failed else 0


def _run_one(run: Run, *, study: Study, number: int, total: int, progress: _Progress,
             train_fn, log) -> dict:
  """Trains one run unless it is finished; its record (status trained, finished or failed)."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax.train_utils import Interrupted
  # pylint: enable=g-import-not-at-top
  steps = run.config.train.steps
  record = {"arm": run.arm, "seed": run.seed, "modality": run.modality,
            "workdir": str(run.workdir), "steps": steps}
  head = f"run {number}/{total} ({run.label})"
  difference = _config_difference(run)
  if difference:
    record.update(status="failed", error=f"{run.workdir}: holds a run of another config "
                  f"(config.json differs from the study's at {difference}); delete it or use "
                  "another --out")
    return record
  timing_path = run.workdir / "study_time.json"
  seconds = _read_seconds(timing_path)
  if checkpoint_step(run.workdir) == steps:
    log(f"{head}: finished before (step {steps}): scoring only  [{progress.text()}]")
    record.update(status="finished", train_seconds=seconds)
    return record
  log(f"{head}: training {steps} steps into {run.workdir}  [{progress.text()}]")
  progress.start(run)

  def train_log(message: str):
    match = _STEP_LINE.match(message)
    if match:
      message = f"{message}  [{progress.step_line(run, int(match.group(1)))}]"
    log(f"  {run.label}: {message}")

  started = time.time()
  try:
    train_fn(run.config, workdir=run.workdir, data_dir=study.data, log=train_log,
             evaluate_after=False, recipe=run.recipe, overrides=list(run.overrides))
  except Interrupted:
    raise  # the study stops (the time is written below)
  except Exception as e:  # pylint: disable=broad-except
    # Any failure of one run (diverged, bad data, out of memory, a bug) is that run's: recorded,
    # and the study goes on with the others.
    record.update(status="failed", error=_one_line(e))
    return record
  finally:
    if run.workdir.is_dir():
      _write_seconds(timing_path, seconds + time.time() - started)
  record.update(status="trained", train_seconds=_read_seconds(timing_path))
  return record


def _score(run: Run, record: dict, *, study: Study, log) -> tuple[dict, list[dict]]:
  """Scores a finished run on every test set, as ``uagan-jax evaluate`` would: its rows."""
  from uagan_jax import evaluate  # pylint: disable=g-import-not-at-top
  rows = []
  def quiet(message: str):  # evaluate's warnings only, not its progress and tables
    if message.startswith("warning"):
      log(f"  {run.label}: {message}")
  try:
    # The study's config: config.json's but for `_CHANGEABLE` (checked before training), so
    # the study's eval settings apply.
    config = run.config
    for test_set, folder in study.test_sets().items():
      result = evaluate.evaluate_split(config, workdir=run.workdir, data_dir=folder,
                                       split="test" if test_set == HELD_OUT else "all",
                                       curves=False, log=quiet, translation=False)
      record["step"] = result["step"]
      for row in result["rows"]:
        rows.append({"arm": run.arm, "seed": run.seed, "test_set": test_set, "case": row["case"],
                     "modality": row["modality"],
                     **{key: row[key] for key in row if key not in ("case", "modality")}})
  except (KeyboardInterrupt, _Stopped):
    raise
  except Exception as e:  # pylint: disable=broad-except
    record = {**record, "status": "failed", "error": f"scoring: {_one_line(e)}"}
    return record, []
  return record, rows


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _read_seconds(path: pathlib.Path) -> float:
  try:
    return float(json.loads(path.read_text())["seconds"])
  except (OSError, ValueError, KeyError, TypeError):
    return 0.0


def _write_seconds(path: pathlib.Path, seconds: float) -> None:
  path.write_text(json.dumps({"seconds": seconds}))


# ------------------------------------------------------------------------------------------------
# Statistics over the rows
# ------------------------------------------------------------------------------------------------


def cell_values(rows: Sequence[dict], *, arm: str, test_set: str, metric: str, region: str,
                modalities: Sequence[str], modality: str) -> dict:
  """{(case, seed): value} of one arm: one modality's, or (``POOLED``) the mean over
  ``modalities`` where the (case, seed) has them all. NaN values are left out."""
  key = f"{metric}_{region}"
  found = {}
  for row in rows:
    if row["arm"] == arm and row["test_set"] == test_set and row["modality"] in modalities:
      value = row.get(key)
      if value is not None and not math.isnan(value):
        found.setdefault((row["case"], row["seed"]), {})[row["modality"]] = float(value)
  if modality != POOLED:
    return {k: v[modality] for k, v in found.items() if modality in v}
  return {k: float(np.mean([v[m] for m in modalities])) for k, v in found.items()
          if all(m in v for m in modalities)}


def _by_seed(values: dict) -> tuple[list[list[float]], bool, int]:
  """Per seed, the values sorted by case; whether every seed has the same cases; the cases."""
  seeds = sorted({seed for _, seed in values})
  cases = {seed: sorted(case for case, s in values if s == seed) for seed in seeds}
  crossed = len({tuple(c) for c in cases.values()}) == 1
  groups = [[values[(case, seed)] for case in cases[seed]] for seed in seeds]
  return groups, crossed, len({case for case, _ in values})


def _interval_stats(values: dict, *, resamples: int, level: float, seed: int) -> dict:
  groups, crossed, cases = _by_seed(values)
  summary = stats.seed_summary(values=groups)
  low, high = stats.bootstrap_interval(values=groups, crossed=crossed, resamples=resamples,
                                       level=level, seed=seed)
  return {"mean": summary["mean"], "sd": summary["sd"], "ci": [low, high],
          "seed_means": summary["seed_means"], "n_cases": cases, "n_seeds": summary["n_seeds"],
          "n_values": summary["n_values"], "design": "crossed" if crossed else "nested"}


def analyse(*, rows: Sequence[dict], arms: dict[str, Sequence[str]],
            comparisons: Sequence[tuple[str, str]], test_sets: Sequence[str],
            metrics: Sequence[str], resamples: int = 10_000, level: float = 0.95,
            bootstrap_seed: int = 0) -> tuple[list[dict], list[dict]]:
  """The per-arm results and the comparisons of the scored rows.

  Args:
    rows: one per arm, seed, test set, case and modality: ``{"arm", "seed", "test_set",
      "case", "modality", "<metric>_<region>": value, ...}``.
    arms: {arm: the modalities it segments from}.
    comparisons: (A, B) pairs of arms.
    test_sets: the test sets' names.
    metrics: the metrics to report.
    resamples, level, bootstrap_seed: `stats.bootstrap_interval`'s.

  Returns:
    ``(results, comparisons)``: lists of flat dicts, one per (test set, metric, region,
    modality, arm) and per (test set, metric, region, modality, A, B) that has values; the
    modality is each one where there are several, and ``POOLED``.
  """
  from uagan_jax.data import REGIONS  # pylint: disable=g-import-not-at-top
  options = {"resamples": resamples, "level": level, "seed": bootstrap_seed}
  results, compared = [], []
  for test_set in test_sets:
    for metric in metrics:
      for region in REGIONS:
        cell = {"test_set": test_set, "metric": metric, "region": region}
        for arm, modalities in arms.items():
          for modality in _modality_levels(modalities):
            values = cell_values(rows, arm=arm, test_set=test_set, metric=metric, region=region,
                                 modalities=modalities, modality=modality)
            if values:
              results.append({**cell, "modality": modality, "arm": arm,
                              **_interval_stats(values, **options)})
        for a, b in comparisons:
          common = [m for m in arms[a] if m in arms[b]]
          for modality in _modality_levels(common):
            pairs = stats.paired_differences(
                a=cell_values(rows, arm=a, test_set=test_set, metric=metric, region=region,
                              modalities=common, modality=modality),
                b=cell_values(rows, arm=b, test_set=test_set, metric=metric, region=region,
                              modalities=common, modality=modality))
            if not pairs:
              continue
            per_case = {}
            for (case, _), difference in pairs.items():
              per_case.setdefault(case, []).append(difference)
            entry = _interval_stats(pairs, **options)
            compared.append({
                **cell, "modality": modality, "a": a, "b": b,
                "mean_difference": entry.pop("mean"), **entry,
                "p_wilcoxon": stats.wilcoxon_signed_rank(
                    differences=[float(np.mean(d)) for d in per_case.values()]),
                "better": ("a" if metric in _HIGHER_IS_BETTER else "b")
                          if entry["ci"][0] > 0 else
                          ("b" if metric in _HIGHER_IS_BETTER else "a")
                          if entry["ci"][1] < 0 else None})
  return results, compared


def _modality_levels(modalities: Sequence[str]) -> list[str]:
  return [POOLED] + (list(modalities) if len(modalities) > 1 else [])


# ------------------------------------------------------------------------------------------------
# The report: study.json, study.md, study.png
# ------------------------------------------------------------------------------------------------


def method_text(study: Study) -> dict[str, str]:
  """What the numbers are, written into study.json and study.md."""
  percent = f"{study.level * 100:g}%"
  return {
      "mean": "per seed, the mean over its cases; then the mean over seeds of those means",
      "sd": "the sample standard deviation (ddof=1) over seeds of the seed means (null with "
            "one seed)",
      "interval": f"{percent} percentile bootstrap ({study.resamples} replicates, numpy "
                  f"Generator seed {study.bootstrap_seed}) over cases and seeds: 'crossed' "
                  "(every seed scored the same cases: external test sets) draws the cases with "
                  "replacement, then the seeds, and takes the mean of that grid; 'nested' (each "
                  "seed has its own held-out cases, the split being drawn by the seed) draws the "
                  "seeds, then each drawn seed's cases",
      "difference": "A - B per (case, seed) both arms scored, with the same mean and interval",
      "wilcoxon": "two-sided Wilcoxon signed-rank p-value over cases (each case's difference "
                  "averaged over the seeds that scored it), as scipy.stats.wilcoxon's defaults "
                  "(zeros dropped; exact for small samples, else the normal approximation with "
                  "the tie correction); all differences zero: 1",
      "modality": f"'{POOLED}' is per case and seed the mean over the modalities the arm "
                  "segments from (in a comparison, those both arms do); a per-modality arm is "
                  "one model per modality, each scored on its own",
      "test_sets": f"'{HELD_OUT}': each run's held-out test split; any other: an external "
                   "folder, every case scored",
  }


def build_report(study: Study, *, records: Sequence[dict], rows: Sequence[dict]) -> dict:
  """study.json's content."""
  results, comparisons = analyse(
      rows=rows, arms={name: arm.modalities for name, arm in study.arms.items()},
      comparisons=study.comparisons, test_sets=list(study.test_sets()), metrics=study.metrics,
      resamples=study.resamples, level=study.level, bootstrap_seed=study.bootstrap_seed)
  keep = ("arm", "seed", "test_set", "case", "modality")
  from uagan_jax.data import REGIONS  # pylint: disable=g-import-not-at-top
  return {
      "study": study.spec,
      "data": str(study.data.absolute()),
      "test_sets": {name: str(folder.absolute()) for name, folder in study.test_sets().items()},
      "seeds": list(study.seeds),
      "arms": {name: {"recipe": arm.recipe, "overrides": list(arm.overrides),
                      "per_modality": arm.per_modality, "modalities": list(arm.modalities),
                      "steps": study.configs[(name, study.seeds[0],
                                              arm.modalities[0] if arm.per_modality
                                              else None)][0].train.steps}
               for name, arm in study.arms.items()},
      "comparisons": [list(pair) for pair in study.comparisons],
      "metrics": list(study.metrics),
      "regions": list(REGIONS),
      "method": {"level": study.level, "resamples": study.resamples,
                 "bootstrap_seed": study.bootstrap_seed, **method_text(study)},
      "runs": list(records),
      "results": results,
      "differences": comparisons,
      "rows": [{**{k: row[k] for k in keep},
                **{f"{m}_{r}": row.get(f"{m}_{r}") for m in study.metrics for r in REGIONS}}
               for row in rows],
      "version": _version(),
  }


def _version() -> str:
  from uagan_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.version()


def _json_safe(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_report(report: dict, *, out: pathlib.Path) -> None:
  """study.json, study.md and study.png into ``out``."""
  from uagan_jax import workdir  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out)
  workdir.atomic_write_text(out / "study.json", json.dumps(_json_safe(report), indent=2))
  workdir.atomic_write_text(out / "study.md", markdown(report))
  figure(report, out / "study.png")


def _number(value, metric: str) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return f"{value:.3f}" if metric not in ("hd95", "lesion_hd95", "predicted_ml", "true_ml") \
      else f"{value:.2f}"


def _n(entry: dict) -> str:
  """n: the values, and the cases and seeds they come from (a nested design has fewer values
  than cases x seeds: each seed scored its own held-out cases)."""
  return f"{entry['n_values']}: {entry['n_cases']} cases, {entry['n_seeds']} seeds"


def markdown(report: dict) -> str:
  """study.md: per test set and metric a table of the arms, then one of the comparisons."""
  regions = report["regions"]
  level = f"{report['method']['level'] * 100:g}%"
  lines = [f"# Study {report['study']}", "",
           f"Seeds {', '.join(map(str, report['seeds']))}; data {report['data']}. Each cell: "
           f"mean ± sd over seeds [{level} interval] (n = the (case, seed) values: the cases and "
           "seeds they come from); method below.", ""]
  failed = [r for r in report["runs"] if r["status"] == "failed"]
  if failed:
    lines += ["**Failed runs** (left out of the numbers):", ""]
    lines += [f"- {r['arm']}{'/' + r['modality'] if r['modality'] else ''} seed {r['seed']}: "
              f"{r['error']}" for r in failed] + [""]
  for test_set in report["test_sets"]:
    for metric in report["metrics"]:
      entries = [e for e in report["results"]
                 if e["test_set"] == test_set and e["metric"] == metric]
      if not entries:
        continue
      lines += [f"## {test_set}: {metric}", "",
                "| arm | modality | " + " | ".join(regions) + " |",
                "|---|---|" + "---|" * len(regions)]
      keys = list(dict.fromkeys((e["arm"], e["modality"]) for e in entries))
      for arm, modality in keys:
        cells = []
        for region in regions:
          e = next((e for e in entries if (e["arm"], e["modality"], e["region"])
                    == (arm, modality, region)), None)
          cells.append("-" if e is None else
                       f"{_number(e['mean'], metric)} ± {_number(e['sd'], metric)} "
                       f"[{_number(e['ci'][0], metric)}, {_number(e['ci'][1], metric)}] "
                       f"(n={_n(e)})")
        lines.append(f"| {arm} | {modality} | " + " | ".join(cells) + " |")
      differences = [d for d in report["differences"]
                     if d["test_set"] == test_set and d["metric"] == metric]
      if differences:
        lines += ["", f"Differences A - B, paired per case and seed: mean [{level} interval], "
                  "Wilcoxon p over the cases (n = the paired (case, seed) values: cases, "
                  "seeds)", "",
                  "| A - B | modality | " + " | ".join(regions) + " |",
                  "|---|---|" + "---|" * len(regions)]
        keys = list(dict.fromkeys((d["a"], d["b"], d["modality"]) for d in differences))
        for a, b, modality in keys:
          cells = []
          for region in regions:
            d = next((d for d in differences if (d["a"], d["b"], d["modality"], d["region"])
                      == (a, b, modality, region)), None)
            cells.append("-" if d is None else
                         f"{d['mean_difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] "
                         f"p={_p(d['p_wilcoxon'])} (n={_n(d)})")
          lines.append(f"| {a} - {b} | {modality} | " + " | ".join(cells) + " |")
      missing = [f"{a} - {b}" for a, b in report["comparisons"]
                 if not any((d["a"], d["b"]) == (a, b) for d in differences)]
      if missing:
        lines += ["", f"Not compared (no case and seed scored by both arms): "
                  f"{', '.join(missing)}."]
      lines.append("")
  lines += ["## Runs", "", "| arm | modality | seed | status | step | train time (s) |",
            "|---|---|---:|---|---:|---:|"]
  for r in report["runs"]:
    lines.append(f"| {r['arm']} | {r['modality'] or '-'} | {r['seed']} | {r['status']} | "
                 f"{r.get('step', '-')} | {r.get('train_seconds', 0):.0f} |")
  lines += ["", "## Method", ""]
  lines += [f"- {key}: {text}" for key, text in report["method"].items()
            if isinstance(text, str)]
  return "\n".join(lines) + "\n"


def _p(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.3g}"


def figure(report: dict, path: pathlib.Path) -> pathlib.Path:
  """study.png: a panel per test set, metric and region; per arm its (case, seed) values (pooled
  over modalities) as points, coloured by seed, and its mean with the interval as an error bar."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # no pyplot: no backend or global state (Agg canvas)
  # pylint: enable=g-import-not-at-top
  regions = report["regions"]
  panels = [(t, m) for t in report["test_sets"] for m in report["metrics"]]
  arms = list(report["arms"])
  seeds = report["seeds"]
  fig = Figure(figsize=(4 * len(regions), 3.2 * len(panels)), layout="constrained")
  axes = fig.subplots(len(panels), len(regions), squeeze=False)
  rng = np.random.default_rng(0)  # the points' horizontal jitter only
  colours = {seed: f"C{i % 10}" for i, seed in enumerate(seeds)}
  for row_index, (test_set, metric) in enumerate(panels):
    for column, region in enumerate(regions):
      ax = axes[row_index][column]
      for x, arm in enumerate(arms):
        modalities = report["arms"][arm]["modalities"]
        values = cell_values(report["rows"], arm=arm, test_set=test_set, metric=metric,
                             region=region, modalities=modalities, modality=POOLED)
        for seed in seeds:
          ys = [v for (case, s), v in values.items() if s == seed]
          ax.scatter(x + rng.uniform(-0.25, 0.25, len(ys)) - 0.0, ys, s=9, alpha=0.5,
                     color=colours[seed], label=f"seed {seed}" if x == 0 else None)
        entry = next((e for e in report["results"] if (e["test_set"], e["metric"], e["region"],
                                                       e["modality"], e["arm"])
                      == (test_set, metric, region, POOLED, arm)), None)
        if entry is not None:
          mean, (low, high) = entry["mean"], entry["ci"]
          ax.errorbar([x + 0.35], [mean], yerr=[[mean - low], [high - mean]], fmt="o",
                      color="black", capsize=4)
      ax.set_xticks(range(len(arms)), arms, rotation=20)
      ax.set_title(f"{test_set}: {metric} {region}", fontsize=10)
      ax.grid(axis="y", alpha=0.3)
      if row_index == 0 and column == 0 and len(seeds) > 1:
        ax.legend(fontsize=7, loc="best")
  fig.suptitle(f"{report['study']}: each point a case and seed (mean over modalities); black: "
               f"mean and {report['method']['level'] * 100:g}% interval", fontsize=10)
  path = pathlib.Path(path)
  fig.savefig(path, dpi=80)
  return path
