"""Whole-volume segmentation: NIfTI scans in, tumour label maps on the scans' own grids out.

``uagan-jax predict --workdir W --input PATH --modality flair --output SEG.nii.gz`` segments with
the newest checkpoint (``--checkpoint best`` or ``STEP`` for another) of a trained model whose
family segments (`families.with_capability`); ``--model MODEL.zip`` in place of ``--workdir``
segments with a model file from ``uagan-jax export`` (`model_file`), identically; ``--workdir``
and ``--checkpoint`` given several times segment with an ensemble (`Ensemble`, pairing:
`inference.pair_models`). What ``PATH`` is decides what ``--output`` is:

* one .nii/.nii.gz image of modality ``--modality`` -> ``--output`` is one .nii/.nii.gz file;
* one case folder of any known layout (`readers.find_cases`) -> its ``--modality`` image is
  segmented, ``--output`` is one .nii/.nii.gz file;
* a data folder of case folders, or an msd task folder -> ``--output`` is a folder (created; not
  inside ``PATH``, where the readers would take it for a case) receiving ``<case_id>.nii.gz`` per
  case, the naming of BraTS submissions and nnU-Net. A progress line per case gives the count
  and an ETA.

Per image:

1. It is read like training data (`readers.load_case`: RAS canonical orientation, one-line
   `UserError`s for missing, truncated or NaN files). Where its voxel size differs from the one
   the model was trained at (config ``data.spacing``) by more than 1%, it is resampled to that
   spacing, linearly (`data.resample`; a line says so); within 1% it is used as it is.
2. It is z-scored over its brain (non-zero) voxels, clipped and cut into axial slices that hold
   its whole brain: the model's centre crop/pad to its slice size where that holds the brain,
   else a larger canvas around it (`preprocess.brain_window`; the networks are fully
   convolutional).
3. The brain slices go through the segmentor in fixed-size batches
   (`inference.segment_probabilities`, the code path of evaluation; with ``tta`` also their three
   in-plane mirrorings, the four outputs averaged) and are put back on the canonical grid: the
   crop/pad undone, the per-region probabilities resampled linearly onto the input's grid where
   the input was resampled (nnU-Net's way). An ensemble averages its models' probabilities
   there. They are thresholded at 0.5 and nested (`inference.to_regions`).
4. Where the model holds a ``postprocessing.json`` (chosen on its validation cases by
   ``uagan-jax postprocess``), its rule for ``--modality`` is applied to the nested regions
   (`postprocess`: small components removed, a small enhancing tumour relabelled); a line says
   which. ``--no-postprocessing``: not. An ensemble is not post-processed (the rules were chosen
   for one model's segmentations; a line says so where a model holds one).
5. The regions (WT, TC, ET) become labels (`readers.regions_to_labels`): ET -> enhancing,
   TC minus ET -> necrotic/non-enhancing core, WT minus TC -> oedema; the values are those of
   ``--labels``: brats (default; 1 NCR, 2 ED, 4 ET), brats2023 (1 NCR, 2 ED, 3 ET) or msd
   (Task01_BrainTumour: 1 oedema, 2 non-enhancing, 3 enhancing).
6. The label map is written as uint8 on the input file's grid: same shape, affine, qform/sform
   codes and header (`readers.Volume.to_source_image`, the reorientation undone), atomically
   (`volume_io.write_nifti`). An existing output is replaced, as ``uagan-jax translate`` does;
   a file of an input case (any modality, the label) never is. With ``save_probabilities`` the
   probabilities that were thresholded (before nesting) are written beside it
   (`probabilities_path`): float32 (X, Y, Z, 3), volumes WT, TC, ET, on the same grid and affine.

Every output is checked before the model is loaded, so a bad ``--output`` costs no inference.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from uagan_jax import config as config_lib
from uagan_jax import families, inference, model_file, postprocess, timing, volume_io
from uagan_jax.data import checks, readers, resample
from uagan_jax.errors import UserError

# --labels choices: the label conventions the readers know.
LABEL_CONVENTIONS = tuple(readers.LABEL_CONVENTIONS)
OUTPUT_DTYPE = np.uint8
# The probability maps of ``--save-probabilities``: beside the label file, this suffix on its stem.
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
# What their header says (descrip: 80 bytes at most; intent_name: 16).
PROBABILITIES_DESCRIP = "uagan-jax region probabilities; volumes 0, 1, 2 = WT, TC, ET"
PROBABILITIES_INTENT_NAME = "WT,TC,ET"


@dataclasses.dataclass(frozen=True)
class PredictionResult:
  """What `predict` did for one case.

  Attributes:
    case_id: The case's id (a file input: the file name without .nii/.nii.gz).
    output: The file written.
    image_file: The image that was segmented.
    modality: Its modality.
    labels: The label convention written, a key of `readers.LABEL_CONVENTIONS`.
    slices: How many axial slices of the input have brain voxels.
    spacing: The input's voxel size in mm (canonical X, Y, Z).
    resampled: Whether it was resampled to the model's spacing (``data.spacing``) and back.
    voxels: Label value -> voxel count, for the tumour labels.
    probabilities: The probability maps written (``save_probabilities``), else None.
  """
  case_id: str
  output: pathlib.Path
  image_file: pathlib.Path
  modality: str
  labels: str
  slices: int
  spacing: tuple[float, float, float]
  resampled: bool
  voxels: dict[int, int]
  probabilities: pathlib.Path | None = None

  def summary(self) -> str:
    """E.g. "1: 310, 2: 1203, 4: 95 voxels" or "no tumour"."""
    if not any(self.voxels.values()):
      return "no tumour"
    return ", ".join(f"{k}: {v}" for k, v in self.voxels.items()) + " voxels"


class VolumeSegmentor:
  """A trained segmentation network, loaded once, that segments whole canonical volumes.

  Attributes:
    config: The training run's config.
    step: The training step of the checkpoint.
    workdir: The training workdir the model comes from.
    batch_size: Slices per forward pass.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, step: int,
               workdir: pathlib.Path, batch_size: int | None = None,
               stopwatch: timing.Stopwatch | None = None):
    self.config = config
    self.step = step
    self.workdir = pathlib.Path(workdir)
    self.batch_size = int(batch_size or config.eval.batch_size)
    self._slices = inference.SlicePredictor(config, variables, batch_size=self.batch_size,
                                            stopwatch=stopwatch)

  @property
  def modalities(self) -> tuple[str, ...]:
    """The modalities the model was trained on, in canonical order."""
    return volume_io.trained_modalities(self.config, workdir=self.workdir)

  def check_modality(self, modality: str) -> None:
    """UserError unless the model was trained on ``modality``."""
    volume_io.check_trained_modality(self.config, modality, flag="--modality",
                                     workdir=self.workdir)

  def needs_resampling(self, spacing) -> bool:
    """Whether an image of ``spacing`` (mm) is resampled to the model's ``data.spacing``."""
    return resample.needs_resampling(spacing, tuple(self.config.data.spacing))

  def describe(self, checkpoint: str = "latest") -> str:
    """'segan, checkpoint step 600 (the newest)'; ``checkpoint``: what ``--checkpoint`` said."""
    which = {"latest": "the newest", "best": "the best by validation Dice"}.get(
        inference.check_checkpoint(checkpoint), "--checkpoint")
    if model_file.is_model_file(self.workdir):
      which = "the one the model file holds"
    return f"{self.config.model.name}, checkpoint step {self.step} ({which})"

  def probabilities(self, image: np.ndarray, *, modality: str, spacing=None,
                    tta: bool = False) -> np.ndarray:
    """float32 (X, Y, Z, 3) WT/TC/ET probabilities of a canonical volume on its grid
    (`inference.segment_probabilities`; the arguments are `segment`'s)."""
    return inference.segment_probabilities(self._slices, image, modality=modality,
                                           config=self.config, spacing=spacing, tta=tta)

  def segment(self, image: np.ndarray, *, modality: str, spacing=None,
              tta: bool = False) -> np.ndarray:
    """Segments a canonical volume.

    Args:
      image: Raw (X, Y, Z) intensities in RAS canonical orientation (`readers.load_case`).
      modality: The image's modality.
      spacing: Its voxel size in mm; more than 1% away from the model's ``data.spacing``, the
        image is segmented resampled to it (`inference.segment_volume`). None: taken to be at
        the model's spacing.
      tta: Average over the in-plane mirrorings of the slices (test-time augmentation).

    Returns:
      bool (X, Y, Z, 3) regions WT, TC, ET on the image's grid; background outside the brain
      slices.
    """
    return inference.segment_volume(self._slices, image, modality=modality, config=self.config,
                                    spacing=spacing, tta=tta)


