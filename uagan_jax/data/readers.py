"""Find and load brain-tumour MRI cases in the four dataset layouts this project reads.

Layouts (``root`` is the data folder the user names):

* ``brats2021`` (BraTS 2018-2021): ``root/CASE/CASE_{t1,t1ce,t2,flair,seg}.nii[.gz]``; labels
  0 background, 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing.
* ``brats2023``: ``root/CASE/CASE-{t1n,t1c,t2w,t2f,seg}.nii[.gz]``; labels 1 NCR, 2 ED, 3 ET.
* ``upenn`` (UPENN-GBM): ``root/CASE/CASE_{T1,T1GD,T2,FLAIR,segm}.nii[.gz]``; labels as brats2021.
* ``msd`` (Medical Segmentation Decathlon Task01_BrainTumour): ``root/dataset.json``, 4D
  ``root/imagesTr/*.nii.gz`` (and label-free ``imagesTs/``) with the channel order given by the
  json's ``"modality"`` entry, 3D ``root/labelsTr/*.nii.gz``; labels 1 oedema, 2 non-enhancing
  tumour, 3 enhancing.

``root`` may also be a single case folder of one of the first three layouts. Files are matched by
their suffix (case-insensitively), never by the folder name: UPENN folders are not named like the
files inside them. The label volume is optional everywhere (inference cases have none).

Loaded volumes are reoriented to the closest RAS canonical orientation (the semantics of
``nibabel.as_closest_canonical``), so axis 2 runs inferior -> superior and axial slices are
``volume[:, :, z]``. `Volume.to_source_orientation` and `Volume.to_source_image` undo that, so a
prediction can be written with the input file's shape, affine, qform/sform codes and header.

Every problem with the user's files is a `UserError` whose one-line message starts with the path.
Before any voxel is read, each file's header is checked against itself and against the file
(`_check_header`: a known data type, a sane vox_offset, dims and pixdim, and exactly the bytes the
dims and data type promise); after opening, its affine (`_check_affine`), and across a case's
files, the same grid (`_check_same_grid`). A file that passes is read as what its header says; one
that does not is refused in one line, never read as something else.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import pathlib
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from uagan_jax.data import MODALITIES, checks
from uagan_jax.errors import UserError

LAYOUTS = ("brats2021", "brats2023", "upenn", "msd")

# Per label convention: the allowed values, the label sets of the three regions, and the single
# label each region difference maps back to (for writing predictions in the dataset's own terms).
LABEL_CONVENTIONS: dict[str, dict] = {
    "brats": {
        "labels": (0, 1, 2, 4), "wt": (1, 2, 4), "tc": (1, 4), "et": (4,),
        "necrotic": 1, "oedema": 2, "enhancing": 4,
    },
    "brats2023": {
        "labels": (0, 1, 2, 3), "wt": (1, 2, 3), "tc": (1, 3), "et": (3,),
        "necrotic": 1, "oedema": 2, "enhancing": 3,
    },
    "msd": {
        "labels": (0, 1, 2, 3), "wt": (1, 2, 3), "tc": (2, 3), "et": (3,),
        "necrotic": 2, "oedema": 1, "enhancing": 3,
    },
}
# Layout -> name of its label convention in LABEL_CONVENTIONS.
LAYOUT_CONVENTIONS: dict[str, str] = {
    "brats2021": "brats", "brats2023": "brats2023", "upenn": "brats", "msd": "msd",
}

_NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# dataset.json modality names (lower-cased) -> canonical modality.
_MSD_MODALITY_NAMES = {
    "flair": "flair", "t2f": "flair", "t1w": "t1", "t1": "t1", "t1n": "t1",
    "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce", "t2w": "t2", "t2": "t2",
}
# Everything nibabel raises on a truncated, corrupt or unreadable file (OSError covers
# gzip.BadGzipFile; MemoryError a header that claims more than fits; KeyError an unknown code in
# nibabel's code tables).
_READ_ERRORS = (EOFError, zlib.error, OSError, ImageFileError, HeaderDataError, ValueError,
                OverflowError, MemoryError, struct.error, KeyError)

# The NIfTI data types a scan or a label map may be stored in: real scalars. Complex, RGB and
# float128 voxels are no MRI intensities this code can train on.
_SUPPORTED_DATATYPES = {
    2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8,
    512: np.uint16, 768: np.uint32, 1024: np.int64, 1280: np.uint64,
}
# A header claiming more than this is refused before anything is allocated: a 1 mm whole body
# is ~1e8 voxels, an MSD 4D volume 3.6e7.
_MAX_VOXELS = 2**31
_MAX_DATA_BYTES = 2**33
# Spatial voxel sizes of the affine and pixdim[1:4] must agree to this relative tolerance
# (float32 rounding is ~1e-7; a corrupted field is off by far more).
_PIXDIM_RTOL = 1e-3
# The affine's axes must span a volume: |det| / (product of the axis lengths) above this
# (1 for orthogonal axes; 0 for a flat, singular grid).
_MIN_AXIS_INDEPENDENCE = 1e-3
# A case's files are on the same grid when their affines put every voxel of the grid within this
# fraction of the smallest voxel size of each other.
_SAME_GRID_VOXELS = 0.01
# gzip is decompressed in chunks of this size when counting a .nii.gz's bytes.
_COUNT_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class _FolderLayout:
  """File naming of one case-folder layout: CASE + separator + suffix + .nii[.gz]."""
  name: str
  separator: str
  image_suffixes: Mapping[str, str]  # canonical modality -> suffix
  label_suffix: str

  def roles(self) -> dict[str, str]:
    """Role (canonical modality or "label") -> suffix."""
    return {**self.image_suffixes, "label": self.label_suffix}

  def pattern(self) -> str:
    """Human-readable file pattern, for error messages."""
    suffixes = [self.separator + s for s in self.roles().values()]
    return f"CASE/CASE{suffixes[0]}.nii.gz, {', '.join(suffixes[1:])}"


_FOLDER_LAYOUTS = (
    _FolderLayout("brats2021", "_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
                  "seg"),
    _FolderLayout("brats2023", "-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
                  "seg"),
    _FolderLayout("upenn", "_", {"t1": "T1", "t1ce": "T1GD", "t2": "T2", "flair": "FLAIR"},
                  "segm"),
)
_FOLDER_LAYOUT_BY_NAME = {layout.name: layout for layout in _FOLDER_LAYOUTS}


def _expected_layouts_text() -> str:
  parts = [f"{layout.name} ({layout.pattern()})" for layout in _FOLDER_LAYOUTS]
  parts.append("msd (dataset.json, imagesTr/*.nii.gz, labelsTr/*.nii.gz)")
  return "expected one of: " + "; ".join(parts) + "; or a single case folder of the first three"


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """The files of one case.

  Attributes:
    case_id: The case folder's name (folder layouts) or the image file's stem (msd).
    layout: One of `LAYOUTS`.
    images: Canonical modality -> file; for msd all four are the same 4D file.
    label: The label volume, or None where the case has none.
    channels: msd only: canonical modality -> channel index in the 4D file.
  """
  case_id: str
  layout: str
  images: dict[str, pathlib.Path]
  label: pathlib.Path | None
  channels: dict[str, int] | None = None

  @property
  def label_convention(self) -> str:
    """Name of this case's label convention, a key of `LABEL_CONVENTIONS`."""
    return LAYOUT_CONVENTIONS[self.layout]


