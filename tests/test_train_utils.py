"""`uagan_jax/train_utils.py`: the metrics log, durations, the divergence check and SIGTERM/SIGINT
handling."""

import json
import math
import os
import signal
import threading
import time

import pytest

from uagan_jax import train_utils


def test_metrics_log_drops_rows_past_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6))
                  + '{"step": 6, "lo')  # a line cut short by the crash
  log = train_utils.MetricsLog(path, resume_step=3)
  assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2, 3]
  log.write({"step": 4, "loss": 0.5})
  assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("seconds,expected", [
    (0, "0:00"),
    (59, "0:59"),
    (59.6, "1:00"),        # rounded to the second
    (60, "1:00"),
    (3599, "59:59"),       # m:ss up to an hour
    (3600, "1:00:00"),     # h:mm:ss from an hour on
    (3725, "1:02:05"),
    (90061, "25:01:01"),   # hours are not wrapped into days
])
def test_format_duration(seconds, expected):
  assert train_utils.format_duration(seconds) == expected


def test_non_finite_names_nan_and_infinite_values_in_order():
  values = {"a": 1.0, "b": math.nan, "c": 0.0, "d": math.inf, "e": -math.inf, "f": -2.5}
  assert train_utils.non_finite(values) == ["b", "d", "e"]
  assert train_utils.non_finite({"a": 1.0, "b": 0.0}) == []
  assert train_utils.non_finite({}) == []


def _wait_for(condition, timeout=5.0):
  """Python runs a signal handler at its next check in the main thread; allow a moment."""
  deadline = time.monotonic() + timeout
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.01)
  return condition()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_requested_sets_the_flag_and_restores_the_previous_handler(sig, capsys):
  # Handlers of this test's own stand in for the previous ones: should StopRequested fail to
  # install its handler, they catch the signal instead of killing (or interrupting) pytest.
  caught = []
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  stand_in = {s: (lambda signum, frame: caught.append(signum)) for s in previous}
  try:
    for s, handler in stand_in.items():
      signal.signal(s, handler)
    with train_utils.StopRequested() as stop:
      assert not stop.requested
      assert signal.getsignal(sig) is not stand_in[sig]
      os.kill(os.getpid(), sig)
      assert _wait_for(lambda: stop.requested)
    assert caught == []  # StopRequested handled it, not the previous handler
    assert f"received {signal.Signals(sig).name}" in capsys.readouterr().err
    for s, handler in stand_in.items():
      assert signal.getsignal(s) is handler, signal.Signals(s).name
    # Restored for real: the next signal reaches the previous handler and not the flag.
    os.kill(os.getpid(), sig)
    assert _wait_for(lambda: caught == [sig])
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def test_stop_requested_outside_the_main_thread_installs_nothing():
  # signal.signal may only be called from the main thread; there the context manager is a no-op.
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  errors, flags = [], []

  def worker():
    try:
      with train_utils.StopRequested() as stop:
        flags.append(stop.requested)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=worker)
  thread.start()
  thread.join()
  assert errors == [] and flags == [False]
  assert {s: signal.getsignal(s) for s in before} == before