class Ensemble:
  """Several `VolumeSegmentor`s that segment as one: their probabilities, each on the image's
  grid (each model at its own ``data.spacing`` and slice size), averaged with equal weights,
  thresholded once and nested by the first model's ``eval.nesting`` (`inference.to_regions`).

  Attributes:
    members: The models, in the order given.
    checkpoints: What ``--checkpoint`` said for each.
    config: The first model's config (its ``eval.nesting`` nests the ensemble's regions).
  """

  def __init__(self, members, checkpoints):
    self.members = list(members)
    self.checkpoints = list(checkpoints)
    self.config = self.members[0].config

  def check_modality(self, modality: str) -> None:
    """UserError (naming the workdir) unless every model was trained on ``modality``."""
    for member in self.members:
      member.check_modality(modality)

  def needs_resampling(self, spacing) -> bool:
    """Whether an image of ``spacing`` is resampled for any of the models."""
    return any(member.needs_resampling(spacing) for member in self.members)

  def describe(self, checkpoint=None) -> str:  # pylint: disable=unused-argument
    """'an ensemble of 2 models: segan step 600 of runs/a (latest), ...'."""
    return (f"an ensemble of {len(self.members)} models (probabilities averaged, thresholded "
            f"once, nested by the first's eval.nesting {self.config.eval.nesting}): "
            + "; ".join(f"{m.config.model.name} step {m.step} of {m.workdir} ({c})"
                        for m, c in zip(self.members, self.checkpoints)))

  def probabilities(self, image: np.ndarray, *, modality: str, spacing=None,
                    tta: bool = False) -> np.ndarray:
    """The mean of the models' probabilities (`inference.mean_probabilities`)."""
    return inference.mean_probabilities(
        [(member._slices, member.config) for member in self.members],  # pylint: disable=protected-access
        image, modality=modality, spacing=spacing, tta=tta)

  def segment(self, image: np.ndarray, *, modality: str, spacing=None,
              tta: bool = False) -> np.ndarray:
    """bool (X, Y, Z, 3) nested regions of the mean probabilities."""
    return inference.to_regions(self.probabilities(image, modality=modality, spacing=spacing,
                                                   tta=tta), config=self.config)