@dataclasses.dataclass(frozen=True)
class SourceGeometry:
  """What is needed to map canonical arrays back to a source file's voxel grid and header.

  Attributes:
    path: The file whose geometry this is (the first image loaded).
    shape: Its spatial shape (X, Y, Z) in source voxel order.
    affine: Its affine (nibabel's best affine: sform if set, else qform).
    header: A copy of its header (qform/sform codes, units, descriptions).
    to_canonical: nibabel orientation transform, source axes -> RAS canonical axes.
    image_class: The nibabel image class to write (Nifti1Image or Nifti2Image).
  """
  path: pathlib.Path
  shape: tuple[int, int, int]
  affine: np.ndarray
  header: nib.nifti1.Nifti1Header
  to_canonical: np.ndarray
  image_class: type


@dataclasses.dataclass
class Volume:
  """One loaded case, in RAS canonical orientation.

  Attributes:
    case_id: The case's id.
    images: Canonical modality -> float32 (X, Y, Z) raw intensities (scaling applied), a
      constant background other than 0 set to 0 (`checks.zero_background`).
    label: uint8 (X, Y, Z) raw label values, or None.
    affine: The canonical (RAS) affine.
    spacing: Voxel size in mm along the canonical axes.
    source: Geometry of the source file, to undo the reorientation.
    backgrounds: Modality -> the value of its file's constant background, where it was not 0
      and was set to 0 (`checks.constant_background`); the other modalities are absent.
  """
  case_id: str
  images: dict[str, np.ndarray]
  label: np.ndarray | None
  affine: np.ndarray
  spacing: tuple[float, float, float]
  source: SourceGeometry
  backgrounds: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_source_orientation(self, array_xyz: np.ndarray) -> np.ndarray:
    """Maps a canonical (X, Y, Z, ...) array back to the source file's voxel order.

    Args:
      array_xyz: An array whose first three axes are this volume's canonical axes.

    Returns:
      The array with its first three axes permuted/flipped to the source voxel order (a view
      where possible).
    """
    if tuple(array_xyz.shape[:3]) != self.shape:
      raise ValueError(f"array shape {array_xyz.shape} does not start with the canonical shape "
                       f"{self.shape}")
    back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"),
                                       self.source.to_canonical)
    # The canonical axes are RAS by construction; `to_canonical` describes the source axes in
    # RAS terms, so this transform is its exact inverse.
    return orientations.apply_orientation(array_xyz, back)

  @property
  def shape(self) -> tuple[int, int, int]:
    """The canonical spatial shape (X, Y, Z)."""
    perm = self.source.to_canonical[:, 0].astype(int)
    shape = [0, 0, 0]
    for source_axis, canonical_axis in enumerate(perm):
      shape[canonical_axis] = self.source.shape[source_axis]
    return tuple(shape)

  def to_source_image(self, array_xyz: np.ndarray, *,
                      dtype: np.dtype | type | None = None) -> nib.spatialimages.SpatialImage:
    """Builds a NIfTI image of a canonical array on the source file's grid and header.

    The result has the source file's shape, affine and qform/sform codes, so viewers and
    evaluation tools overlay it exactly on the input scan.

    Args:
      array_xyz: Canonical (X, Y, Z) array, e.g. a predicted label map.
      dtype: On-disk data type; defaults to the array's dtype.

    Returns:
      A nibabel image ready for `nib.save`.
    """
    data = np.ascontiguousarray(self.to_source_orientation(array_xyz))
    header = self.source.header.copy()
    # The source's intensity scaling and display range do not apply to new data.
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = 0
    header["cal_max"] = 0
    header.set_data_dtype(np.dtype(dtype) if dtype is not None else data.dtype)
    # affine equal to the header's best affine: nibabel keeps the header's q/sform and codes.
    return self.source.image_class(data, self.source.affine, header)


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text or type(error).__name__


