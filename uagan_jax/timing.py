"""Where a command's wall time goes: named phases, each second counted once (jax-free).

``uagan-jax predict --timing`` prints one line built here, e.g.::

  timing: import 1.21 s, load model 0.83 s, read 0.41 s, compile 0.02 s, segment 1.90 s,
  write 0.12 s, total 4.49 s

Phases nest: time spent in an inner phase (compiling, inside segmenting) is counted for the
inner one only, so the phases add up to the total and none is counted twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# The prefix of the line `Stopwatch.summary` makes (benchmarks/predict_time.py parses it).
PREFIX = "timing:"


class Stopwatch:
  """Wall seconds per named phase, in the order the phases first ran.

  Attributes:
    seconds: Phase name -> seconds spent in it (outside any phase nested in it).
  """

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._open: list[str] = []  # the phases running now, innermost last
    self._since = 0.0  # when the innermost running phase last resumed

  def add(self, name: str, seconds: float) -> None:
    """Counts ``seconds`` measured elsewhere (e.g. before the stopwatch existed) for ``name``."""
    self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Counts the wall time of the ``with`` block for ``name``, pausing the enclosing phase."""
    now = time.perf_counter()
    if self._open:
      self.add(self._open[-1], now - self._since)
    self.seconds.setdefault(name, 0.0)
    self._open.append(name)
    self._since = now
    try:
      yield
    finally:
      now = time.perf_counter()
      self.add(self._open.pop(), now - self._since)
      self._since = now  # the enclosing phase resumes

  def summary(self) -> str:
    """``timing: a 1.00 s, b 0.50 s, total 1.50 s``."""
    parts = [f"{name} {seconds:.2f} s" for name, seconds in self.seconds.items()]
    parts.append(f"total {sum(self.seconds.values()):.2f} s")
    return f"{PREFIX} {', '.join(parts)}"