def load_segmentor(workdir: str | os.PathLike, *, batch_size: int | None = None,
                   stopwatch: timing.Stopwatch | None = None, checkpoint: str = "latest",
                   modality: str | None = None) -> VolumeSegmentor:
  """Loads the segmentation network of a checkpoint in a training workdir.

  Args:
    workdir: A workdir written by ``uagan-jax train`` (``config.json``, ``checkpoints/``), or a
      model file written by ``uagan-jax export`` (`model_file`).
    batch_size: Slices per forward pass; default the config's ``eval.batch_size``.
    stopwatch: Where the segmentor counts its compilations ("compile").
    checkpoint: "latest" (the newest), "best" (by validation Dice) or a step number.
    modality: Refuse, before the checkpoint is read, a modality the model never trained on.

  Returns:
    The `VolumeSegmentor`.

  Raises:
    UserError: No config.json or checkpoint, a model family without a segmentation network
      (stargan), a batch size below 1.
  """
  if batch_size is not None and batch_size < 1:
    raise UserError(f"--batch-size {batch_size}: must be at least 1")
  workdir = pathlib.Path(workdir)
  check = None
  if modality is not None:
    check = lambda config: volume_io.check_trained_modality(config, modality, flag="--modality",
                                                             workdir=workdir)
  config, variables, step = inference.load_model(workdir, capability="segments",
                                                 task="segment", network_only=True,
                                                 checkpoint=checkpoint, check=check)
  return VolumeSegmentor(config, variables, step=step,
                         workdir=workdir, batch_size=batch_size, stopwatch=stopwatch)


def load_segmentors(models, *, batch_size: int | None = None,
                    stopwatch: timing.Stopwatch | None = None,
                    modality: str | None = None) -> VolumeSegmentor | Ensemble:
  """`load_segmentor` of each (workdir, checkpoint) of ``models`` (`inference.pair_models`): the
  model itself for one, an `Ensemble` for several. A model that never trained on ``modality``
  is refused (naming its workdir) before any checkpoint is read."""
  models = list(models)
  if modality is not None and len(models) > 1:  # every config first: no checkpoint read in vain
    for workdir, _ in models:
      config = config_lib.from_json_file(pathlib.Path(workdir) / "config.json")
      if families.get(config.model.name).segments:
        volume_io.check_trained_modality(config, modality, flag="--modality",
                                         workdir=pathlib.Path(workdir))
  loaded = [load_segmentor(workdir, batch_size=batch_size, stopwatch=stopwatch,
                           checkpoint=checkpoint, modality=modality)
            for workdir, checkpoint in models]
  if len(loaded) == 1:
    return loaded[0]
  return Ensemble(loaded, [checkpoint for _, checkpoint in models])


