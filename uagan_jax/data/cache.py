"""The preprocessed-data cache: each case read from NIfTI once, then read slice by slice.

``uagan-jax prepare --data DIR --out CACHE`` (and ``train``, on its own, see `default_location`)
writes, per case, a folder ``CACHE/cases/<case_id>/`` holding

* ``<modality>.npy``: the image in RAS canonical orientation, cropped to the case's brain box (the
  union of every modality's and the label's non-zero voxels: outside it every voxel is 0), stored
  slice-major as (Z, X', Y') so that one axial slice is one contiguous read, in the most compact
  dtype that holds the values exactly (int16 for the integer intensities of most scans, else
  float32): the numbers training sees are exactly those of a direct read;
* ``label.npy``: the uint8 label, the same way;
* ``meta.json``: the source files (size, modification time), the canonical shape and the brain
  box, per modality the float64 mean and standard deviation of the brain voxels (the z-score's
  statistics, computed as `preprocess.zscore_brain` does on the whole volume), which axial slices
  have brain, its `checks.Occupancy` (the skull-strip check's measurements) and the value of a
  constant non-zero background that `readers.load_case` set to 0 (or null), per slice the
  bounding box of the tumour, and a CRC32 of every stored slice.

The folder is written under a temporary name and renamed when complete, so an interrupted
``prepare`` leaves only whole cases and resumes where it stopped. ``meta.json``'s sources make a
changed or replaced NIfTI detectable: such a case is prepared again, case by case, never reused.
A truncated or corrupt cache file is reported with its name (and a slice whose CRC does not match
is never returned), so a batch is never built from bad bytes.

`CachedCase.image_slice` gives a slice exactly as `preprocess.volume_to_slices` would: z-scored
with the stored statistics, clipped, centre-cropped or padded to the training size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from uagan_jax.data import MODALITIES, checks, preprocess, readers, resample
from uagan_jax.errors import UserError

# Bumped whenever what is stored, or how, changes: a cache of another version is prepared again.
# 4: a constant non-zero background is stored as 0 (`checks.constant_background`), and meta.json
# records its value.
FORMAT_VERSION = 4
CASES_DIR = "cases"
MANIFEST = "manifest.json"
META = "meta.json"
# Where `train` keeps the caches it builds itself, unless UAGAN_JAX_CACHE names another folder.
DEFAULT_ROOT = pathlib.Path.home() / ".cache" / "uagan_jax"
# Below this standard deviation the brain is constant (as `preprocess.zscore_brain`).
_MIN_STD = 1e-6


def default_location(data_dir: str | os.PathLike) -> pathlib.Path:
  """The cache `train` uses for ``data_dir`` when none is given.

  ``$UAGAN_JAX_CACHE/<folder name>-<hash of its absolute path>`` (default root
  ``~/.cache/uagan_jax``): one cache per data folder, outside it (data folders are often
  read-only), found again by every later run on the same folder.
  """
  data_dir = pathlib.Path(data_dir).absolute()
  root = pathlib.Path(os.environ.get("UAGAN_JAX_CACHE") or DEFAULT_ROOT)
  digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]
  return root / f"{data_dir.name}-{digest}"


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _sources(case: readers.CaseFiles) -> dict[str, dict]:
  """Every file of a case with its size and modification time (what staleness is judged by)."""
  files = {name: path for name, path in case.images.items()}
  if case.label is not None:
    files["label"] = case.label
  out = {}
  for name, path in files.items():
    try:
      stat = path.stat()
    except OSError as error:
      raise UserError(f"{path}: cannot read ({error.strerror or error})") from error
    out[name] = {"path": str(path.absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
  return out


def _compact(image: np.ndarray) -> np.ndarray:
  """The image in int16 where that holds every value exactly, else float32."""
  if image.size and np.all(image == np.round(image)) and image.min() >= -32768 \
      and image.max() <= 32767:
    return image.astype(np.int16)
  return image.astype(np.float32, copy=False)


def _brain_box(arrays: Sequence[np.ndarray]) -> tuple[tuple[int, int], tuple[int, int]]:
  """The (X, Y) bounding box of the non-zero voxels of any of ``arrays`` (all (X, Y, Z))."""
  occupied = np.zeros(arrays[0].shape[:2], bool)
  for array in arrays:
    occupied |= np.any(array != 0, axis=2)
  xs, ys = np.flatnonzero(occupied.any(axis=1)), np.flatnonzero(occupied.any(axis=0))
  if xs.size == 0:
    return (0, 0), (0, 0)
  return (int(xs[0]), int(xs[-1]) + 1), (int(ys[0]), int(ys[-1]) + 1)


def _tumour_boxes(label: np.ndarray) -> list:
  """Per axial slice, the [x0, x1, y0, y1] box of its tumour (label > 0) voxels, or None."""
  boxes = []
  for z in range(label.shape[2]):
    tumour = label[:, :, z] > 0
    if not tumour.any():
      boxes.append(None)
      continue
    xs, ys = np.flatnonzero(tumour.any(axis=1)), np.flatnonzero(tumour.any(axis=0))
    boxes.append([int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1])
  return boxes


def _slice_major(volume: np.ndarray, box) -> np.ndarray:
  (x0, x1), (y0, y1) = box
  return np.ascontiguousarray(np.moveaxis(volume[x0:x1, y0:y1, :], 2, 0))


def _crcs(stored: np.ndarray) -> list[int]:
  return [zlib.crc32(stored[z].tobytes()) for z in range(stored.shape[0])]


def prepare_case(case: readers.CaseFiles, cases_dir: pathlib.Path, *,
                 spacing: Sequence[float] | None = None) -> str:
  """Reads one case from NIfTI and writes its cache folder atomically; returns its case id.

  Args:
    case: the case's files.
    cases_dir: the cache's folder of cases.
    spacing: the training voxel size (mm, X Y Z): a case more than `resample.TOLERANCE` away
      from it is resampled to it (images linearly with the background kept 0, the label through
      its one-hot channels: `resample.image_to_spacing`, `resample.labels_to_shape`), as nnU-Net
      does; None keeps every case at its own spacing.

  Raises:
    UserError: a bad NIfTI (naming the file), or a folder that cannot be written (naming it).
  """
  sources = _sources(case)
  volume = readers.load_case(case, modalities=tuple(m for m in MODALITIES if m in case.images),
                             with_label=True)
  images, label, stored_spacing = dict(volume.images), volume.label, tuple(volume.spacing)
  if spacing is not None and resample.needs_resampling(volume.spacing, spacing):
    stored_spacing = tuple(float(s) for s in spacing)
    images = {m: resample.image_to_spacing(image, volume.spacing, stored_spacing)
              for m, image in images.items()}
    shape = next(iter(images.values())).shape
    label = resample.labels_to_shape(label, shape) if label is not None else None
  arrays = list(images.values()) + ([label] if label is not None else [])
  box = _brain_box(arrays)
  meta = {"format_version": FORMAT_VERSION, "case_id": case.case_id, "layout": case.layout,
          "label_convention": case.label_convention, "sources": sources,
          "shape": [int(n) for n in arrays[0].shape], "spacing": list(stored_spacing),
          "source_spacing": list(volume.spacing),
          "box": [list(box[0]), list(box[1])], "modalities": {}, "label": None}
  stored = {}
  for modality, image in images.items():
    brain = image != 0
    values = image[brain].astype(np.float64)  # exactly the statistics of zscore_brain
    data = _slice_major(_compact(image), box)
    stored[modality] = data
    meta["modalities"][modality] = {
        "dtype": str(data.dtype), "mean": float(values.mean()) if values.size else 0.0,
        "std": float(values.std()) if values.size else 0.0,
        "has_brain": [int(z) for z in np.flatnonzero(brain.any(axis=(0, 1)))],
        # Of the file as read (a constant background 0), not as resampled: the skull-strip
        # check is about the scan.
        "occupancy": dataclasses.asdict(checks.occupancy(volume.images[modality])),
        "background": volume.backgrounds.get(modality),
        "crc32": _crcs(data)}
  if label is not None:
    data = _slice_major(label, box)
    stored["label"] = data
    meta["label"] = {"dtype": "uint8", "tumour_boxes": _tumour_boxes(label),
                     "crc32": _crcs(data)}
  final = cases_dir / case.case_id
  temporary = cases_dir / f".{case.case_id}.partial-{os.getpid()}"
  try:
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for name, data in stored.items():
      np.save(temporary / f"{name}.npy", data)
    (temporary / META).write_text(json.dumps(meta))
    if final.exists():  # a stale version: replaced only now that the new one is complete
      shutil.rmtree(final)
    os.replace(temporary, final)
  except OSError as error:
    shutil.rmtree(temporary, ignore_errors=True)
    raise UserError(f"{error.filename or temporary}: cannot write the cache "
                    f"({error.strerror or error})") from error
  return case.case_id


def _read_meta(folder: pathlib.Path) -> tuple[dict | None, str | None]:
  """(a case folder's meta.json, None), or (None, why it cannot be read)."""
  try:
    return json.loads((folder / META).read_text()), None
  except FileNotFoundError:
    return None, "not prepared"
  except (OSError, ValueError) as error:
    return None, f"unreadable {META} ({error})"


def _stale_reason(case: readers.CaseFiles, meta: dict | None, unreadable: str | None = None, *,
                  spacing: Sequence[float] | None = None) -> str | None:
  """Why a case's cache folder (its `_read_meta` result) cannot be used as it is (None: it can).

  With a training ``spacing``, a case stored at another one (more than `resample.TOLERANCE`
  away) is prepared again from its files: resampled to it, or kept at its own spacing if that is
  the one asked for.
  """
  if meta is None:
    return unreadable
  if meta.get("format_version") != FORMAT_VERSION:
    return f"cache format {meta.get('format_version')}, this code writes {FORMAT_VERSION}"
  if spacing is not None:
    wanted = (tuple(meta["source_spacing"])
              if not resample.needs_resampling(meta["source_spacing"], spacing) else spacing)
    if resample.needs_resampling(meta["spacing"], wanted, tolerance=1e-6):
      return "prepared at another voxel spacing than this run's data.spacing"
  current = _sources(case)
  if set(current) != set(meta["sources"]):
    return "its files changed"
  for name, info in current.items():
    old = meta["sources"][name]
    # Size and modification time, not the path: a data folder that moved (or is reached
    # through another link) holds the same files.
    if (old["size"], old["mtime_ns"]) != (info["size"], info["mtime_ns"]):
      return f"{info['path']} changed since it was prepared"
  return None


def input_warnings(case: readers.CaseFiles, meta: dict) -> list[str]:
  """The skull-strip warnings (`checks.warning_for`) of a prepared case's image files, from the
  measurements its meta.json holds (no image is read)."""
  warnings = []
  for modality, info in meta["modalities"].items():
    warning = checks.warning_for(checks.Occupancy(**info["occupancy"]),
                                 path=checks.image_name(case, modality))
    if warning is not None:
      warnings.append(warning)
  return warnings


def input_messages(case: readers.CaseFiles, meta: dict) -> list[str]:
  """The lines to log for a prepared case's image files, from its meta.json: ``note: ...`` for
  each whose constant background was set to 0 (`checks.background_note`), then ``warning: ...``
  for each that does not look skull-stripped (`input_warnings`)."""
  notes = [f"note: {checks.background_note(info['background'], path=checks.image_name(case, m))}"
           for m, info in meta["modalities"].items() if info.get("background") is not None]
  return notes + [f"warning: {warning}" for warning in input_warnings(case, meta)]


def _prepare_worker(job) -> tuple[str, str | None, list[str], bool]:
  """(case id, None, its input messages, whether it was resampled) or (case id, the error, [],
  False)."""
  case, cases_dir, spacing = job
  try:
    case_id = prepare_case(case, cases_dir, spacing=spacing)
  except UserError as error:
    return case.case_id, str(error), [], False
  meta, unreadable = _read_meta(cases_dir / case_id)
  if meta is None:
    return (case_id, f"{cases_dir / case_id / META}: {unreadable} right after it was written", [],
            False)
  return case_id, None, input_messages(case, meta), meta["spacing"] != meta["source_spacing"]


def prepare(data_dir: str | os.PathLike, cache_dir: str | os.PathLike, *,
            cases: Sequence[readers.CaseFiles] | None = None, workers: int = 0,
            spacing: Sequence[float] | None = None,
            log: Callable[[str], None] = print) -> pathlib.Path:
  """Prepares every case of ``data_dir`` that is not already prepared and up to date.

  Args:
    data_dir: a data folder of any `readers` layout (None when ``cases`` are given).
    cache_dir: the cache folder (created).
    cases: the cases of ``data_dir`` if already found.
    workers: processes that read and write cases; 0 = the machine's core count; 1 = in this
      process.
    spacing: the training voxel size in mm (``data.spacing``): cases of another spacing are
      resampled to it (`prepare_case`); None keeps each case's own.
    log: progress lines, with the count and an ETA, and once per image file whose constant
      background was taken for 0 a ``note: ...`` line, once per image file that does not look
      skull-stripped a ``warning: ...`` line (`checks`), for reused cases too (from meta.json).

  Returns:
    The cache folder.

  Raises:
    UserError: a bad case (the first one, naming its file) or a folder that cannot be written;
      every case prepared before it stays.
  """
  cache_dir = pathlib.Path(cache_dir)
  cases = list(cases) if cases is not None else readers.find_cases(data_dir)
  cases_dir = cache_dir / CASES_DIR
  try:
    cases_dir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"{cache_dir}: cannot create the cache folder "
                    f"({error.strerror or error})") from error
  if not os.access(cases_dir, os.W_OK | os.X_OK):
    raise UserError(f"{cases_dir}: cannot write the cache (no write permission)")
  todo, reasons = [], {}
  for case in cases:
    meta, unreadable = _read_meta(cases_dir / case.case_id)
    reason = _stale_reason(case, meta, unreadable, spacing=spacing)
    if reason is not None:
      todo.append(case)
      reasons[reason] = reasons.get(reason, 0) + 1
    else:  # reused: its messages are logged now, those of the cases to prepare when prepared
      for message in input_messages(case, meta):
        log(message)
  if not todo:
    log(f"cache {cache_dir}: " + ("its one case" if len(cases) == 1 else f"all {len(cases)} cases")
        + " prepared and up to date")
  else:
    why = "; ".join(f"{n} {reason}" for reason, n in reasons.items())
    workers = min(workers or os.cpu_count() or 1, len(todo))
    log(f"preparing {len(todo)} of {len(cases)} cases into {cache_dir} with {workers} "
        f"worker{'s' if workers > 1 else ''} ({why})")
    started = time.time()
    jobs = [(case, cases_dir, None if spacing is None else tuple(spacing)) for case in todo]
    if workers == 1:
      results = map(_prepare_worker, jobs)
      pool = None
    else:
      # Spawned, not forked: the parent may hold JAX's threads, which a fork would not copy.
      pool = multiprocessing.get_context("spawn").Pool(workers)
      results = pool.imap(_prepare_worker, jobs)
    try:
      resampled = 0
      for done, (case_id, error, messages, was_resampled) in enumerate(results, 1):
        if error is not None:
          raise UserError(error)
        resampled += was_resampled
        for message in messages:
          log(message)
        elapsed = time.time() - started
        if done == len(todo) or done % max(1, len(todo) // 20) == 0 or len(todo) <= 20:
          log(f"  prepared {done}/{len(todo)} cases ({case_id}), {elapsed:.0f} s, "
              f"ETA {elapsed / done * (len(todo) - done):.0f} s")
    finally:
      if pool is not None:
        pool.terminate()
        pool.join()
    if resampled:
      cases_word = "case" if len(todo) == 1 else "cases"
      log(f"resampled {resampled} of the {len(todo)} {cases_word} to the training spacing "
          f"{'x'.join(f'{float(s):g}' for s in spacing)} mm (data.spacing; theirs differed by "
          f"more than {resample.TOLERANCE:.0%})")
  manifest = {"format_version": FORMAT_VERSION,
              "data": str(pathlib.Path(data_dir).absolute()) if data_dir is not None else None,
              "cases": [c.case_id for c in cases]}
  _write_atomically(cache_dir / MANIFEST, json.dumps(manifest, indent=1))
  return cache_dir


def _write_atomically(path: pathlib.Path, text: str) -> None:
  temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
  try:
    temporary.write_text(text)
    os.replace(temporary, path)
  except OSError as error:
    temporary.unlink(missing_ok=True)
    raise UserError(f"{path}: cannot write ({error.strerror or error})") from error


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

# np.load parses a .npy header with ast.literal_eval, which CPython 3.11 does not make safe to
# call from several threads at once (the loader's threads raised "SystemError: AST constructor
# recursion depth mismatch" in a demo run); opening the memmap is short, reading the slice is not
# and stays outside the lock.
_NPY_HEADER_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class CachedCase:
  """One prepared case: its metadata, and its slices read on demand from the cache files."""
  case_id: str
  folder: pathlib.Path
  meta: dict

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.meta["shape"])

  def has_brain(self, modality: str) -> np.ndarray:
    """bool (Z,): which axial slices of ``modality`` have a non-zero voxel."""
    flags = np.zeros(self.shape[2], bool)
    flags[self.meta["modalities"][modality]["has_brain"]] = True
    return flags

  def _raw_slice(self, name: str, z: int) -> np.ndarray:
    """Slice z of a stored array (image modality or "label"), its CRC checked."""
    path = self.folder / f"{name}.npy"
    try:
      with _NPY_HEADER_LOCK:
        stored = np.load(path, mmap_mode="r")
      data = np.array(stored[z])  # the read itself, outside the lock
      del stored
    except (OSError, ValueError, IndexError) as error:
      raise UserError(f"{path}: truncated or corrupt cache file ({error}); delete the case "
                      f"folder {self.folder} and run again to prepare it anew") from error
    info = self.meta["label"] if name == "label" else self.meta["modalities"][name]
    if zlib.crc32(data.tobytes()) != info["crc32"][z]:
      raise UserError(f"{path}: corrupt cache file (slice {z} fails its checksum); delete the "
                      f"case folder {self.folder} and run again to prepare it anew")
    return data

  def _window(self, size: tuple[int, int]):
    """For the centre crop/pad of the full (X, Y) plane to ``size`` (`preprocess.centred`): the
    part of the brain box that lands on the canvas, as (box slices, canvas slices)."""
    crop_pad = preprocess.centred(self.shape[:2], size=size)
    source, output = [], []
    for n, s, crop, pad, (b0, b1) in zip(crop_pad.original, crop_pad.size, crop_pad.crop_start,
                                         crop_pad.pad_before, self.meta["box"]):
      lo, hi = max(b0, crop), min(b1, crop + min(n, s))  # full-plane coordinates kept
      hi = max(hi, lo)
      source.append(slice(lo - b0, hi - b0))
      output.append(slice(lo - crop + pad, hi - crop + pad))
    return tuple(source), tuple(output)

  def image_slice(self, modality: str, z: int, *, size: tuple[int, int],
                  clip: float) -> np.ndarray:
    """float32 (H, W): slice z of ``modality`` as `preprocess.volume_to_slices` gives it."""
    info = self.meta["modalities"][modality]
    raw = self._raw_slice(modality, z)
    std = info["std"]
    scale = 1.0 / std if std > _MIN_STD else 0.0
    brain = raw != 0
    normalised = np.zeros(raw.shape, np.float32)
    # The arithmetic of zscore_brain, voxel by voxel: float64, then float32.
    normalised[brain] = np.clip((raw[brain].astype(np.float64) - info["mean"]) * scale,
                                -clip, clip)
    source, output = self._window(size)
    out = np.zeros(size, np.float32)
    out[output] = normalised[source]
    return out

  def label_slice(self, z: int, *, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W): slice z of the label, centre-cropped or padded like the images."""
    raw = self._raw_slice("label", z)
    source, output = self._window(size)
    out = np.zeros(size, np.uint8)
    out[output] = raw[source]
    return out

  def tumour_in_view(self, *, size: tuple[int, int]) -> np.ndarray:
    """bool (Z,): which slices have a tumour voxel inside the centre crop to ``size``.

    Decided from the stored tumour boxes; only a box that the crop cuts needs the slice itself.
    """
    boxes = self.meta["label"]["tumour_boxes"]
    out = np.zeros(len(boxes), bool)
    crop_pad = preprocess.centred(self.shape[:2], size=size)
    (wx0, wx1), (wy0, wy1) = [(crop, crop + min(n, s)) for n, s, crop in
                              zip(crop_pad.original, crop_pad.size, crop_pad.crop_start)]
    for z, box in enumerate(boxes):
      if box is None:
        continue
      x0, x1, y0, y1 = box
      if x0 >= wx0 and x1 <= wx1 and y0 >= wy0 and y1 <= wy1:
        out[z] = True
      elif x1 > wx0 and x0 < wx1 and y1 > wy0 and y0 < wy1:
        out[z] = bool(self.label_slice(z, size=size).any())
    return out


def open_case(cache_dir: pathlib.Path, case: readers.CaseFiles) -> CachedCase:
  """The prepared ``case`` in ``cache_dir``; UserError if it is missing or stale."""
  folder = pathlib.Path(cache_dir) / CASES_DIR / case.case_id
  meta, unreadable = _read_meta(folder)
  reason = _stale_reason(case, meta, unreadable)
  if reason is not None:
    raise UserError(f"{folder}: cannot use the cache of case {case.case_id} ({reason}); run "
                    f"'uagan-jax prepare' again")
  for name in list(meta["modalities"]) + (["label"] if meta["label"] else []):
    path = folder / f"{name}.npy"
    if not path.is_file():
      raise UserError(f"{path}: missing from the cache; delete {folder} and run again")
  # Per-slice lists as numpy arrays: a few kB per case in memory instead of tens, since a
  # training process holds the metadata of every training case.
  for info in list(meta["modalities"].values()) + ([meta["label"]] if meta["label"] else []):
    info["crc32"] = np.asarray(info["crc32"], np.uint32)
  for info in meta["modalities"].values():
    info["has_brain"] = np.asarray(info["has_brain"], np.int32)
  return CachedCase(case_id=case.case_id, folder=folder, meta=meta)
