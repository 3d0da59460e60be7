"""Whole-volume modality translation: one NIfTI scan in, the same scan as another modality out.

``uagan-jax translate --workdir W --input FILE --source t1 --target flair --output OUT.nii.gz``
runs the translation network of a trained stargan or uagan model (StarGAN's generator, UAGAN's
translation stream; ``--model MODEL.zip`` in place of ``--workdir``: a model file from
``uagan-jax export``, `model_file`) over every axial slice of a volume:

1. The input is read like training data (`readers.load_case`: RAS canonical orientation, the
   one-line `UserError`s for missing, truncated or NaN files). Where its voxel size differs from
   the model's (config ``data.spacing``) by more than 1%, it is resampled to it linearly
   (`data.resample`); within 1% it is used as it is. It is z-scored over its brain (non-zero)
   voxels, clipped and cut into axial slices that hold the whole brain: the model's centre
   crop/pad where that holds it, else a larger canvas (`preprocess.brain_window`).
2. The brain slices are translated in fixed-size batches (`inference.translate_volume`) and put
   back on the canonical grid (`preprocess.slices_to_volume`), resampled linearly onto the
   input's grid where the input was resampled.
3. The translation lives in the normalised space of training, so it is mapped back to the
   *input's* intensities: the z-score is undone with the input's brain mean and standard
   deviation, background (input == 0) is exactly 0 and brain voxels are clipped to the input's
   brain range. A model cannot know the target scanner's absolute scale; the input's is the one
   scale that is at hand, and it keeps the output comparable to the scan it came from.
4. The result is written as float32 on the input file's grid: same shape, affine, qform/sform
   codes and header (`readers.Volume.to_source_image`), first under a temporary name in the
   output's folder and then renamed, so an interrupted run never leaves a half-written file
   (`volume_io.write_nifti`). An existing output is replaced; a file of the input case never is.

`--input` may also be a case folder of any known layout (`readers.find_cases`) holding exactly
one case; its ``--source`` image is then translated. ``uagan-jax predict`` (`predict.py`) shares
the loading, input and output handling (`volume_io`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable

import ml_collections
import numpy as np

from uagan_jax import inference, volume_io
from uagan_jax.data import checks, resample
from uagan_jax.errors import UserError



@dataclasses.dataclass(frozen=True)
class TranslationResult:
  """What `translate_file` did.

  Attributes:
    output: The file written.
    source_file: The image that was translated (the input, or the case folder's source image).
    source: The input's modality.
    target: The output's modality.
    slices: How many axial slices went through the network (those with brain voxels).
    resampled: Whether the input was resampled to the model's spacing (``data.spacing``) and the
      translation back.
    step: The training step of the checkpoint used.
  """
  output: pathlib.Path
  source_file: pathlib.Path
  source: str
  target: str
  slices: int
  resampled: bool
  step: int


class VolumeTranslator:
  """A trained translation network, loaded once, that translates whole canonical volumes.

  Attributes:
    config: The training run's config.
    step: The training step of the checkpoint.
    workdir: The training workdir the model comes from.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, step: int,
               workdir: pathlib.Path):
    self.config = config
    self.step = step
    self.workdir = pathlib.Path(workdir)
    self._slices = inference.SliceTranslator(config, variables, batch_size=config.eval.batch_size)

  @property
  def modalities(self) -> tuple[str, ...]:
    """The modalities the model was trained on, in canonical order."""
    return volume_io.trained_modalities(self.config, workdir=self.workdir)

  def check_pair(self, source: str, target: str) -> None:
    """UserError unless the model can translate ``source`` into ``target`` (see `check_pair`)."""
    check_pair(self.config, source, target, workdir=self.workdir)

  def needs_resampling(self, spacing) -> bool:
    """Whether an image of ``spacing`` (mm) is resampled to the model's ``data.spacing``."""
    return resample.needs_resampling(spacing, tuple(self.config.data.spacing))

  def translate(self, image: np.ndarray, *, source: str, target: str,
                spacing=None) -> tuple[np.ndarray, int]:
    """Translates a canonical volume into another modality, in the input's intensity range.

    Args:
      image: Raw (X, Y, Z) intensities in RAS canonical orientation (`readers.load_case`).
      source: The image's modality.
      target: The modality to translate into.
      spacing: Its voxel size in mm; more than 1% away from the model's ``data.spacing``, it is
        translated resampled to it (`inference.translate_volume`). None: taken to be at the
        model's spacing.

    Returns:
      (float32 (X, Y, Z) translation with the input's brain intensity statistics and 0 outside
      the brain, the number of translated slices).
    """
    normalised, slices = inference.translate_volume(self._slices, image, source=source,
                                                    target=target, config=self.config,
                                                    spacing=spacing)
    return restore_intensities(normalised, image), slices