def _nifti_stem(name: str) -> str | None:
  """The name without .nii/.nii.gz, or None for a non-NIfTI or hidden/macOS junk file."""
  if name.startswith("."):
    return None
  lower = name.lower()
  for ext in _NIFTI_EXTENSIONS:
    if lower.endswith(ext):
      return name[:-len(ext)]
  return None


def _list_dir(folder: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """(non-hidden files, non-hidden subfolders) of a folder, sorted by name."""
  files, dirs = [], []
  with os.scandir(folder) as entries:
    for entry in entries:
      if entry.name.startswith("."):  # .DS_Store, ._* resource forks, .ipynb_checkpoints
        continue
      if entry.is_dir():
        dirs.append(pathlib.Path(entry.path))
      elif entry.is_file():
        files.append(pathlib.Path(entry.path))
  return sorted(files), sorted(dirs)


@dataclasses.dataclass
class _FolderMatch:
  layout: _FolderLayout
  files: dict[str, list[tuple[pathlib.Path, str]]]  # role -> [(file, case prefix)]
  exact_case: int  # roles whose suffix matched with the exact letter case

  @property
  def score(self) -> tuple[int, int]:
    return (len(self.files), self.exact_case)


def _match_folder(files: Sequence[pathlib.Path], layout: _FolderLayout) -> _FolderMatch:
  matched: dict[str, list[tuple[pathlib.Path, str]]] = {}
  exact = set()
  for path in files:
    stem = _nifti_stem(path.name)
    if stem is None:
      continue
    for role, suffix in layout.roles().items():
      tail = layout.separator + suffix
      if len(stem) > len(tail) and stem.lower().endswith(tail.lower()):
        matched.setdefault(role, []).append((path, stem[:-len(tail)]))
        if stem.endswith(tail):
          exact.add(role)
  return _FolderMatch(layout, matched, len(exact))


def _best_folder_match(files: Sequence[pathlib.Path]) -> _FolderMatch | None:
  """The folder layout matching most file roles (ties: exact letter case, then layout order)."""
  best = None
  for layout in _FOLDER_LAYOUTS:
    match = _match_folder(files, layout)
    if match.files and (best is None or match.score > best.score):
      best = match
  return best


def _is_msd(root: pathlib.Path) -> bool:
  return ((root / "dataset.json").is_file() or (root / "imagesTr").is_dir()
          or (root / "imagesTs").is_dir())


def _require_folder(root: pathlib.Path) -> None:
  if not root.exists():
    raise UserError(f"{root}: no such folder")
  if not root.is_dir():
    raise UserError(f"{root}: not a folder; expected a data folder of case folders")


def detect_layout(root: str | os.PathLike) -> str:
  """Detects which of the four dataset layouts a data folder (or single case folder) has.

  Args:
    root: The data folder, an msd task folder, or a single case folder.

  Returns:
    One of `LAYOUTS`.

  Raises:
    UserError: The folder is missing or empty, its case folders mix layouts, or nothing in it
      matches a known layout.
  """
  root = pathlib.Path(root)
  _require_folder(root)
  if _is_msd(root):
    return "msd"
  files, dirs = _list_dir(root)
  if not files and not dirs:
    raise UserError(f"{root}: empty folder; {_expected_layouts_text()}")
  match = _best_folder_match(files)
  if match is not None:
    return match.layout.name  # root is itself a case folder
  found: dict[str, pathlib.Path] = {}
  for folder in dirs:
    sub_match = _best_folder_match(_list_dir(folder)[0])
    if sub_match is not None:
      found.setdefault(sub_match.layout.name, folder)
  if len(found) > 1:
    examples = ", ".join(f"{folder} is {name}" for name, folder in found.items())
    raise UserError(f"{root}: case folders mix dataset layouts ({examples})")
  if not found:
    entries = [p.name for p in (files + dirs)[:5]]
    raise UserError(f"{root}: unknown dataset layout (found {', '.join(entries)}"
                    f"{', ...' if len(files) + len(dirs) > 5 else ''}); "
                    f"{_expected_layouts_text()}")
  return next(iter(found))


def _folder_case(folder: pathlib.Path, layout: _FolderLayout) -> CaseFiles:
  """The CaseFiles of one case folder, strictly: every modality present exactly once."""
  match = _match_folder(_list_dir(folder)[0], layout)
  if not match.files:
    raise UserError(f"{folder}: not a {layout.name} case folder: no file matches "
                    f"{layout.pattern()}")
  for role, hits in match.files.items():
    if len(hits) > 1:
      names = ", ".join(path.name for path, _ in hits)
      raise UserError(f"{folder}: several files for {role}: {names}")
  prefixes = {hits[0][1] for hits in match.files.values()}
  if len(prefixes) > 1:
    names = ", ".join(hits[0][0].name for hits in match.files.values())
    raise UserError(f"{folder}: files of different cases in one case folder: {names}")
  prefix = prefixes.pop()
  for modality in MODALITIES:
    if modality not in match.files:
      expected = f"{prefix}{layout.separator}{layout.image_suffixes[modality]}.nii.gz"
      raise UserError(f"{folder}: case folder is missing the {modality} image "
                      f"(expected {expected})")
  images = {m: match.files[m][0][0] for m in MODALITIES}
  label = match.files["label"][0][0] if "label" in match.files else None
  return CaseFiles(case_id=folder.name, layout=layout.name, images=images, label=label)


def _msd_channels(root: pathlib.Path) -> dict[str, int]:
  """Canonical modality -> channel index, from dataset.json's "modality" entry."""
  path = root / "dataset.json"
  if not path.is_file():
    raise UserError(f"{path}: missing; an msd folder needs dataset.json for the channel order")
  try:
    info = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise UserError(f"{path}: unreadable JSON ({_one_line(error)})") from error
  entry = info.get("modality") if isinstance(info, dict) else None
  if not isinstance(entry, dict):
    raise UserError(f"{path}: no \"modality\" object (expected e.g. "
                    "{\"0\": \"FLAIR\", \"1\": \"T1w\", \"2\": \"t1gd\", \"3\": \"T2w\"})")
  channels: dict[str, int] = {}
  for key, name in entry.items():
    canonical = _MSD_MODALITY_NAMES.get(str(name).strip().lower())
    if canonical is None or not str(key).strip().isdigit():
      raise UserError(f"{path}: unknown modality entry {key!r}: {name!r} (known names: "
                      f"{', '.join(sorted(_MSD_MODALITY_NAMES))})")
    if canonical in channels:
      raise UserError(f"{path}: modality {canonical} listed twice")
    channels[canonical] = int(key)
  missing = [m for m in MODALITIES if m not in channels]
  if missing:
    raise UserError(f"{path}: \"modality\" lacks {', '.join(missing)}")
  return {m: channels[m] for m in MODALITIES}


def _msd_cases(root: pathlib.Path) -> list[CaseFiles]:
  channels = _msd_channels(root)
  cases: dict[str, CaseFiles] = {}
  for images_name, labels_name in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
    images_dir = root / images_name
    if not images_dir.is_dir():
      continue
    labels = {}
    if (root / labels_name).is_dir():
      for path in _list_dir(root / labels_name)[0]:
        stem = _nifti_stem(path.name)
        if stem is not None:
          labels[stem] = path
    for path in _list_dir(images_dir)[0]:
      stem = _nifti_stem(path.name)
      if stem is None:
        continue
      if stem in cases:
        raise UserError(f"{path}: case {stem} appears twice (also {cases[stem].images['t1']})")
      cases[stem] = CaseFiles(case_id=stem, layout="msd", images={m: path for m in MODALITIES},
                              label=labels.get(stem), channels=dict(channels))
  if not cases:
    raise UserError(f"{root}: msd folder without cases; expected imagesTr/*.nii.gz "
                    "(or imagesTs/*.nii.gz)")
  return [cases[k] for k in sorted(cases)]


def find_cases(root: str | os.PathLike) -> list[CaseFiles]:
  """Lists every case under a data folder (or the single case a case folder holds).

  Args:
    root: The data folder, an msd task folder, or a single case folder.

  Returns:
    The cases, sorted by case_id.

  Raises:
    UserError: Missing or empty folder, unknown or mixed layout, a case folder without the
      files of its layout, a case folder missing a modality file, duplicate files.
  """
  root = pathlib.Path(root)
  layout_name = detect_layout(root)
  if layout_name == "msd":
    return _msd_cases(root)
  layout = _FOLDER_LAYOUT_BY_NAME[layout_name]
  files, dirs = _list_dir(root)
  if _best_folder_match(files) is not None:
    return [_folder_case(root, layout)]
  cases = [_folder_case(folder, layout) for folder in dirs]
  return sorted(cases, key=lambda case: case.case_id)


def _check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in MODALITIES]
  if unknown or not modalities or len(set(modalities)) != len(modalities):
    raise UserError(f"modalities {list(modalities)}: expected distinct names from "
                    f"{list(MODALITIES)}")
  return modalities


