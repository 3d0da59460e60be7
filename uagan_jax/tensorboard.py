"""TensorBoard event files of a training run, beside ``metrics.jsonl``.

Process 0 writes ``<workdir>/tensorboard/events.out.tfevents.*`` (``train.tensorboard``, on by
default): every value of each ``metrics.jsonl`` row as a scalar of the same name at its step,
every value of each ``validation.jsonl`` row as ``validation/<name>`` (but ``cases``, a count
and not a curve: it is one text, ``validation/cases``, at the run's first validation), and at the
validation steps a segmentation panel (``panels/segmentation``: image, truth, prediction per
modality, the first validated case) and, for families that translate, a translation panel
(``panels/translation``), the pictures `uagan_jax.visualize` draws for ``evaluate``.

The events are written with tensorboardX (its ``EventsWriter``, record framing and summary
protos), synchronously: each log step's events are on disk (flushed and fsync'ed) before the loop
goes on, as the ``.jsonl`` rows are, so a preempted or crashed run's event file is complete up to
its last logged step. (tensorboardX's ``SummaryWriter`` queues events for a background thread,
and its ``flush`` does not wait for that queue.)

Resuming: each run opens a new event file that starts with the ``SessionLog.START`` event
``SummaryWriter(purge_step=resume_step + 1)`` writes, so TensorBoard discards the events an
earlier run logged past the restored checkpoint (``metrics.jsonl`` drops those rows the same way)
and shows each step once, the replayed run's.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from tensorboardX import summary as summary_lib
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from uagan_jax import workdir as workdir_lib

DIRECTORY = "tensorboard"  # inside the workdir


class EventLog:
  """One event file in ``directory``, written and flushed synchronously.

  A context manager: leaving the ``with`` closes the file (also on an exception).
  """

  def __init__(self, directory: pathlib.Path, *, resume_step: int):
    """Opens a new event file; events past ``resume_step`` in older files are to be discarded.

    Raises:
      UserError: the folder cannot be written (disk full, read-only, forbidden).
    """
    self.directory = pathlib.Path(directory)
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      # File names hold the start time in whole seconds; a run resumed within the same second
      # would reuse (and truncate) the earlier file's name. The number of files before it makes
      # the name new, and keeps the files in the order TensorBoard reads them (by name).
      earlier = sum(1 for p in self.directory.iterdir() if ".tfevents." in p.name)
      self._writer = EventsWriter(str(self.directory / "events"), filename_suffix=f".{earlier:04d}")
    except OSError as e:
      raise workdir_lib.disk_error(self.directory, e, doing="opening the TensorBoard log") from None
    self.path = pathlib.Path(self._writer._file_name)  # pylint: disable=protected-access
    self._closed = False
    # What tensorboardX's SummaryWriter(purge_step=...) writes: TensorBoard drops the events of
    # earlier files whose step is >= this one. Rows up to resume_step are kept in metrics.jsonl.
    self._write(event_pb2.Event(step=resume_step + 1,
                                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self.flush()

  def scalars(self, step: int, values: dict[str, float], *, prefix: str = "") -> None:
    """One scalar per item, tagged ``prefix + name``, at ``step`` (not flushed yet)."""
    summary = summary_pb2.Summary()
    for name, value in values.items():
      summary.value.extend(summary_lib.scalar(prefix + name, float(value)).value)
    self._write(event_pb2.Event(step=step, summary=summary))

  def text(self, step: int, tag: str, text: str) -> None:
    """A text at ``step`` (TensorBoard's Text tab; its tag is ``tag + "/text_summary"``), not
    flushed yet."""
    self._write(event_pb2.Event(step=step, summary=summary_lib.text(tag, text)))

  def image(self, step: int, tag: str, pixels: np.ndarray) -> None:
    """An (H, W, 3) uint8 RGB image, stored as PNG, at ``step`` (not flushed yet)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
      raise ValueError(f"image {tag}: expected (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
    self._write(event_pb2.Event(step=step,
                                summary=summary_lib.image(tag, pixels, dataformats="HWC")))

  def flush(self) -> None:
    """Puts what was written on disk (flush and fsync)."""
    try:
      self._writer.flush()
    except OSError as e:
      raise workdir_lib.disk_error(self.path, e, doing="writing the TensorBoard log") from None

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      try:
        self._writer.close()
      except OSError as e:
        raise workdir_lib.disk_error(self.path, e, doing="writing the TensorBoard log") from None

  def __enter__(self) -> EventLog:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      if exc is None:  # a failure to close must not hide the error that is leaving the loop
        raise

  def _write(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    try:
      self._writer.write_event(event)
    except OSError as e:
      raise workdir_lib.disk_error(self.path, e, doing="writing the TensorBoard log") from None
