"""Inference with a trained model: slices through the networks, volumes through the slices.

Every command that runs a trained network goes through here: evaluation, validation during
training, ``predict`` and ``translate``. The model family (`uagan_jax.families`) gives the
functions; nothing here asks which family it is.

* `SlicePredictor`, `SliceTranslator`: stacks of normalised slices in fixed-size batches, one
  compiled program for every volume.
* `segment_volume`, `translate_slices`: a volume cut into axial slices exactly as in training.
* `load_state`, `load_model`: a workdir's checkpoint; `segmentation_variables` and
  `translation_variables`: the variables of the network that does the job.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from uagan_jax import checkpoint as checkpoint_lib
from uagan_jax import config as config_lib
from uagan_jax import families, train_state
from uagan_jax.data import MODALITIES, REGIONS, preprocess
from uagan_jax.errors import UserError

# Workdir folder of each checkpoint kind that can be loaded.
CHECKPOINT_DIRS = {"latest": "checkpoints", "best": "checkpoints_best"}


# --------------------------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------------------------


def _compiled(config: ml_collections.ConfigDict, capability: str, function: str) -> Callable:
  """The family's ``function`` (``segment_fn`` or ``translate_fn``) over its networks, jitted."""
  if not getattr(families.get(config.model.name), capability):
    raise ValueError(f"model {config.model.name} does not {capability.removesuffix('s')}")
  networks = train_state.build_networks(config, bn_axis_name=None)
  return jax.jit(getattr(families.implementation(config.model.name), function)(networks, config))


class SlicePredictor:
  """Segments stacks of preprocessed slices in fixed-size batches with one compiled program."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, batch_size: int):
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self._predict = _compiled(config, "segments", "segment_fn")

  def set_variables(self, variables: dict) -> None:
    """Predicts with other variables of the same shapes, reusing the compiled program."""
    self.variables = jax.device_put(variables)

  def __call__(self, slices: np.ndarray, modality_id: int) -> np.ndarray:
    """(Z, H, W) normalised slices -> (Z, H, W, 3) region probabilities."""
    modality = np.full((self.batch_size,), modality_id, np.int32)
    return _in_fixed_batches(lambda images: self._predict(self.variables, images, modality),
                             slices, self.batch_size)


class SliceTranslator:
  """Translates stacks of normalised slices into another modality, in fixed-size batches.

  Inputs and outputs are in the normalised space of training: z-scores clipped to [-clip, clip].
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, batch_size: int):
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self._translate = _compiled(config, "translates", "translate_fn")

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


def segment_volume(predictor: SlicePredictor, image: np.ndarray, *, modality: str,
                   config: ml_collections.ConfigDict) -> np.ndarray:
  """A canonical (X, Y, Z) volume -> boolean (X, Y, Z, 3) regions on the same grid."""
  slices, _, has_brain, crop_pad = preprocess.volume_to_slices(
      image, None, size=tuple(config.data.image_size), clip=config.data.clip)
  probs = np.zeros(slices.shape + (len(REGIONS),), np.float32)
  if has_brain.any():  # slices without brain are background by definition, as in training
    probs[has_brain] = predictor(slices[has_brain], MODALITIES.index(modality))
  return preprocess.slices_to_volume(probs > 0.5, crop_pad, fill=False)


# --------------------------------------------------------------------------------------------
# Models from workdirs
# --------------------------------------------------------------------------------------------


def load_state(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
               checkpoint: str = "latest", log: Callable[[str], None] | None = None):
  """A checkpoint's train state (on one device) and its step.

  An unreadable checkpoint (damaged or missing files, a wrong digest) is reported in one line
  through ``log`` (default: stderr) and the newest readable one before it is used instead; the
  workdir is left as it is.

  Args:
    config: the run's config.
    workdir: the training workdir.
    checkpoint: "latest" (the newest checkpoint in ``checkpoints/``) or "best" (the one kept in
      ``checkpoints_best/`` for the highest validation Dice, see ``train.validate_every``).
    log: where the note on an unreadable checkpoint goes.

  Raises:
    UserError: no checkpoint, or none readable (naming the folder).
  """
  if log is None:
    log = lambda message: print(f"warning: {message}", file=sys.stderr, flush=True)
  if checkpoint not in CHECKPOINT_DIRS:
    raise UserError(f"--checkpoint {checkpoint}: use {' or '.join(CHECKPOINT_DIRS)}")
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
    state, step = checkpoints.restore_newest(train_state.abstract_state(config), log=log)
  finally:
    checkpoints.close()
  return state, step


def _variables(state, role: str) -> dict:
  net = state.nets[role]
  return jax.device_get({"params": net.params, "batch_stats": net.batch_stats})


def segmentation_variables(state, config: ml_collections.ConfigDict) -> dict:
  """The variables of the network that segments (the family's ``SEGMENTATION_ROLE``)."""
  return _variables(state, families.implementation(config.model.name).SEGMENTATION_ROLE)


def translation_variables(state, config: ml_collections.ConfigDict) -> dict:
  """The variables of the network that translates (the family's ``TRANSLATION_ROLE``)."""
  return _variables(state, families.implementation(config.model.name).TRANSLATION_ROLE)


def _join(words: Sequence[str], conjunction: str) -> str:
  """"a", "a and b", "a, b and c"."""
  words = list(words)
  return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def load_model(workdir: str | os.PathLike, *, capability: str,
               task: str) -> tuple[ml_collections.ConfigDict, object, int]:
  """The config, newest train state and its step of a training workdir.

  Args:
    workdir: A workdir written by ``uagan-jax train`` (``config.json``, ``checkpoints/``).
    capability: What the caller needs the model to do: "segments" or "translates" (a
      `families.Family` attribute).
    task: The job as a verb, for the message, e.g. "translate".

  Returns:
    (config, train state on one device, checkpoint step).

  Raises:
    UserError: No config.json or checkpoint, or a model family that cannot do the job.
  """
  workdir = pathlib.Path(workdir)
  config = config_lib.from_json_file(workdir / "config.json")
  if not getattr(families.get(config.model.name), capability):
    # Checked before the checkpoint is read: there is nothing in it that could do the job.
    able = families.with_capability(**{capability: True})
    raise UserError(f"{workdir}: model family {config.model.name} does not {task} (only "
                    f"{_join(able, 'and')} do); use a {_join(able, 'or')} workdir")
  state, step = load_state(config, workdir)
  return config, state, int(step)