def _shape_text(sizes: Iterable[object]) -> str:
  """12x10x6: a shape or voxel sizes, as messages write them."""
  return "x".join(str(n) for n in sizes)


def _gzip_problem(path: pathlib.Path, error: BaseException) -> UserError:
  if isinstance(error, gzip.BadGzipFile) and "Not a gzipped file" in str(error):
    return UserError(f"{path}: not gzip-compressed ({_one_line(error)}); a .nii.gz must be gzip "
                     "data (an uncompressed file should be named .nii)")
  return UserError(f"{path}: truncated or corrupt NIfTI ({_one_line(error)})")


def _read_head(path: pathlib.Path, compressed: bool) -> bytes:
  """The first bytes of the (decompressed) file: room for a NIfTI-2 header and its extender."""
  try:
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
      return f.read(nib.nifti2.header_dtype.itemsize + 4)
  except FileNotFoundError as error:
    raise UserError(f"{path}: file not found") from error
  except (OSError, EOFError, zlib.error) as error:
    raise _gzip_problem(path, error) from error


def _decompressed_size(path: pathlib.Path, *, limit: int) -> int:
  """The decompressed size of a gzip file, counted in chunks (never held whole); stops counting
  once it exceeds ``limit``. gzip checks each member's CRC32 and length as it ends."""
  total = 0
  try:
    with gzip.open(path, "rb") as f:
      while total <= limit:
        chunk = f.read(_COUNT_CHUNK)
        if not chunk:
          break
        total += len(chunk)
  except gzip.BadGzipFile as error:
    # The file began as gzip (its header was read), so this comes after a complete member.
    if "Not a gzipped file" in str(error):
      raise UserError(f"{path}: bytes after the end of the gzip data are no gzip data "
                      f"({_one_line(error)}); the file is corrupt") from error
    raise _gzip_problem(path, error) from error
  except (OSError, EOFError, zlib.error) as error:
    raise _gzip_problem(path, error) from error
  return total


