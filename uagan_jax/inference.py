"""Inference with a trained model: slices through the networks, volumes through the slices.

Every command that runs a trained network goes through here: evaluation, validation during
training, ``predict`` and ``translate``. The model family (`uagan_jax.families`) gives the
functions; nothing here asks which family it is.

* `SlicePredictor`, `SliceTranslator`: stacks of normalised slices in fixed-size batches, one
  compiled program for every volume.
* `segment_probabilities`, `translate_volume`: a volume of any spacing, resampled to the training
  spacing (config ``data.spacing``) where it differs by more than 1% (`data.resample`), cut into
  axial slices that hold its whole brain (`preprocess.brain_window`: the centred crop of training
  wherever that holds it), and the result put back on the volume's own grid.
* `to_regions`: the one step from per-region probabilities to the segmentation every consumer
  uses (threshold at 0.5, `regions.nest`); `segment_volume` = `segment_probabilities` then
  `to_regions`, `mean_probabilities`: the probabilities of several models (an ensemble),
  averaged on the volume's grid.
* Test-time augmentation (``tta``): `SlicePredictor.probabilities` averages the sigmoid outputs of
  the in-plane mirrorings of the slices (`MIRRORS`, nnU-Net's mirroring of 2D slices), each
  mirrored back. Off unless asked for: validation during training never mirrors.
* `translate_slices`: a stack of normalised slices through the translator, brain slices only.
* `load_state`, `load_model`: a workdir's checkpoint (`load_model`: or a model file's networks,
  `model_file`); `segmentation_variables` and
  `translation_variables`: the variables of the network that does the job; `load_network`:
  those variables alone, read from the checkpoint without the rest of the state;
  `pair_models`: which checkpoint of which workdir, for ``--workdir``/``--checkpoint`` given
  several times (an ensemble).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from uagan_jax import checkpoint as checkpoint_lib
from uagan_jax import config as config_lib
from uagan_jax import families, model_file, regions, timing, train_state
from uagan_jax.data import MODALITIES, REGIONS, preprocess, resample
from uagan_jax.errors import UserError

# Workdir folder of each checkpoint kind that can be loaded.
CHECKPOINT_DIRS = {"latest": "checkpoints", "best": "checkpoints_best"}
# Test-time augmentation: the in-plane mirrorings of a (Z, H, W) stack of axial slices, as the
# axes flipped: none, H, W, both (nnU-Net mirrors a 2D model's slices along both axes).
MIRRORS = ((), (1,), (2,), (1, 2))
# The stopwatch phase of the mirrored passes (``--timing``): the cost of test-time augmentation.
TTA_PHASE = "tta"


# --------------------------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------------------------


class _Program:
  """The family's ``function`` (``segment_fn`` or ``translate_fn``) over its networks, compiled
  once per shape of its arguments (ahead of the call, so that a `timing.Stopwatch` can count the
  compilation apart from the run; the program is the one ``jax.jit`` would compile and call)."""

  def __init__(self, config: ml_collections.ConfigDict, capability: str, function: str, *,
               stopwatch: timing.Stopwatch | None):
    if not getattr(families.get(config.model.name), capability):
      raise ValueError(f"model {config.model.name} does not {capability.removesuffix('s')}")
    networks = train_state.build_networks(config, bn_axis_name=None)
    self._jitted = jax.jit(
        getattr(families.implementation(config.model.name), function)(networks, config))
    self._stopwatch = stopwatch or timing.Stopwatch()
    self._executables = {}  # the arguments' shapes and dtypes -> the compiled program

  def __call__(self, *args):
    signature = tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(args))
    executable = self._executables.get(signature)
    if executable is None:
      with self._stopwatch.phase("compile"):
        executable = self._jitted.lower(*args).compile()
      self._executables[signature] = executable
    return executable(*args)


class SlicePredictor:
  """Segments stacks of preprocessed slices in fixed-size batches with one compiled program."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, batch_size: int,
               stopwatch: timing.Stopwatch | None = None):
    """``stopwatch``: counts the compilations ("compile"; they happen on the first call)."""
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self._stopwatch = stopwatch
    self._predict = _Program(config, "segments", "segment_fn", stopwatch=stopwatch)

  def set_variables(self, variables: dict) -> None:
    """Predicts with other variables of the same shapes, reusing the compiled program."""
    self.variables = jax.device_put(variables)

  def __call__(self, slices: np.ndarray, modality_id: int) -> np.ndarray:
    """(Z, H, W) normalised slices -> (Z, H, W, 3) region probabilities (one pass)."""
    modality = np.full((self.batch_size,), modality_id, np.int32)
    return _in_fixed_batches(lambda images: self._predict(self.variables, images, modality),
                             slices, self.batch_size)

  def probabilities(self, slices: np.ndarray, modality_id: int, *,
                    tta: bool = False) -> np.ndarray:
    """(Z, H, W) normalised slices -> (Z, H, W, 3) float32 region probabilities.

    Without ``tta``: one pass, the network's sigmoid outputs (this object called). With ``tta``:
    the mean of four passes, one per in-plane mirroring of the slices (`MIRRORS`: as they are,
    flipped along H, along W, along both), each output flipped back before the mean (nnU-Net's
    test-time mirroring). The three mirrored stacks go through the same compiled program as
    one stack of fixed-size batches (one zero-padded batch for the three, not one each); their
    time is the stopwatch's phase `TTA_PHASE`.
    """
    plain = self(slices, modality_id)
    if not tta:
      return plain
    count = slices.shape[0]
    timed = (self._stopwatch.phase(TTA_PHASE) if self._stopwatch is not None
             else contextlib.nullcontext())
    with timed:
      mirrored = self(np.concatenate([np.flip(slices, axes) for axes in MIRRORS[1:]]),
                      modality_id)
      total = np.array(plain, np.float32)
      for index, axes in enumerate(MIRRORS[1:]):
        total += np.flip(mirrored[index * count:(index + 1) * count], axes)
      return total / np.float32(len(MIRRORS))


