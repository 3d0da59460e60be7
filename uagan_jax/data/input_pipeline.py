"""The training input: a data folder in, batch after batch out, ahead of the step.

One interface for the loop: `TrainInput.batches(start_step)` yields ``(step, batch)`` for every
step from ``start_step`` on, the batch at step t a pure function of (seed, t), so a resumed run
sees exactly the batches an uninterrupted one would have.

Behind it: the data folder is prepared once into a cache (`uagan_jax.data.cache`: per-case,
slice-major arrays and their metadata), the training slices are an index into it
(`dataset.build_slice_index`: memory does not grow with the data set), and each batch is read
slice by slice from the cache by a pool of threads, several steps ahead of the step. Threads,
not processes: a batch is a few dozen small reads and elementwise numpy work, most of it outside
the GIL, and threads share the index and need no pickling; the order of the results is the
order of the steps, whatever thread finishes first.

`find_training_data` reads a data folder and splits it (train/val/test, or with ``data.folds`` one
fold of a cross-validation; and the modalities each
training case contributes under ``data.protocol``: one under UAGAN's unpaired protocol, every
one under ``all``; see `dataset`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import pathlib
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from uagan_jax.data import MODALITIES, cache, dataset, readers


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """The cases of a data folder and a run's split of them.

  Attributes:
    data_dir: the folder.
    cases: every case found (`readers.CaseFiles`), in reader order.
    splits: ``{"train", "val", "test"}`` -> case ids.
    protocol: ``data.protocol``, "unpaired" or "all".
    train_modalities: training case id -> the modalities it contributes (canonical order; one
      under "unpaired").
    folds: ``data.folds``: 0 (a plain split) or K, the folds of a cross-validation.
    fold: ``data.fold``: which fold ``splits`` is (0 with ``folds`` 0).
  """
  data_dir: pathlib.Path
  cases: list
  splits: dict[str, list[str]]
  protocol: str
  train_modalities: dict[str, tuple[str, ...]]
  folds: int = 0
  fold: int = 0

  @property
  def layout(self) -> str:
    return self.cases[0].layout

  @property
  def assignment(self) -> dict[str, str]:
    """Training case id -> the one modality it contributes (the unpaired protocol only)."""
    if self.protocol != "unpaired":
      raise ValueError(f"data.protocol={self.protocol}: training cases contribute several "
                       "modalities; see train_modalities")
    return {case_id: names[0] for case_id, names in self.train_modalities.items()}

  def cases_of(self, ids) -> list:
    by_id = {c.case_id: c for c in self.cases}
    return [by_id[i] for i in ids]


def find_training_data(config: ml_collections.ConfigDict, data_dir: pathlib.Path) -> TrainingData:
  """Finds the cases in ``data_dir`` and splits them with ``config.seed``: `dataset.split_cases`,
  or with ``data.folds`` K > 0 fold ``data.fold`` of `dataset.split_fold`."""
  cases = readers.find_cases(data_dir)
  ids = [c.case_id for c in cases]
  if config.data.folds:
    # Cross-validation: the test split of the plain split, the rest in data.folds folds
    # (data.val_fraction is ignored).
    splits = dataset.split_fold(ids, seed=config.seed, test_fraction=config.data.test_fraction,
                                folds=config.data.folds, fold=config.data.fold)
  else:
    splits = dataset.split_cases(ids, seed=config.seed, val_fraction=config.data.val_fraction,
                                 test_fraction=config.data.test_fraction)
  by_id = {c.case_id: c for c in cases}
  train_modalities = dataset.training_modalities(
      {case_id: tuple(by_id[case_id].images) for case_id in splits["train"]}, seed=config.seed,
      modalities=config.data.modalities, protocol=config.data.protocol)
  folds = int(config.data.folds)
  return TrainingData(data_dir=pathlib.Path(data_dir), cases=cases, splits=splits,
                      protocol=config.data.protocol, train_modalities=train_modalities,
                      folds=folds, fold=int(config.data.fold) if folds else 0)


class TrainInput:
  """Training batches of the slice index, read from the cache and produced ahead.

  Attributes:
    modality_counts: modality -> its training slices, for every modality of ``data.modalities``
      (0 for one no training case contributes, or whose cases have no slice to train on).
  """

  def __init__(self, config: ml_collections.ConfigDict, data: TrainingData, *,
               cache_dir: pathlib.Path | None = None,
               place: Callable[[dict], dict] = lambda batch: batch,
               log: Callable[[str], None] = print, rows: slice = slice(None)):
    """Prepares (or reuses) the cache and indexes the training slices.

    Args:
      config: the run's config (data.*, seed, train.batch_size, train.steps).
      data: the cases and their split.
      cache_dir: the cache folder; default `cache.default_location` of the data folder.
      place: puts a host batch where the step wants it (e.g. sharded over the devices).
      log: where preparation progress goes.
      rows: the rows of each global batch this process loads (`parallel.process_rows`; all of
        them with one process).
    """
    self.seed = config.seed
    self.batch_size = config.train.batch_size
    self.steps = config.train.steps
    self.size = tuple(config.data.image_size)
    self.clip = config.data.clip
    self.threads = config.data.loader_threads
    self.place = place
    self.rows = rows
    self.cache_dir = pathlib.Path(cache_dir or cache.default_location(data.data_dir))
    train_cases = [c for c in data.cases if c.case_id in data.train_modalities]
    cache.prepare(data.data_dir, self.cache_dir, cases=data.cases,
                  spacing=tuple(config.data.spacing), log=log)
    self.cases = [cache.open_case(self.cache_dir, c) for c in train_cases]
    self.index = dataset.build_slice_index(
        self.cases, assignment=data.train_modalities, size=self.size,
        tumour_free_fraction=config.data.tumour_free_fraction, seed=config.seed,
        warn=lambda message: log(f"warning: {message}"))
    counts = np.bincount(self.index.modality, minlength=len(MODALITIES))
    self.modality_counts = {m: int(n) for m, n in zip(MODALITIES, counts)
                            if m in config.data.modalities}
    log(f"training slices: {len(self.index)} ("
        + ", ".join(f"{m} {n}" for m, n in zip(MODALITIES, counts) if n)
        + f"), read from the cache {self.cache_dir}")

  @property
  def trained_modalities(self) -> tuple[str, ...]:
    """The modalities with at least one training slice, in canonical order."""
    return tuple(m for m, n in self.modality_counts.items() if n)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the batch of ``step``: a pure function of (seed, step).

    Only the chosen rows are read: with several processes each loads its own part of the same
    global batch. ``{"image": float32 (B, H, W, 1), "regions": float32 (B, H, W, 3),
    "modality": int32 (B,)}`` with B the number of rows.
    """
    chosen = dataset.batch_indices(seed=self.seed, step=step, batch_size=self.batch_size,
                                   num_examples=len(self.index))[self.rows]
    images = np.zeros((len(chosen),) + self.size + (1,), np.float32)
    regions = np.zeros((len(chosen),) + self.size + (3,), np.float32)
    for b, i in enumerate(chosen):
      case = self.cases[self.index.case_index[i]]
      z = int(self.index.z[i])
      images[b, ..., 0] = case.image_slice(MODALITIES[self.index.modality[i]], z, size=self.size,
                                           clip=self.clip)
      regions[b] = readers.labels_to_regions(case.label_slice(z, size=self.size),
                                             convention=case.meta["label_convention"])
    return {"image": images, "regions": regions,
            "modality": self.index.modality[chosen].astype(np.int32)}

  def batches(self, start_step: int) -> Iterator[tuple[int, dict]]:
    """``(step, placed batch)`` for steps ``start_step .. train.steps - 1``, produced ahead by
    ``data.loader_threads`` threads."""
    return _prefetch(lambda step: self.place(self.batch(step)), range(start_step, self.steps),
                     threads=self.threads)


def _prefetch(produce: Callable[[int], dict], steps: range, *, threads: int):
  """Yields ``(step, produce(step))`` in step order, ``2 * threads`` steps computed ahead.

  Batches are a pure function of the step, so running ahead changes nothing but the wait. An
  error in ``produce`` reaches the consumer at that step.
  """
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads),
                                               thread_name_prefix="batches")
  pending: collections.deque = collections.deque()
  upcoming = iter(steps)
  try:
    for step in itertools.islice(upcoming, 2 * max(1, threads)):
      pending.append((step, pool.submit(produce, step)))
    while pending:
      step, future = pending.popleft()
      item = future.result()
      following = next(upcoming, None)
      if following is not None:
        pending.append((following, pool.submit(produce, following)))
      yield step, item
  finally:
    for _, future in pending:
      future.cancel()
    pool.shutdown(wait=True, cancel_futures=True)