def check_pair(config: ml_collections.ConfigDict, source: str, target: str, *,
               workdir: pathlib.Path) -> None:
  """UserError unless the model in ``workdir`` (trained with ``config``) can translate the pair.

  Both modalities must be trained ones: UAGAN conditions on the source too, and neither network
  has ever seen the intensities of a modality outside its training set. With
  ``model.generator_pair_heads`` a modality into itself has its own head, which only the identity
  loss trains: without it, that head's output is its initial noise.
  """
  for flag, modality in (("--source", source), ("--target", target)):
    volume_io.check_trained_modality(config, modality, flag=flag, workdir=workdir,
                                     as_target=flag == "--target")
  if (source == target and config.model.get("generator_pair_heads", False)
      and not config.loss.get("identity_weight", 0.0)):
    raise UserError(f"--source and --target are both {source}: the model in {workdir} has one "
                    f"output head per source -> target pair (model.generator_pair_heads) and "
                    f"trained no {source} -> {source} head (loss.identity_weight 0)")


def load_translator(workdir: str | os.PathLike) -> VolumeTranslator:
  """Loads the translation network of the newest checkpoint in a training workdir.

  Args:
    workdir: A workdir written by ``uagan-jax train`` (``config.json``, ``checkpoints/``), or a
      model file written by ``uagan-jax export`` (`model_file`).

  Returns:
    The `VolumeTranslator`.

  Raises:
    UserError: No config.json or checkpoint, or a model family without a translation network
      (segan, unet).
  """
  workdir = pathlib.Path(workdir)
  config, variables, step = inference.load_model(workdir, capability="translates",
                                                 task="translate", network_only=True)
  return VolumeTranslator(config, variables, step=step, workdir=workdir)


def restore_intensities(translated: np.ndarray, image: np.ndarray) -> np.ndarray:
  """Maps a translation in z-score space back to the intensity scale of its input.

  The inverse of `preprocess.zscore_brain` with the input's statistics: brain (non-zero) voxels
  get ``z * std + mean``, clipped to the input's brain [min, max]; background stays exactly 0.

  Args:
    translated: (X, Y, Z) normalised translation on the input's (canonical) grid.
    image: The raw (X, Y, Z) input it was translated from.

  Returns:
    float32 array of the image's shape.
  """
  if translated.shape != image.shape:
    raise ValueError(f"translation shape {translated.shape} differs from image {image.shape}")
  brain = image != 0
  out = np.zeros(image.shape, np.float32)
  if not brain.any():
    return out
  values = image[brain].astype(np.float64)  # as zscore_brain: float64 sums over ~9M voxels
  mean, std = values.mean(), values.std()
  restored = translated[brain].astype(np.float64) * std + mean
  # min and max are input values, so the float32 cast cannot step outside the range.
  out[brain] = np.clip(restored, values.min(), values.max())
  return out


def translate_file(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                   source: str, target: str, workdir: str | os.PathLike | None = None,
                   translator: VolumeTranslator | None = None,
                   log: Callable[[str], None] = print) -> TranslationResult:
  """Translates one NIfTI volume (or a one-case folder's image) into another modality.

  Args:
    input_path: A .nii/.nii.gz image of modality ``source``, or a case folder of any known
      layout holding exactly one case.
    output_path: The .nii/.nii.gz file to write (float32, on the input file's grid and header);
      its folder is created. Never a file of the input case.
    source: The input's modality (case-insensitive; one of `uagan_jax.data.MODALITIES`).
    target: The modality to translate into.
    workdir: The stargan or uagan training workdir whose newest checkpoint translates.
    translator: An already loaded model (from `load_translator`), instead of ``workdir``: loads
      once for many files.
    log: Where progress goes.

  Returns:
    The `TranslationResult`.

  Raises:
    UserError: Unknown modality, missing or corrupt input, output equal to the input or not
      writable, a workdir without a checkpoint or with a model family that does not translate, a
      modality the model was not trained on.
  """
  if (workdir is None) == (translator is None):
    raise ValueError("pass exactly one of workdir and translator")
  source = volume_io.check_modality(source, flag="--source")
  target = volume_io.check_modality(target, flag="--target")
  case = volume_io.resolve_input(input_path, modality=source)
  source_file = case.images[source]
  output = pathlib.Path(output_path)
  volume_io.check_output(output, volume_io.input_files(case, source))

  if translator is None:
    log(f"loading the model in {workdir}")
    translator = load_translator(workdir)
  translator.check_pair(source, target)
  log(f"model: {translator.config.model.name}, checkpoint step {translator.step}")

  volume, slices = volume_io.load_brain_image(case, source, verb="translate", log=log)
  image = volume.images[source]
  checks.log_background_note(volume, case, source, log=log)
  warning = checks.skull_strip_warning(image, path=checks.image_name(case, source))
  if warning is not None:
    log(f"warning: {warning}")
  spacing = volume_io.format_spacing(volume.spacing)
  resampled = translator.needs_resampling(volume.spacing)
  if resampled:
    trained = volume_io.format_spacing(translator.config.data.spacing)
    log(f"resampling from {spacing} to the model's {trained} voxels (data.spacing), the "
        "translation back")
  log(f"translating {slices} slices {source} -> {target} (volume {'x'.join(map(str, image.shape))}"
      f" canonical, {spacing})")
  translated, slices = translator.translate(image, source=source, target=target,
                                            spacing=volume.spacing)

  log(f"writing {output}")
  volume_io.write_nifti(volume.to_source_image(translated, dtype=np.float32), output)
  return TranslationResult(output=output, source_file=source_file, source=source, target=target,
                           slices=slices, resampled=resampled, step=translator.step)