def probabilities_path(output: pathlib.Path) -> pathlib.Path:
  """Where ``--save-probabilities`` writes beside a label file: ``<stem>_probabilities.nii.gz``."""
  output = pathlib.Path(output)
  extension = volume_io.nifti_extension(output)
  stem = output.name[:-len(extension)] if extension else output.name
  return output.with_name(stem + PROBABILITIES_SUFFIX)


def probabilities_image(volume: readers.Volume, probabilities: np.ndarray):
  """The float32 (X, Y, Z, 3) probability maps of a canonical volume as a NIfTI image on the
  source file's grid (its affine, qform/sform codes), the regions named in the header."""
  image = volume.to_source_image(np.asarray(probabilities, np.float32), dtype=np.float32)
  image.header["descrip"] = PROBABILITIES_DESCRIP.encode()
  image.header["intent_name"] = PROBABILITIES_INTENT_NAME.encode()
  return image


def check_labels(name: str) -> str:
  """The label convention named by ``--labels`` (case-insensitive)."""
  canonical = str(name).strip().lower()
  if canonical not in LABEL_CONVENTIONS:
    raise UserError(f"--labels {name!r}: unknown label convention; expected one of "
                    f"{', '.join(LABEL_CONVENTIONS)}")
  return canonical


def plan(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
         modality: str) -> tuple[list[tuple[readers.CaseFiles, pathlib.Path]], bool]:
  """Which case goes to which output file; checks every output before anything is run.

  Args:
    input_path: A NIfTI file, a case folder, or a data folder of cases (see the module doc).
    output_path: A .nii/.nii.gz file for a file or case folder, a folder for a data folder.
    modality: The canonical modality to segment.

  Returns:
    ([(case, output file)], whether the input is a data folder of cases).

  Raises:
    UserError: A missing or unreadable input, an output that is no NIfTI file name (or no folder
      for a data folder), is an input file, lies inside the input data folder or cannot be
      written.
  """
  path, output = pathlib.Path(input_path), pathlib.Path(output_path)
  if not path.is_dir():
    case = volume_io.case_of_file(path, modality=modality)
    volume_io.check_output(output, volume_io.input_files(case, modality))
    return [(case, output)], False
  cases = readers.find_cases(path)
  if len(cases) == 1 and cases[0].images[modality].parent == path:  # a case folder itself
    volume_io.check_output(output, volume_io.input_files(cases[0], modality))
    return [(cases[0], output)], False

  count = f"{len(cases)} case{'s' if len(cases) != 1 else ''}"
  if volume_io.nifti_extension(output) is not None:
    raise UserError(f"{output}: {path} is a data folder ({count}); --output must be the folder "
                    "their segmentations go to, not a NIfTI file")
  if output.exists() and not output.is_dir():
    raise UserError(f"{output}: not a folder; {path} is a data folder ({count}) and --output "
                    "the folder their segmentations go to")
  resolved, root = output.resolve(), path.resolve()
  if resolved == root or root in resolved.parents:
    raise UserError(f"{output}: inside the input folder {path}; the readers would take the "
                    "segmentations there for cases, so write them elsewhere")
  jobs = [(case, output / f"{case.case_id}.nii.gz") for case in cases]
  for case, file in jobs:
    volume_io.check_output(file, volume_io.input_files(case, modality))
  return jobs, True


