"""What the training loop needs around the step: the metrics log, SIGTERM handling, the
divergence stop and durations for the ETA."""

from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import threading
from collections.abc import Callable

from uagan_jax import workdir as workdir_lib


class TrainingDiverged(Exception):
  """A logged loss, or the state due to be checkpointed, became NaN or infinite."""


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped the run after its checkpoint was saved.

  The command line exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as a shell
  reports a process killed by that signal, so that a scheduler can tell "preempted, requeue"
  from "finished" (0) and from "bad input" (2).
  """

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


def non_finite(values: dict[str, float]) -> list[str]:
  """The names of the values that are NaN or infinite."""
  return [k for k, v in values.items() if not math.isfinite(v)]


class MetricsLog:
  """``metrics.jsonl``: one JSON object per logged step, ``{"step": t, "<loss>": value, ...}``
  (and ``validation.jsonl``, the same way).

  On resume, rows past the restored step (logged after the last checkpoint by the interrupted
  run) are dropped, so a resumed run's file equals the uninterrupted run's, row for row. The kept
  rows are rewritten atomically (`workdir.atomic_write_text`); each new row is one fsync'ed
  append, and a row whose step is not past the last one is refused, so the file's steps only
  increase. A crash mid-append leaves at worst a cut-short last line, dropped on resume.
  """

  def __init__(self, path: pathlib.Path, *, resume_step: int):
    self.path = path
    self.last_step = -math.inf
    kept = []
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          break  # a line cut short by a crash ends the usable log
        if row.get("step", math.inf) > resume_step or row["step"] <= self.last_step:
          break
        kept.append(line)
        self.last_step = row["step"]
    workdir_lib.atomic_write_text(path, "".join(line + "\n" for line in kept))

  def write(self, row: dict) -> None:
    """Appends ``row``, whose ``step`` must be past the last row's."""
    if row["step"] <= self.last_step:
      raise ValueError(f"{self.path}: step {row['step']} is not past the last row's "
                       f"{self.last_step}")
    workdir_lib.append_line(self.path, json.dumps(row, sort_keys=True))
    self.last_step = row["step"]


def format_duration(seconds: float) -> str:
  """``m:ss``, or ``h:mm:ss`` from an hour on."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class StopRequested:
  """SIGTERM/SIGINT set a flag (and ``signum``); the loop checkpoints and stops at the next step.

  With several processes a signal may reach one of them only (or not all at the same step), yet
  all must leave the loop at the same step, or the others hang in the next step's collectives.
  So they agree: `should_stop` asks every process (``any_process``, one tiny all-gather) at the
  steps the loop marks as sync points (its log steps, where it waits for the metrics anyway)
  and nowhere else.
  """

  def __init__(self, any_process: Callable[[bool], bool] | None = None):
    """``any_process(flag)``: whether ``flag`` is set on any process; None with one process."""
    self.requested = False
    self.signum = None
    self._any_process = any_process
    self._previous = {}

  def should_stop(self, *, sync_point: bool) -> bool:
    """Whether the loop stops after this step: with one process whenever a signal came; with
    several, only at sync points, and then on every process if any got one."""
    if self._any_process is None:
      return self.requested
    return sync_point and self._any_process(self.requested)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signum = signum
    print(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping",
          file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