def _check_header(path: pathlib.Path, *, ndim: int) -> tuple[np.void, tuple[int, ...]]:
  """UserError unless a file's NIfTI header is self-consistent and matches the file's size.

  Runs before nibabel reads anything, on the raw header: a file that passes holds exactly the
  voxels its header describes, in a data type this code reads, so nibabel cannot read it as
  something else (header bytes as voxels, a slice dropped, int16 bytes as uint8).

  Returns:
    The raw header record (fields as in nibabel's header dtype) and the image's shape.
  """
  compressed = path.name.lower().endswith(".gz")
  head = _read_head(path, compressed)
  if len(head) < 4:
    raise UserError(f"{path}: {len(head)} bytes; too short for a NIfTI header (348 bytes)")
  for endian in "<>":
    sizeof_hdr = int(np.frombuffer(head[:4], f"{endian}i4")[0])
    if sizeof_hdr in (348, 540):
      break
  else:
    if head[:2] == b"\x1f\x8b":
      raise UserError(f"{path}: gzip-compressed data in a .nii file; name it .nii.gz")
    raise UserError(f"{path}: not a NIfTI file (sizeof_hdr is {sizeof_hdr}, expected 348 for "
                    "NIfTI-1 or 540 for NIfTI-2)")
  version = 1 if sizeof_hdr == 348 else 2
  header_dtype = (nib.nifti1 if version == 1 else nib.nifti2).header_dtype.newbyteorder(endian)
  if len(head) < header_dtype.itemsize:
    raise UserError(f"{path}: the file ends inside its {sizeof_hdr}-byte NIfTI-{version} header")
  header = np.frombuffer(head[:header_dtype.itemsize], header_dtype)[0]

  magic = bytes(header["magic"])
  if magic == b"ni1":
    raise UserError(f"{path}: magic 'ni1' marks the header of a .hdr/.img pair; expected a "
                    "single-file NIfTI (magic 'n+1')")
  if not magic.startswith(b"n+1" if version == 1 else b"n+2"):
    raise UserError(f"{path}: not a single-file NIfTI-{version} (magic {magic!r}, expected "
                    f"'n+{version}')")

  dim = [int(d) for d in header["dim"]]
  if not 1 <= dim[0] <= 7:
    raise UserError(f"{path}: dim[0] is {dim[0]}; a NIfTI image has 1 to 7 dimensions")
  shape = tuple(dim[1:dim[0] + 1])
  for axis, n in enumerate(shape, 1):
    if n == 0:
      raise UserError(f"{path}: dim[{axis}] is 0: axis {axis} of the image is empty (no voxels)")
    if n < 0:
      raise UserError(f"{path}: dim[{axis}] is {n}, negative; the header is corrupt")
  if len(shape) != ndim:
    raise UserError(f"{path}: expected a {ndim}D image, got shape {shape}")
  voxels = math.prod(shape)
  if voxels > _MAX_VOXELS:
    raise UserError(f"{path}: header claims {_shape_text(shape)} = {voxels} voxels, more than "
                    f"the {_MAX_VOXELS} of any MRI volume; the header is corrupt")

  code, bitpix = int(header["datatype"]), int(header["bitpix"])
  if code not in _SUPPORTED_DATATYPES:
    known = nib.nifti1.data_type_codes
    if code in known.code:
      raise UserError(f"{path}: data type {known.label[code]} (code {code}) is not supported; "
                      "expected integer or real voxels")
    raise UserError(f"{path}: datatype code {code} is no NIfTI data type; the header is corrupt")
  dtype = np.dtype(_SUPPORTED_DATATYPES[code])
  if bitpix != dtype.itemsize * 8:
    raise UserError(f"{path}: bitpix {bitpix} disagrees with datatype {dtype.name} "
                    f"({dtype.itemsize * 8} bits); the header is corrupt")
  data_bytes = voxels * dtype.itemsize
  if data_bytes > _MAX_DATA_BYTES:
    raise UserError(f"{path}: header claims {_shape_text(shape)} {dtype.name} = {data_bytes} "
                    f"bytes of data, more than {_MAX_DATA_BYTES}; the header is corrupt")

  offset = float(header["vox_offset"])
  minimum = sizeof_hdr + 4  # the header, then the 4-byte extension flag
  if not math.isfinite(offset) or offset != int(offset):
    raise UserError(f"{path}: vox_offset {offset} is not a whole number of bytes")
  offset = int(offset)
  if offset < minimum:
    raise UserError(f"{path}: vox_offset {offset} is below {minimum}: the voxels would start "
                    "inside the header")
  if offset % 16:
    raise UserError(f"{path}: vox_offset {offset} is not a multiple of 16 as NIfTI requires")

  for axis in range(1, min(len(shape), 3) + 1):
    size = float(header["pixdim"][axis])
    if not (math.isfinite(size) and size > 0):
      raise UserError(f"{path}: pixdim[{axis}] is {size:g}; a voxel size must be finite and "
                      "positive")
  slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
  # Slope 0 (the standard) or NaN (nibabel's writer) means "no scaling"; inf means nothing.
  if math.isinf(slope):
    raise UserError(f"{path}: scl_slope is {slope:g}; the intensity scaling is corrupt")
  if slope != 0 and math.isfinite(slope) and not math.isfinite(inter):
    raise UserError(f"{path}: scl_inter is {inter:g} with scl_slope {slope:g}; the intensity "
                    "scaling is corrupt")
  for field in ("qform_code", "sform_code"):
    if int(header[field]) not in nib.nifti1.xform_codes.code:
      raise UserError(f"{path}: {field} {int(header[field])} is no NIfTI transform code (0-5)")

  if compressed:
    file_bytes = _decompressed_size(path, limit=offset + data_bytes)
  else:
    file_bytes = path.stat().st_size
  held = file_bytes - offset
  if held != data_bytes:
    if compressed and held > data_bytes:  # counting stopped past the claim: not exact
      what = f"more after vox_offset {offset}"
    elif held >= 0:
      what = f"{held} after vox_offset {offset}"
    else:
      what = f"only {file_bytes} in all, less than vox_offset {offset}"
    why = "truncated or a wrong dim" if held < data_bytes else "trailing bytes or a wrong dim"
    raise UserError(f"{path}: header says {_shape_text(shape)} {dtype.name} = {data_bytes} "
                    f"bytes of data but the {'decompressed ' if compressed else ''}file holds "
                    f"{what}: {why} or datatype")
  return header, shape


