"""What the whole-volume commands (``translate``, ``predict``) share: input and output.

The model comes from `uagan_jax.inference.load_model`.

* `check_modality`, `check_trained_modality`: the ``--modality``-style arguments.
* `case_of_file`, `resolve_input`: ``--input`` as one NIfTI file or a one-case folder.
* `input_files`, `check_output`: an output is checked before any work is done; it is never one
  of the input case's files (the image read, its other modalities, its label).
* `format_spacing`: a voxel size in messages.
* `write_nifti`: the atomic write; the image itself comes from `readers.Volume.to_source_image`,
  which puts a canonical array back on the input file's grid with its shape, affine, qform/sform
  codes and header.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
from collections.abc import Mapping

import ml_collections
import nibabel as nib
import numpy as np

from uagan_jax.data import MODALITIES, readers
from uagan_jax.errors import UserError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# gzip level of .nii.gz outputs: nibabel's default, fast; higher levels gain little.
_GZIP_LEVEL = 1


def check_modality(name: str, *, flag: str = "--modality") -> str:
  """The canonical name of a modality given on the command line (case-insensitive).

  Args:
    name: A modality name, e.g. "t1" or "FLAIR".
    flag: How the caller names the value in messages, e.g. "--source".

  Returns:
    The lower-case name, one of `uagan_jax.data.MODALITIES`.

  Raises:
    UserError: The name is not a known modality.
  """
  canonical = str(name).strip().lower()
  if canonical not in MODALITIES:
    raise UserError(f"{flag} {name!r}: unknown modality; expected one of {', '.join(MODALITIES)}")
  return canonical


def _training_record(workdir: pathlib.Path | None) -> dict | None:
  """The workdir's ``splits.json`` (what training saw), or None where there is none; ``workdir``
  may be a model file (`model_file`), which carries its workdir's."""
  if workdir is None:
    return None
  from uagan_jax import model_file  # pylint: disable=g-import-not-at-top
  if model_file.is_model_file(workdir):
    return model_file.read_json(workdir, model_file.SPLITS)
  path = pathlib.Path(workdir) / "splits.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise UserError(f"{path}: cannot read it ({error})") from None


def workdir_splits(workdir: str | os.PathLike) -> dict:
  """A training workdir's ``splits.json``, for whoever needs its cases.

  Raises:
    UserError: The workdir has none (naming it), or it cannot be read.
  """
  record = _training_record(pathlib.Path(workdir))
  if record is None:
    raise UserError(f"{pathlib.Path(workdir) / 'splits.json'}: not found; is {workdir} a "
                    "training workdir?")
  return record


def trained_modalities(config: ml_collections.ConfigDict, *,
                       workdir: pathlib.Path | None = None) -> tuple[str, ...]:
  """The modalities a model was trained on (that got training slices), in canonical order.

  Read from the workdir's ``splits.json``: ``trained_modalities`` (what training saw), else, for
  a workdir written before that key, the modalities its ``train_modality`` assigned; without a
  ``splits.json`` (or ``workdir``), ``config.data.modalities``.
  """
  record = _training_record(workdir)
  if record is not None and "trained_modalities" in record:
    seen = set(record["trained_modalities"])
  elif record is not None and "train_modality" in record:
    seen = set(record["train_modality"].values())
  else:
    seen = set(config.data.modalities)
  return tuple(m for m in MODALITIES if m in seen and m in config.data.modalities)


def check_trained_modality(config: ml_collections.ConfigDict, modality: str, *, flag: str,
                           workdir: pathlib.Path, as_target: bool = False) -> None:
  """UserError unless the model was trained on ``modality``.

  A network has never seen the intensities of a modality outside its training set, and its
  modality code for it was never trained. As a translation target (``as_target``) such a
  modality is as untrained: the discriminator never saw a real image of it.
  """
  trained = trained_modalities(config, workdir=workdir)
  if modality in trained:
    return
  record = _training_record(workdir)
  if modality not in config.data.modalities or record is None:
    source = "config data.modalities"
  elif record.get("protocol", "unpaired") == "unpaired":
    source = (f"splits.json: under data.protocol unpaired each of its {len(record['train'])} "
              "training case(s) contributed one modality")
  else:
    source = (f"splits.json: none of its {len(record['train'])} training case(s) gave a "
              f"{modality} training slice")
  why = (f"; the discriminator never saw a real {modality} image, so translation into it is "
         "untrained" if as_target else "")
  raise UserError(f"{flag} {modality}: the model in {workdir} was trained on "
                  f"{', '.join(trained) or 'no modality'} only ({source}){why}")


def nifti_extension(path: pathlib.Path) -> str | None:
  """".nii.gz" or ".nii" where the file name ends so (any letter case), else None."""
  lower = path.name.lower()
  return next((ext for ext in NIFTI_EXTENSIONS if lower.endswith(ext)), None)