def predict(input_path: str | os.PathLike, output_path: str | os.PathLike, *, modality: str,
            labels: str = "brats",
            workdir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
            segmentor: VolumeSegmentor | Ensemble | None = None, batch_size: int | None = None,
            checkpoint: str | Sequence[str] = "latest", postprocessing: bool = True,
            log: Callable[[str], None] = print,
            stopwatch: timing.Stopwatch | None = None, tta: bool = True,
            save_probabilities: bool = False) -> list[PredictionResult]:
  """Segments a NIfTI image, a case folder or a data folder of cases into label maps.

  Args:
    input_path: A .nii/.nii.gz image of modality ``modality``, a case folder of any known layout,
      or a data folder of cases (any layout `readers.find_cases` knows).
    output_path: For an image or a case folder, the .nii/.nii.gz file to write; for a data folder,
      the folder that receives ``<case_id>.nii.gz`` per case. Folders are created.
    modality: The modality to segment (case-insensitive; one of `uagan_jax.data.MODALITIES`).
    labels: The label convention to write: "brats" (1, 2, 4), "brats2023" or "msd" (1, 2, 3).
    workdir: The training workdir of a segmenting model; its newest checkpoint segments. Or a
      model file written by ``uagan-jax export`` (`model_file`; ``checkpoint`` left "latest").
      Several (a list): an ensemble, paired with ``checkpoint`` by `inference.pair_models`.
    segmentor: An already loaded model (from `load_segmentor` or `load_segmentors`), instead of
      ``workdir``.
    batch_size: With ``workdir``: slices per forward pass (default the config's eval.batch_size).
    checkpoint: With ``workdir``: "latest" (the newest checkpoint), "best" (the best by
      validation Dice, ``checkpoints_best/``) or a step number of ``checkpoints/``; a list of
      them for an ensemble (`inference.pair_models`).
    postprocessing: Apply the model's ``postprocessing.json`` (its workdir's or model file's;
      `postprocess`, chosen by ``uagan-jax postprocess`` on its validation cases) where there is
      one; a line says which. False: ``--no-postprocessing``. An ensemble is not post-processed.
    log: Where progress goes.
    stopwatch: Counts the wall time of loading the model, reading, compiling, segmenting (the
      mirrored passes of ``tta`` apart, `inference.TTA_PHASE`) and writing (``uagan-jax predict
      --timing``); with ``segmentor``, its compilations are counted where it was loaded.
    tta: Test-time augmentation: average the probabilities over the in-plane mirrorings of the
      slices (four passes through the network). On by default, as in the command
      (``cli.TTA_DEFAULT``); False: one pass per slice.
    save_probabilities: Also write the probabilities that were thresholded (before nesting) as
      float32 (X, Y, Z, 3) maps WT, TC, ET beside each label file (`probabilities_path`).

  Returns:
    One `PredictionResult` per case, in case order.

  Raises:
    UserError: Unknown modality or label convention, missing or corrupt input, an output that
      is an input file or cannot be written, a workdir without a checkpoint or with a model
      family that does not segment, a modality the model was not trained on, an image without
      a non-zero voxel, workdirs and checkpoints that do not pair. Files already written stay.
  """
  if (workdir is None) == (segmentor is None):
    raise ValueError("pass exactly one of workdir and segmentor")
  if segmentor is not None and batch_size is not None:
    raise ValueError("batch_size is the segmentor's; pass it to load_segmentor")
  stopwatch = stopwatch or timing.Stopwatch()
  modality = volume_io.check_modality(modality)
  labels = check_labels(labels)
  checkpoints = [checkpoint] if isinstance(checkpoint, (str, int)) else list(checkpoint)
  models = None
  if workdir is not None:
    workdirs = ([workdir] if isinstance(workdir, (str, os.PathLike)) else list(workdir))
    models = inference.pair_models(workdirs, checkpoints)
  jobs, many = plan(input_path, output_path, modality=modality)
  if save_probabilities:
    _check_probability_outputs(jobs, modality=modality)

  if segmentor is None:
    if postprocessing and len(models) == 1:
      postprocess.load(models[0][0])  # a damaged postprocessing.json costs no model load either
    if len(models) == 1:
      log(f"loading the model in {models[0][0]}")
    else:
      log(f"loading {len(models)} models: "
          + ", ".join(f"{w} ({c})" for w, c in models))
    with stopwatch.phase("load model"):
      segmentor = load_segmentors(models, batch_size=batch_size, stopwatch=stopwatch,
                                  modality=modality)
  segmentor.check_modality(modality)
  log(f"model: {segmentor.describe(checkpoints[0] if len(checkpoints) == 1 else 'latest')}")
  if tta:
    log(f"test-time augmentation: the mean over the {len(inference.MIRRORS)} in-plane mirrorings "
        "of the slices")
  processing = None
  if isinstance(segmentor, Ensemble):
    if postprocessing:
      postprocess.note_ensemble([m.workdir for m in segmentor.members], log=log)
  else:
    processing = postprocess.for_run(segmentor.workdir, enabled=postprocessing,
                                     step=segmentor.step, modalities=[modality], log=log,
                                     tta=tta)
  if many:
    log(f"segmenting the {modality} images of {len(jobs)} cases in {input_path} into "
        f"{output_path}/<case_id>.nii.gz ({labels} labels)")

  results = []
  started = time.time()
  for number, (case, output) in enumerate(jobs, 1):
    result = _predict_case(segmentor, case, output, modality=modality, labels=labels, log=log,
                           steps=not many, stopwatch=stopwatch, tta=tta,
                           save_probabilities=save_probabilities, processing=processing)
    results.append(result)
    if many:
      elapsed = time.time() - started
      log(f"predicted {number}/{len(jobs)} cases ({case.case_id}: {result.summary()}), "
          f"ETA {elapsed / number * (len(jobs) - number):.0f} s")
  return results