class SliceTranslator:
  """Translates stacks of normalised slices into another modality, in fixed-size batches.

  Inputs and outputs are in the normalised space of training: z-scores clipped to [-clip, clip].
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, batch_size: int,
               stopwatch: timing.Stopwatch | None = None):
    """``stopwatch``: counts the compilations ("compile"; they happen on the first call)."""
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self._translate = _Program(config, "translates", "translate_fn", stopwatch=stopwatch)

  def set_variables(self, variables: dict) -> None:
    """Translates with other variables of the same shapes, reusing the compiled program."""
    self.variables = jax.device_put(variables)

  def __call__(self, slices: np.ndarray, source_id: int, target_id: int) -> np.ndarray:
    """(Z, H, W) normalised slices of modality ``source_id`` -> (Z, H, W) as ``target_id``."""
    source = np.full((self.batch_size,), source_id, np.int32)
    target = np.full((self.batch_size,), target_id, np.int32)
    return _in_fixed_batches(
        lambda images: self._translate(self.variables, images, source, target), slices,
        self.batch_size)[..., 0]


def _in_fixed_batches(run: Callable[[np.ndarray], jax.Array], slices: np.ndarray,
                      batch_size: int) -> np.ndarray:
  """``run`` over (Z, H, W) slices as [batch, H, W, 1] batches of one fixed size (the last one
  zero-padded), so one compiled program serves every volume; returns the Z real outputs."""
  count = slices.shape[0]
  padded = -count % batch_size
  images = np.concatenate([slices, np.zeros((padded,) + slices.shape[1:], slices.dtype)])[..., None]
  out = [np.asarray(run(images[i:i + batch_size])) for i in range(0, images.shape[0], batch_size)]
  return np.concatenate(out)[:count]


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def translate_slices(translator: SliceTranslator, slices: np.ndarray, has_brain: np.ndarray, *,
                     source: str, target: str) -> np.ndarray:
  """Translates the brain slices of a (Z, H, W) stack; slices without brain stay 0."""
  out = np.zeros_like(slices)
  if has_brain.any():
    out[has_brain] = translator(slices[has_brain], MODALITIES.index(source),
                                MODALITIES.index(target))
  # Outside the source's brain there is nothing to translate (background is 0 after z-scoring).
  out[slices == 0] = 0
  return out


def slice_stride(config: ml_collections.ConfigDict) -> int:
  """What every side of a slice must be divisible by for the networks that run at inference.

  The segmentor (and UAGAN's segmentation stream) halves the slice len(model.segmentor_features)
  times, StarGAN's generator (and UAGAN's translation stream) twice. The discriminator does not
  run at inference.
  """
  return max(2 ** len(config.model.segmentor_features), 4)


def _at_training_spacing(image: np.ndarray, spacing, config: ml_collections.ConfigDict
                         ) -> np.ndarray | None:
  """The image resampled to ``data.spacing``, or None where its spacing is within 1% of it (or
  unknown: ``spacing`` None), and the image is used as it is."""
  target = tuple(config.data.spacing)
  if spacing is None or not resample.needs_resampling(spacing, target):
    return None
  return resample.image_to_spacing(image, spacing, target)


def whole_brain_slices(images: Sequence[np.ndarray], config: ml_collections.ConfigDict
                       ) -> tuple[list[np.ndarray], list[np.ndarray], preprocess.CropPad]:
  """Volumes of one grid cut into normalised axial slices through one window that holds the
  brain of each (`preprocess.brain_window`); returns (slices per volume, has_brain per volume,
  the window)."""
  brain = np.zeros(images[0].shape[:2], bool)
  for image in images:
    brain |= np.any(image != 0, axis=2)
  window = preprocess.brain_window(brain, size=tuple(config.data.image_size),
                                   stride=slice_stride(config))
  slices, has_brain = [], []
  for image in images:
    cut, _, brain_slices, _ = preprocess.volume_to_slices(
        image, None, size=tuple(config.data.image_size), clip=config.data.clip, window=window)
    slices.append(cut)
    has_brain.append(brain_slices)
  return slices, has_brain, window


def segment_probabilities(predictor: SlicePredictor, image: np.ndarray, *, modality: str,
                          config: ml_collections.ConfigDict,
                          spacing: Sequence[float] | None = None,
                          tta: bool = False) -> np.ndarray:
  """A canonical (X, Y, Z) volume -> float32 (X, Y, Z, 3) WT/TC/ET probabilities on its grid.

  Args:
    predictor: The segmentation network.
    image: Raw (X, Y, Z) intensities in RAS canonical orientation.
    modality: The image's modality.
    config: The training run's config.
    spacing: The image's voxel size in mm. Where it differs from ``data.spacing`` by more than
      1%, the image is resampled to ``data.spacing`` (linearly), segmented there, and the
      per-region probabilities resampled linearly onto the image's grid (nnU-Net's way). None:
      the image is taken to be at ``data.spacing``.
    tta: Average over the in-plane mirrorings of the slices (`SlicePredictor.probabilities`).

  Returns:
    float32 (X, Y, Z, 3) sigmoid probabilities of the regions (channels WT, TC, ET, not nested);
    0 outside the brain slices and outside the window they were cut through.
  """
  resampled = _at_training_spacing(image, spacing, config)
  work = image if resampled is None else resampled
  (slices,), (has_brain,), window = whole_brain_slices([work], config)
  probs = np.zeros(slices.shape + (len(REGIONS),), np.float32)
  if has_brain.any():  # slices without brain are background by definition, as in training
    probs[has_brain] = predictor.probabilities(slices[has_brain], MODALITIES.index(modality),
                                               tta=tta)
  probs = preprocess.slices_to_volume(probs, window, fill=0.0)
  if resampled is not None:
    probs = resample.resize(probs, image.shape)
  return np.asarray(probs, np.float32)


def to_regions(probabilities: np.ndarray, *, config: ml_collections.ConfigDict) -> np.ndarray:
  """(..., 3) WT/TC/ET probabilities -> the segmentation: each thresholded at 0.5, then nested by
  ``eval.nesting`` (`regions.nest`). What ``predict`` writes, ``evaluate`` and validation score
  and the figures draw, whatever the probabilities came from (one model, mirrorings, models)."""
  return regions.nest(np.asarray(probabilities) > 0.5, rule=config.eval.nesting)


def segment_volume(predictor: SlicePredictor, image: np.ndarray, *, modality: str,
                   config: ml_collections.ConfigDict,
                   spacing: Sequence[float] | None = None, tta: bool = False) -> np.ndarray:
  """A canonical (X, Y, Z) volume -> boolean (X, Y, Z, 3) regions on the same grid.

  `segment_probabilities` (the arguments are its), then `to_regions`.

  Returns:
    bool (X, Y, Z, 3) WT/TC/ET, nested by ``eval.nesting`` (`regions.nest`): what ``predict``
    writes, ``evaluate`` and validation score and the figures draw.
  """
  return to_regions(segment_probabilities(predictor, image, modality=modality, config=config,
                                          spacing=spacing, tta=tta), config=config)


def mean_probabilities(models: Sequence[tuple[SlicePredictor, ml_collections.ConfigDict]],
                       image: np.ndarray, *, modality: str,
                       spacing: Sequence[float] | None = None, tta: bool = False) -> np.ndarray:
  """The mean of several models' `segment_probabilities` of one volume (an ensemble).

  Each model segments at its own config's spacing and slice size; the means are taken on the
  image's grid, with equal weights. One model: its probabilities, unchanged.

  Args:
    models: (predictor, its run's config) per model.
    image, modality, spacing, tta: As `segment_probabilities`.

  Returns:
    float32 (X, Y, Z, 3) WT/TC/ET probabilities.
  """
  if not models:
    raise ValueError("no model to segment with")
  total = None
  for predictor, config in models:
    probs = segment_probabilities(predictor, image, modality=modality, config=config,
                                  spacing=spacing, tta=tta)
    total = probs if total is None else total + probs
  return total if len(models) == 1 else total / np.float32(len(models))


def translate_volume(translator: SliceTranslator, image: np.ndarray, *, source: str,
                     target: str, config: ml_collections.ConfigDict,
                     spacing: Sequence[float] | None = None) -> tuple[np.ndarray, int]:
  """A canonical (X, Y, Z) volume -> its translation, normalised, on the same grid.

  Resampled to ``data.spacing`` where ``spacing`` differs by more than 1% (as `segment_volume`),
  the normalised translation resampled linearly back; 0 wherever the image is 0.

  Returns:
    (float32 (X, Y, Z) translation in the normalised space of training, the number of slices
    that went through the network).
  """
  resampled = _at_training_spacing(image, spacing, config)
  work = image if resampled is None else resampled
  (slices,), (has_brain,), window = whole_brain_slices([work], config)
  translated = preprocess.slices_to_volume(
      translate_slices(translator, slices, has_brain, source=source, target=target), window)
  if resampled is not None:
    translated = resample.resize(translated, image.shape)
    translated[image == 0] = 0
  return translated, int(has_brain.sum())


# --------------------------------------------------------------------------------------------
# Models from workdirs
# --------------------------------------------------------------------------------------------


def load_state(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
               checkpoint: str = "latest", log: Callable[[str], None] | None = None,
               part=None):
  """A checkpoint's train state (on one device) and its step.

  An unreadable checkpoint (damaged or missing files, a wrong digest) is reported in one line
  through ``log`` (default: stderr) and the newest readable one before it is used instead; the
  workdir is left as it is.

  Args:
    config: the run's config.
    workdir: the training workdir.
    checkpoint: "latest" (the newest checkpoint in ``checkpoints/``), "best" (the one kept in
      ``checkpoints_best/`` for the highest validation Dice, see ``train.validate_every``) or a
      step number of ``checkpoints/`` (that one, no fallback).
    log: where the note on an unreadable checkpoint goes.
    part: restore only these subtrees of the state (nested dicts of abstract arrays, see
      `checkpoint.Checkpointer.restore_part`), returned in place of the state.

  Raises:
    UserError: no checkpoint, or none readable (naming the folder).
    checkpoint.NoLeafDigests: with ``part``, a checkpoint that cannot be verified in part.
  """
  if log is None:
    log = lambda message: print(f"warning: {message}", file=sys.stderr, flush=True)
  checkpoint = check_checkpoint(checkpoint)
  if checkpoint not in CHECKPOINT_DIRS:
    return _load_step(config, pathlib.Path(workdir), step=int(checkpoint), part=part)
  directory = pathlib.Path(workdir) / CHECKPOINT_DIRS[checkpoint]
  checkpoints = step = None
  if directory.is_dir():
    checkpoints = checkpoint_lib.Checkpointer(directory, every=1, keep=1_000_000)
    step = checkpoints.latest_step()
  if step is None:
    if checkpoints is not None:
      checkpoints.close()
    if checkpoint == "best":
      raise UserError(f"{directory}: no best checkpoint; it is kept when training validates "
                      "(--config.train.validate_every=N with a val split, data.val_fraction > 0)")
    raise UserError(f"{directory}: no checkpoints; train first with 'uagan-jax train'")
  try:
    if part is None:
      state, step = checkpoints.restore_newest(train_state.abstract_state(config), log=log)
    else:
      state, step = checkpoints.restore_newest(part, log=log, part=True)
  finally:
    checkpoints.close()
  return state, step


def pair_models(workdirs: Sequence[str | os.PathLike],
                checkpoints: Sequence[str | int] | None = None) -> list[tuple[pathlib.Path, str]]:
  """The (workdir, checkpoint) of each model of ``--workdir`` and ``--checkpoint``, each given
  once or several times (an ensemble).

  One workdir and N checkpoints: that workdir at each; N workdirs and one checkpoint (or none:
  "latest"): each at it; N and N: paired in order. A workdir or a pair may repeat.

  Raises:
    UserError: no workdir, a checkpoint that is no checkpoint (`check_checkpoint`), or N
      workdirs with M > 1 checkpoints, M != N.
  """
  workdirs = [pathlib.Path(w) for w in workdirs]
  checkpoints = [check_checkpoint(c) for c in (checkpoints or ["latest"])]
  if not workdirs:
    raise UserError("--workdir: give the training workdir of the model")
  if len(checkpoints) == 1:
    return [(workdir, checkpoints[0]) for workdir in workdirs]
  if len(workdirs) == 1:
    return [(workdirs[0], checkpoint) for checkpoint in checkpoints]
  if len(workdirs) == len(checkpoints):
    return list(zip(workdirs, checkpoints))
  raise UserError(f"{len(workdirs)} --workdir and {len(checkpoints)} --checkpoint: give one "
                  "--checkpoint for all workdirs, one --workdir for several checkpoints, or as "
                  "many of each (paired in order)")


def check_checkpoint(checkpoint: str | int) -> str:
  """``--checkpoint``: "latest", "best" or a step number (as a string); UserError otherwise."""
  text = str(checkpoint).strip().lower()
  if text in CHECKPOINT_DIRS or (text.isdigit() and int(text) >= 0):
    return str(int(text)) if text.isdigit() else text
  raise UserError(f"--checkpoint {checkpoint}: use {', '.join(CHECKPOINT_DIRS)} or a step number")


def _load_step(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, step: int, part):
  """`load_state` of one named step of ``checkpoints/``: no fallback, it is that step or an
  error naming the steps there are."""
  directory = workdir / CHECKPOINT_DIRS["latest"]
  checkpoints, steps = None, []
  if directory.is_dir():
    checkpoints = checkpoint_lib.Checkpointer(directory, every=1, keep=1_000_000)
    steps = checkpoints.all_steps()
  if step not in steps:
    if checkpoints is not None:
      checkpoints.close()
    kept = f"the kept steps are {', '.join(map(str, steps))}" if steps else "there is none"
    raise UserError(f"{directory}: no checkpoint of step {step} ({kept}; "
                    "train.keep_checkpoints keeps the newest)")
  try:
    if part is None:
      return checkpoints.restore(step, train_state.abstract_state(config)), step
    return checkpoints.restore_part(step, part), step
  except checkpoint_lib.CheckpointUnreadable as e:
    raise UserError(f"{directory / str(step)}: checkpoint unreadable ({e})") from None
  finally:
    checkpoints.close()


def _variables(state, role: str) -> dict:
  net = state.nets[role]
  return jax.device_get({"params": net.params, "batch_stats": net.batch_stats})


def segmentation_variables(state, config: ml_collections.ConfigDict) -> dict:
  """The variables of the network that segments (the family's ``SEGMENTATION_ROLE``)."""
  return _variables(state, families.implementation(config.model.name).SEGMENTATION_ROLE)


def translation_variables(state, config: ml_collections.ConfigDict) -> dict:
  """The variables of the network that translates (the family's ``TRANSLATION_ROLE``)."""
  return _variables(state, families.implementation(config.model.name).TRANSLATION_ROLE)


def load_network(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, role: str,
                 log: Callable[[str], None] | None = None,
                 checkpoint: str = "latest") -> tuple[dict, int]:
  """The variables (``params``, ``batch_stats``) of one network of the newest checkpoint.

  Only that network's arrays are read (not the optimizer states or the other networks), each
  verified against its digest; a checkpoint without per-leaf digests (older than them) is
  restored whole and verified whole, as `load_state` does. The values are those of
  `load_state`'s state either way.

  Returns:
    (variables on the host, checkpoint step).

  Raises:
    UserError: as `load_state`.
  """
  part = {"nets": {role: train_state.abstract_variables(config, role)}}
  try:
    restored, step = load_state(config, workdir, log=log, part=part, checkpoint=checkpoint)
  except checkpoint_lib.NoLeafDigests:
    state, step = load_state(config, workdir, log=log, checkpoint=checkpoint)
    return _variables(state, role), step
  return jax.device_get(restored["nets"][role]), step


def _join(words: Sequence[str], conjunction: str) -> str:
  """"a", "a and b", "a, b and c"."""
  words = list(words)
  return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def check_capability(config: ml_collections.ConfigDict, *, capability: str, task: str,
                     source: pathlib.Path, kind: str = "workdir") -> None:
  """UserError unless the model family of ``config`` (from ``source``, a workdir or a model
  file: ``kind``) has ``capability`` ("segments" or "translates"); ``task``: the job as a verb."""
  if not getattr(families.get(config.model.name), capability):
    able = families.with_capability(**{capability: True})
    raise UserError(f"{source}: model family {config.model.name} does not {task} (only "
                    f"{_join(able, 'and')} do); use a {_join(able, 'or')} {kind}")


def load_model(workdir: str | os.PathLike, *, capability: str, task: str,
               network_only: bool = False, checkpoint: str = "latest",
               check: Callable[[ml_collections.ConfigDict], None] | None = None
               ) -> tuple[ml_collections.ConfigDict, object, int]:
  """The config, newest train state and its step of a training workdir (or a model file).

  Args:
    workdir: A workdir written by ``uagan-jax train`` (``config.json``, ``checkpoints/``), or a
      model file written by ``uagan-jax export`` (`model_file`: ``network_only`` only, and the
      one checkpoint it holds: ``checkpoint`` "latest", the default).
    capability: What the caller needs the model to do: "segments" or "translates" (a
      `families.Family` attribute).
    task: The job as a verb, for the message, e.g. "translate".
    network_only: Read only the variables of the network that does the job (the family's
      ``SEGMENTATION_ROLE`` or ``TRANSLATION_ROLE``, `load_network`) and return them in place
      of the state.
    checkpoint: "latest", "best" or a step (`load_state`).
    check: Called with the config before any checkpoint is read (e.g. to refuse a modality
      the model never trained on without paying for the load).

  Returns:
    (config, train state on one device or the network's variables, checkpoint step).

  Raises:
    UserError: No config.json or checkpoint, or a model family that cannot do the job.
  """
  workdir = pathlib.Path(workdir)
  if model_file.is_model_file(workdir):
    if not network_only:
      raise ValueError("a model file holds the inference networks only: pass network_only")
    return model_file.load_model(workdir, capability=capability, task=task,
                                 checkpoint=checkpoint, check=check)
  config = config_lib.from_json_file(workdir / "config.json")
  # Checked before the checkpoint is read: there is nothing in it that could do the job.
  check_capability(config, capability=capability, task=task, source=workdir)
  if check is not None:
    check(config)
  if network_only:
    family = families.implementation(config.model.name)
    role = family.SEGMENTATION_ROLE if capability == "segments" else family.TRANSLATION_ROLE
    variables, step = load_network(config, workdir, role=role, checkpoint=checkpoint)
    return config, variables, int(step)
  state, step = load_state(config, workdir, checkpoint=checkpoint)
  return config, state, int(step)