def _check_affine(path: pathlib.Path, image, header: np.void) -> None:
  """UserError unless the affine nibabel picked (sform, else qform, else pixdim) is finite and
  non-singular, its voxel sizes are pixdim's, and a set qform and sform agree on orientation."""
  try:
    affine = np.asarray(image.affine, np.float64)
    forms = {"sform": image.header.get_sform(), "qform": image.header.get_qform()}
  except _READ_ERRORS as error:
    raise UserError(f"{path}: corrupt qform/sform ({_one_line(error)})") from error
  source = ("sform" if int(header["sform_code"]) else "qform" if int(header["qform_code"])
            else "pixdim")
  if not np.all(np.isfinite(affine)):
    raise UserError(f"{path}: the affine ({source}) has non-finite entries; the header is "
                    "corrupt")
  linear = affine[:3, :3]
  sizes = np.linalg.norm(linear, axis=0)
  if not np.all(sizes > 0) or (abs(np.linalg.det(linear)) / np.prod(sizes)
                               < _MIN_AXIS_INDEPENDENCE):
    raise UserError(f"{path}: the affine ({source}) is singular (its voxel axes do not span a "
                    "volume); the header is corrupt")
  pixdim = np.asarray(header["pixdim"][1:4], np.float64)
  if not np.allclose(sizes, pixdim, rtol=_PIXDIM_RTOL, atol=0):
    raise UserError(f"{path}: the affine ({source}) has voxel sizes "
                    f"{_shape_text(f'{s:.4g}' for s in sizes)} mm but pixdim says "
                    f"{_shape_text(f'{s:.4g}' for s in pixdim)}; one of them is corrupt")
  if int(header["sform_code"]) and int(header["qform_code"]):
    codes = {}
    for name, form in forms.items():
      ornt = orientations.io_orientation(form) if np.all(np.isfinite(form)) else None
      codes[name] = ("?" if ornt is None or np.isnan(ornt).any()
                     else "".join(orientations.ornt2axcodes(ornt)))
    if codes["sform"] != codes["qform"]:
      raise UserError(f"{path}: sform says orientation {codes['sform']} but qform says "
                      f"{codes['qform']}; one of them is corrupt")