def _check_probability_outputs(jobs, *, modality: str) -> None:
  """`volume_io.check_output` of each job's probability file, none of which may be another
  job's label file."""
  labels = {output.resolve() for _, output in jobs}
  for case, output in jobs:
    path = probabilities_path(output)
    volume_io.check_output(path, volume_io.input_files(case, modality))
    if path.resolve() in labels:
      raise UserError(f"{path}: is the label file of another case, and --save-probabilities "
                      f"would write the probabilities of {case.case_id} there")


def _predict_case(segmentor: VolumeSegmentor | Ensemble, case: readers.CaseFiles,
                  output: pathlib.Path, *, modality: str, labels: str,
                  log: Callable[[str], None], steps: bool, stopwatch: timing.Stopwatch,
                  tta: bool = False, save_probabilities: bool = False,
                  processing: postprocess.PostProcessing | None = None) -> PredictionResult:
  """Segments one case and writes its label map; ``steps``: log each step, not only notes;
  ``processing``: the post-processing applied to the nested regions before they become labels
  (the probabilities written with ``save_probabilities`` are those before it)."""
  step_log = log if steps else lambda _: None
  image_file = case.images[modality]
  with stopwatch.phase("read"):
    volume, slices = volume_io.load_brain_image(case, modality, verb="segment", log=step_log)
    image = volume.images[modality]
    warning = checks.skull_strip_warning(image, path=checks.image_name(case, modality))
  checks.log_background_note(volume, case, modality, log=log)
  if warning is not None:
    log(f"warning: {warning}")
  resampled = segmentor.needs_resampling(volume.spacing)
  if resampled:
    members = getattr(segmentor, "members", [segmentor])
    spacings = sorted({volume_io.format_spacing(m.config.data.spacing) for m in members
                       if m.needs_resampling(volume.spacing)})
    step_log(f"resampling from {volume_io.format_spacing(volume.spacing)} to the "
             f"model{'s' if len(members) > 1 else ''}'s {' and '.join(spacings)} voxels "
             "(data.spacing), the result back")
  step_log(f"segmenting {slices} slices (volume {'x'.join(map(str, image.shape))} canonical, "
           f"{volume_io.format_spacing(volume.spacing)})")
  with stopwatch.phase("segment"):
    probabilities = segmentor.probabilities(image, modality=modality, spacing=volume.spacing,
                                            tta=tta)
    regions = inference.to_regions(probabilities, config=segmentor.config)
    if processing is not None:
      regions = processing.apply(regions, modality=modality, spacing=volume.spacing)
    label_map = readers.regions_to_labels(regions, convention=labels)
  step_log(f"writing {output}")
  probabilities_file = probabilities_path(output) if save_probabilities else None
  with stopwatch.phase("write"):
    volume_io.write_nifti(volume.to_source_image(label_map, dtype=OUTPUT_DTYPE), output)
    if probabilities_file is not None:
      step_log(f"writing {probabilities_file} (float32 probabilities of WT, TC, ET)")
      volume_io.write_nifti(probabilities_image(volume, probabilities), probabilities_file)
  counts = np.bincount(label_map.ravel(), minlength=256)
  tumour = sorted(set(readers.LABEL_CONVENTIONS[labels]["labels"]) - {0})
  return PredictionResult(case_id=case.case_id, output=output, image_file=image_file,
                          modality=modality, labels=labels, slices=slices,
                          spacing=tuple(volume.spacing), resampled=resampled,
                          voxels={label: int(counts[label]) for label in tumour},
                          probabilities=probabilities_file)