def case_of_file(path: str | os.PathLike, *, modality: str) -> readers.CaseFiles:
  """One NIfTI file as a case whose only image is ``modality``; its id is the file's stem.

  Raises:
    UserError: The path is missing, not a regular file or not a NIfTI file.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such file")
  if not path.is_file():
    raise UserError(f"{path}: not a regular file")
  extension = nifti_extension(path)
  if extension is None:
    raise UserError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
  return readers.CaseFiles(case_id=path.name[:-len(extension)], layout="brats2021",
                           images={modality: path}, label=None)


def resolve_input(path: str | os.PathLike, *, modality: str) -> readers.CaseFiles:
  """The case to read for ``--input``: a NIfTI file of ``modality``, or a one-case folder.

  Args:
    path: A .nii/.nii.gz file, or a folder of any `readers.LAYOUTS` holding exactly one case.
    modality: The canonical modality to read.

  Returns:
    A `readers.CaseFiles` whose ``images[modality]`` is the file to read.

  Raises:
    UserError: The path is missing, not a NIfTI file, or a folder without exactly one case.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    cases = readers.find_cases(path)
    if len(cases) != 1:
      raise UserError(f"{path}: holds {len(cases)} cases; give one case folder or one image file")
    return cases[0]
  return case_of_file(path, modality=modality)


def input_files(case: readers.CaseFiles, modality: str) -> dict[pathlib.Path, str]:
  """Every file of a case -> what it is, for `check_output`; the image read is "file"."""
  files = {}
  if case.label is not None:
    files[case.label] = "label file"
  for name, path in case.images.items():
    files[path] = f"{name} image"
  files[case.images[modality]] = "file"  # an msd case's four images are this one 4D file
  return files


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
  if a.resolve() == b.resolve():
    return True
  try:
    return a.exists() and os.path.samefile(a, b)  # a hard link
  except OSError:
    return False


def check_output(output: pathlib.Path, inputs: Mapping[pathlib.Path, str]) -> None:
  """UserError unless ``output`` is a NIfTI file name that can be written and is no input.

  Args:
    output: The .nii/.nii.gz file to write; it may exist (it is replaced), its folder need not.
    inputs: Files that must never be overwritten -> what they are ("file", "label file", ...).
  """
  if nifti_extension(output) is None:
    raise UserError(f"{output}: output must end in .nii.gz or .nii")
  if output.is_dir():
    raise UserError(f"{output}: is a folder; name the output file")
  for path, what in inputs.items():
    if _same_file(output, path):
      raise UserError(f"{output}: is the input {what}; refusing to overwrite it")
  # The nearest existing folder must take the new folders and the file: found now, not after
  # minutes of inference.
  folder = output.parent
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  if not folder.is_dir():
    raise UserError(f"{output}: cannot write: {folder} is not a folder")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise UserError(f"{output}: cannot write: no write permission in {folder}")


def load_brain_image(case: readers.CaseFiles, modality: str, *, verb: str,
                     log) -> tuple[readers.Volume, int]:
  """The loaded ``modality`` of ``case`` and its number of brain (non-zero) axial slices.

  Raises:
    UserError: every voxel is 0 (nothing to ``verb``).
  """
  image_file = case.images[modality]
  log(f"loading {image_file} ({modality})")
  volume = readers.load_case(case, modalities=(modality,), with_label=False)
  image = volume.images[modality]
  if not np.any(image):
    raise UserError(f"{image_file}: every voxel is 0 (empty or a failed conversion); there is "
                    f"no brain to {verb}")
  return volume, int(np.count_nonzero(np.any(image != 0, axis=(0, 1))))


def format_spacing(spacing) -> str:
  """A voxel size for messages, e.g. "0.9x0.9x0.9 mm"."""
  return "x".join(f"{float(v):.4g}" for v in spacing) + " mm"


def write_nifti(image: nib.spatialimages.SpatialImage, path: pathlib.Path) -> None:
  """Writes a NIfTI image atomically: a temporary file in the same folder, then a rename.

  The bytes are a pure function of the image (the gzip header carries no time stamp and no
  temporary file name), so the same input gives identical files. An existing file at ``path``
  stays intact until the rename replaces it.

  Args:
    image: A Nifti1Image or Nifti2Image.
    path: The .nii or .nii.gz file to (over)write; its folder is created.

  Raises:
    UserError: The folder or the file cannot be written (the message names the OS error).
  """
  data = image.to_bytes()
  if path.name.lower().endswith(".gz"):
    data = gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)
  # The same folder, so the rename stays on one file system and is atomic.
  temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
      with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(temporary, path)
    finally:
      temporary.unlink(missing_ok=True)
  except OSError as error:
    raise UserError(f"{path}: cannot write ({' '.join(str(error).split())})") from error