def _open(path: pathlib.Path, *, ndim: int) -> nib.spatialimages.SpatialImage:
  """Checks a NIfTI file (`_check_header`, `_check_affine`) and opens it (no voxel data yet)."""
  header, _ = _check_header(path, ndim=ndim)
  try:
    image = nib.load(path)
  except FileNotFoundError as error:
    raise UserError(f"{path}: file not found") from error
  except _READ_ERRORS as error:
    raise UserError(f"{path}: truncated or corrupt NIfTI ({_one_line(error)})") from error
  if len(image.shape) != ndim:
    raise UserError(f"{path}: expected a {ndim}D image, got shape {tuple(image.shape)}")
  _check_affine(path, image, header)
  return image


def _read(path: pathlib.Path, image, index=()) -> np.ndarray:
  """Reads voxel data (optionally a slice of it) with the scaling applied, native dtype."""
  try:
    # dataobj keeps the on-disk dtype (int16 for most scans) where get_fdata would make float64.
    return np.asanyarray(image.dataobj[index] if index != () else image.dataobj)
  except _READ_ERRORS as error:
    raise UserError(f"{path}: truncated or corrupt NIfTI ({_one_line(error)})") from error


def _to_float_image(path: pathlib.Path, data: np.ndarray) -> np.ndarray:
  data = data.astype(np.float32, copy=False)
  bad = np.count_nonzero(~np.isfinite(data))
  if bad:
    raise UserError(f"{path}: {bad} NaN or infinite voxels")
  return data


def _to_label(path: pathlib.Path, data: np.ndarray, *, convention: str) -> np.ndarray:
  allowed = LABEL_CONVENTIONS[convention]["labels"]
  if data.dtype == np.uint8:
    # bincount is much faster than unique on the 9M voxels of a BraTS volume.
    found = np.flatnonzero(np.bincount(data.ravel(), minlength=1))
  else:
    found = np.unique(data)
  bad = [v for v in found.tolist() if v not in allowed]
  if bad:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in found.tolist()[:20])
    raise UserError(f"{path}: unexpected label values {bad[:20]} (found {shown}; allowed for "
                    f"the {convention} convention: {list(allowed)})")
  return data.astype(np.uint8, copy=False)


def _orientation(path: pathlib.Path, image) -> np.ndarray:
  ornt = orientations.io_orientation(image.affine)
  if np.isnan(ornt).any():
    raise UserError(f"{path}: degenerate affine, cannot determine the voxel orientation")
  return ornt


def load_case(case: CaseFiles, *, modalities: Sequence[str] = MODALITIES,
              with_label: bool = True) -> Volume:
  """Loads the requested modalities (and the label) of one case in RAS canonical orientation.

  Only the requested modalities are read (unpaired training needs one per case); an msd 4D file
  is decompressed once per call. An image whose background is a constant other than 0 (the
  volume's minimum, e.g. a z-scored brain's; `checks.constant_background`) has it set to 0 here,
  the one place every command reads through, and its value recorded in `Volume.backgrounds`.

  Args:
    case: The case, from `find_cases`.
    modalities: Canonical modality names to load.
    with_label: Whether to load the label volume (where the case has one).

  Returns:
    The `Volume`; its label is None where the case has none or with_label is False.

  Raises:
    UserError: Truncated or corrupt file, wrong dimensionality, files of different shapes or
      orientations, NaN/inf image voxels, label values outside the case's convention.
  """
  modalities = _check_modalities(modalities)
  missing = [m for m in modalities if m not in case.images]
  if missing:
    raise UserError(f"case {case.case_id}: no file for {', '.join(missing)}")

  raw: dict[str, np.ndarray] = {}
  if case.layout == "msd":
    path = case.images[modalities[0]]
    image = _open(path, ndim=4)
    n_channels = max(case.channels.values()) + 1
    if image.shape[3] != n_channels:
      raise UserError(f"{path}: expected {n_channels} channels in axis 3, got shape "
                      f"{tuple(image.shape)}")
    if len(modalities) == 1:
      # A single channel: slicing the proxy never holds the other three in memory.
      channel = _read(path, image, (..., case.channels[modalities[0]]))
      raw[modalities[0]] = _to_float_image(path, channel)
    else:
      data = _read(path, image)
      for m in modalities:
        raw[m] = _to_float_image(path, data[..., case.channels[m]])
      del data
    reference = (path, image, tuple(image.shape[:3]), _orientation(path, image))
  else:
    reference = None
    for m in modalities:
      path = case.images[m]
      image = _open(path, ndim=3)
      ornt = _orientation(path, image)
      if reference is None:
        reference = (path, image, tuple(image.shape), ornt)
      else:
        _check_same_grid(reference, path, image, ornt)
      raw[m] = _to_float_image(path, _read(path, image))

  label = None
  if with_label and case.label is not None:
    image = _open(case.label, ndim=3)
    _check_same_grid(reference, case.label, image, _orientation(case.label, image))
    label = _to_label(case.label, _read(case.label, image), convention=case.label_convention)

  backgrounds = {}
  for m in modalities:
    raw[m], value = checks.zero_background(raw[m])
    if value is not None:
      backgrounds[m] = value

  ref_path, ref_image, ref_shape, ref_ornt = reference
  to_canonical = ref_ornt  # io_orientation: for each source axis, its RAS axis and flip
  canonical_affine = ref_image.affine @ orientations.inv_ornt_aff(to_canonical, ref_shape)
  images = {m: np.ascontiguousarray(orientations.apply_orientation(a, to_canonical))
            for m, a in raw.items()}
  if label is not None:
    label = np.ascontiguousarray(orientations.apply_orientation(label, to_canonical))
  spacing = tuple(float(s) for s in np.linalg.norm(canonical_affine[:3, :3], axis=0))
  source = SourceGeometry(path=ref_path, shape=ref_shape, affine=np.array(ref_image.affine),
                          header=ref_image.header.copy(), to_canonical=to_canonical,
                          image_class=type(ref_image))
  return Volume(case_id=case.case_id, images=images, label=label, affine=canonical_affine,
                spacing=spacing, source=source, backgrounds=backgrounds)


