"""The training input: a data folder in, batch after batch out, ahead of the step.

One interface for the loop: `TrainInput.batches(start_step)` yields ``(step, batch)`` for every
step from ``start_step`` on, the batch at step t a pure function of (seed, t), so a resumed run
sees exactly the batches an uninterrupted one would have. What stands behind it (today: every
training slice in memory, sampled by `dataset.get_batch`, produced in a thread two steps ahead)
can change without touching the loop.

`find_training_data` reads a data folder and splits it (train/val/test, the modality each
training case contributes: the unpaired protocol of `dataset`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import queue
import threading
import time
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from uagan_jax.data import MODALITIES, dataset, readers


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """The cases of a data folder and a run's split of them.

  Attributes:
    data_dir: the folder.
    cases: every case found (`readers.CaseFiles`), in reader order.
    splits: ``{"train", "val", "test"}`` -> case ids.
    assignment: training case id -> the one modality it contributes.
  """
  data_dir: pathlib.Path
  cases: list
  splits: dict[str, list[str]]
  assignment: dict[str, str]

  @property
  def layout(self) -> str:
    return self.cases[0].layout

  def cases_of(self, ids) -> list:
    by_id = {c.case_id: c for c in self.cases}
    return [by_id[i] for i in ids]


def find_training_data(config: ml_collections.ConfigDict, data_dir: pathlib.Path) -> TrainingData:
  """Finds the cases in ``data_dir`` and splits them with ``config.seed``."""
  cases = readers.find_cases(data_dir)
  splits = dataset.split_cases([c.case_id for c in cases], seed=config.seed,
                               val_fraction=config.data.val_fraction,
                               test_fraction=config.data.test_fraction)
  assignment = dataset.assign_modalities(splits["train"], seed=config.seed,
                                         modalities=config.data.modalities)
  return TrainingData(data_dir=pathlib.Path(data_dir), cases=cases, splits=splits,
                      assignment=assignment)


class TrainInput:
  """Training batches of the unpaired slice set, placed for the step and produced ahead of it."""

  def __init__(self, config: ml_collections.ConfigDict, data: TrainingData, *,
               place: Callable[[dict], dict] = lambda batch: batch,
               log: Callable[[str], None] = print):
    """Loads the training slices.

    Args:
      config: the run's config (data.*, seed, train.batch_size, train.steps).
      data: the cases and their split.
      place: puts a host batch where the step wants it (e.g. sharded over the devices).
      log: where loading progress goes.
    """
    self.seed = config.seed
    self.batch_size = config.train.batch_size
    self.steps = config.train.steps
    self.place = place
    started = time.time()

    def progress(done, total, case_id):
      if done == total or done % max(1, total // 10) == 0:
        log(f"  loaded {done}/{total} training cases ({case_id}), {time.time() - started:.0f} s")

    train_cases = [c for c in data.cases if c.case_id in data.assignment]
    self.slices = dataset.build_slice_set(
        train_cases, assignment=data.assignment, size=tuple(config.data.image_size),
        clip=config.data.clip, tumour_free_fraction=config.data.tumour_free_fraction,
        seed=config.seed, progress=progress)
    counts = np.bincount(self.slices.modality, minlength=len(MODALITIES))
    log(f"training slices: {len(self.slices)} ("
        + ", ".join(f"{m} {n}" for m, n in zip(MODALITIES, counts) if n) + ")")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The host batch of ``step``: a pure function of (seed, step)."""
    return dataset.get_batch(self.slices, seed=self.seed, step=step, batch_size=self.batch_size)

  def batches(self, start_step: int) -> Iterator[tuple[int, dict]]:
    """``(step, placed batch)`` for steps ``start_step .. train.steps - 1``, two steps ahead."""
    return _prefetch(lambda step: self.place(self.batch(step)), range(start_step, self.steps))


def _prefetch(produce: Callable[[int], dict], steps: range, depth: int = 2):
  """Yields ``produce(step)`` for each step, computed ``depth`` steps ahead in a thread.

  Batches are a pure function of the step, so running ahead changes nothing but the wait.
  """
  buffer: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def worker():
    try:
      for step in steps:
        if stop.is_set():
          return
        buffer.put((step, produce(step), None))
    except BaseException as e:  # pylint: disable=broad-except
      buffer.put((None, None, e))

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    for _ in steps:
      step, item, error = buffer.get()
      if error is not None:
        raise error
      yield step, item
  finally:
    stop.set()