def _check_same_grid(reference, path: pathlib.Path, image, ornt: np.ndarray) -> None:
  """UserError unless a file has the reference file's spatial shape, voxel orientation and
  affine (every voxel of the grid within `_SAME_GRID_VOXELS` of a voxel size of its place in the
  reference)."""
  ref_path, ref_image, ref_shape, ref_ornt = reference
  shape = tuple(image.shape[:3])
  if shape != ref_shape:
    raise UserError(f"{path}: shape {shape} differs from {ref_path} shape {ref_shape}")
  if not np.array_equal(ornt, ref_ornt):
    codes = "".join(orientations.ornt2axcodes(ornt))
    ref_codes = "".join(orientations.ornt2axcodes(ref_ornt))
    raise UserError(f"{path}: voxel orientation {codes} differs from {ref_path} orientation "
                    f"{ref_codes}; the volumes would not line up")
  # The grid's corners bound how far any voxel moves between two affines (affine maps).
  corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                      for k in (0, shape[2] - 1)]).T
  ref_affine = np.asarray(ref_image.affine, np.float64)
  apart = float(np.max(np.linalg.norm(
      (np.asarray(image.affine, np.float64) @ corners - ref_affine @ corners)[:3], axis=0)))
  tolerance = _SAME_GRID_VOXELS * float(np.min(np.linalg.norm(ref_affine[:3, :3], axis=0)))
  if apart > tolerance:
    raise UserError(f"{path}: affine differs from {ref_path}'s: voxels up to {apart:.3g} mm "
                    f"apart (tolerance {tolerance:.3g} mm); the volumes would not line up")


def _convention(convention: str) -> dict:
  """The convention dict for a convention name or a layout name."""
  name = LAYOUT_CONVENTIONS.get(convention, convention)
  if name not in LABEL_CONVENTIONS:
    raise ValueError(f"unknown label convention {convention!r}; expected one of "
                     f"{sorted(LABEL_CONVENTIONS)} or a layout {list(LAYOUTS)}")
  return LABEL_CONVENTIONS[name]


def labels_to_regions(label: np.ndarray, *, convention: str) -> np.ndarray:
  """Maps raw label values to the three nested BraTS regions.

  Args:
    label: Integer label array of any shape.
    convention: A key of `LABEL_CONVENTIONS` or a layout name.

  Returns:
    bool array of shape label.shape + (3,), channels (WT, TC, ET).
  """
  conv = _convention(convention)
  return np.stack([np.isin(label, conv[key]) for key in ("wt", "tc", "et")], axis=-1)


def regions_to_labels(regions: np.ndarray, *, convention: str) -> np.ndarray:
  """Maps region masks (e.g. thresholded predictions) back to the convention's labels.

  ET -> enhancing label; TC minus ET -> necrotic/non-enhancing label; WT minus TC -> oedema
  label. Inconsistent masks resolve towards the inner region (an ET voxel outside TC is
  enhancing), so the result never loses a voxel any region claims.

  Args:
    regions: bool or integer (0/1) array (..., 3), channels (WT, TC, ET). Threshold
      probabilities first: floating arrays are refused.
    convention: A key of `LABEL_CONVENTIONS` or a layout name.

  Returns:
    uint8 label array of shape regions.shape[:-1].
  """
  conv = _convention(convention)
  regions = np.asarray(regions)
  if regions.shape[-1:] != (3,):
    raise ValueError(f"regions must end in 3 channels (WT, TC, ET), got shape {regions.shape}")
  if np.issubdtype(regions.dtype, np.floating):
    raise ValueError("regions must be boolean masks; threshold probabilities first")
  regions = regions != 0
  labels = np.zeros(regions.shape[:-1], np.uint8)
  labels[regions[..., 0]] = conv["oedema"]
  labels[regions[..., 1]] = conv["necrotic"]
  labels[regions[..., 2]] = conv["enhancing"]
  return labels
