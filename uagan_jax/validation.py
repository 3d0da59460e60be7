"""Validation during training: Dice on the val split, a log row, and the best checkpoint.

Every ``train.validate_every`` steps (and at the last step) the segmentation of the val cases is
scored from each trained modality, like `evaluate.evaluate_split` but Dice only and no files, so
it is cheap enough to run every few hundred steps. The rows go to ``validation.jsonl``; the
checkpoint with the highest mean Dice is kept in ``checkpoints_best/``, its score stored with it.

It only reads the state, so training takes the same path, bit for bit, with or without it.
With an `uagan_jax.tensorboard.EventLog` the rows also go to TensorBoard as scalars (but the
number of val cases, a count, which goes once as text), with a segmentation panel of the first val
case (`TranslationPanel` draws the translation panel).

With several processes, process 0 alone validates (on its own replica of the state, so the
numbers are those of one process) and writes the rows; it sends the score to the others, and all
of them join the best checkpoint's save (Orbax saves are collective: the state spans every
process's devices).
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from uagan_jax import checkpoint, distributed, evaluate, inference, visualize
from uagan_jax.data import MODALITIES, REGIONS, readers
from uagan_jax.train_utils import MetricsLog


def describe_cases(count: int) -> str:
  """The text TensorBoard shows under ``validation/cases``."""
  return (f"{evaluate.count(count, 'val case')}: validation/dice/* is the 3D Dice of each "
          "case, averaged over them (and over the modalities where the tag names none)")


class Validator:
  """Dice on held-out cases (segmenting models only): a flat log row.

  The predictor is compiled on the first call and reused with each later call's variables.
  After a call, ``example`` holds the first case's volume, truth, predictions and Dice (for a
  picture: `panel_pixels`).
  """

  def __init__(self, config: ml_collections.ConfigDict, cases: Sequence):
    """``cases``: the `readers.CaseFiles` to validate on (with labels)."""
    self.config = config
    self.cases = list(cases)
    self.modalities = [m for m in MODALITIES if m in config.data.modalities]
    self._predictor = None
    self.example = None

  def __call__(self, state) -> dict[str, float]:
    """``{"cases": n, "dice/<region>": mean over cases and modalities, "dice/mean": mean over
    regions, "dice/<modality>/<region>": mean over cases}`` for ``state``."""
    variables = inference.segmentation_variables(state, self.config)
    if self._predictor is None:
      self._predictor = inference.SlicePredictor(self.config, variables,
                                                 batch_size=self.config.eval.batch_size)
    else:
      self._predictor.set_variables(variables)
    dice = {m: [] for m in self.modalities}
    for number, case in enumerate(self.cases):
      volume = readers.load_case(case, modalities=self.modalities, with_label=True)
      truth = evaluate.truth_regions(volume, case)
      predictions = {}
      for modality in self.modalities:
        predictions[modality] = inference.segment_volume(
            self._predictor, volume.images[modality], modality=modality, config=self.config,
            spacing=volume.spacing)
        dice[modality].append(evaluate.dice_per_region(predictions[modality], truth))
      if number == 0:
        self.example = (case.case_id, volume, truth, predictions,
                        {m: dice[m][0] for m in self.modalities})
    per_modality = {m: np.mean(dice[m], axis=0) for m in self.modalities}
    row = {"cases": len(self.cases)}
    for index, region in enumerate(REGIONS):
      row[f"dice/{region}"] = float(np.mean([per_modality[m][index] for m in self.modalities]))
    row["dice/mean"] = float(np.mean([row[f"dice/{region}"] for region in REGIONS]))
    for modality in self.modalities:
      for index, region in enumerate(REGIONS):
        row[f"dice/{modality}/{region}"] = float(per_modality[modality][index])
    return row

  def panel_pixels(self, title: str) -> np.ndarray:
    """The segmentation panel of ``example`` (`visualize.segmentation_panel`, the case's 3D Dice
    above each prediction, `visualize.case_dice_label`) as (H, W, 3) uint8 pixels."""
    case_id, volume, truth, predictions, dice = self.example
    scores = {m: {f"dice_{region}": float(dice[m][i]) for i, region in enumerate(REGIONS)}
              for m in predictions}
    figure = visualize.segmentation_panel_figure(volume, truth, predictions,
                                                 title=f"{case_id} (val), {title}", scores=scores)
    return visualize.figure_pixels(figure, dpi=visualize.SEGMENTATION_DPI)


class TranslationPanel:
  """The translation panel of one case (`evaluate.translation_panel`) for a train state, as
  pixels; the translator is compiled on the first call and reused with later variables."""

  def __init__(self, config: ml_collections.ConfigDict, case):
    """``case``: the `readers.CaseFiles` drawn (read on the first call)."""
    self.config = config
    self.case = case
    self.modalities = [m for m in MODALITIES if m in config.data.modalities]
    self._volume = None
    self._translator = None

  def __call__(self, state, title: str) -> np.ndarray:
    """(H, W, 3) uint8 pixels of the panel for ``state`` (this process's copy)."""
    variables = inference.translation_variables(state, self.config)
    if self._translator is None:
      self._translator = inference.SliceTranslator(self.config, variables,
                                                   batch_size=self.config.eval.batch_size)
      self._volume = readers.load_case(self.case, modalities=self.modalities, with_label=False)
    else:
      self._translator.set_variables(variables)
    panel = evaluate.translation_panel(self._translator, self._volume, self.modalities,
                                       self.config, spacing=self._volume.spacing)
    figure = visualize.translation_panel_figure(panel, title=f"{self.case.case_id} (val), {title}",
                                                clip=self.config.data.clip)
    return visualize.figure_pixels(figure, dpi=visualize.TRANSLATION_DPI)


class Validation:
  """The trainer's validation: when it is due, the row it writes and the best checkpoint.

  Resuming stays equal to an uninterrupted run: rows past the restored step are dropped (as in
  `MetricsLog`) and written again by the replayed steps; the best score so far is read from the
  best checkpoint, which is kept even when it is newer than the restored step (the replayed steps
  reach the same state and score, and an equal score never replaces it).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, workdir: pathlib.Path, cases,
               resume_step: int, log: Callable[[str], None], events=None):
    """``events``: an `uagan_jax.tensorboard.EventLog` that also gets the rows and a
    segmentation panel (process 0's), or None."""
    self.every = config.train.validate_every
    self.events = events
    self.last = config.train.steps
    self.log = log
    self.main = distributed.is_main()
    self.validator = Validator(config, cases) if self.main else None
    self.rows = (MetricsLog(workdir / "validation.jsonl", resume_step=resume_step)
                 if self.main else None)
    self._described = False  # the number of val cases written to the events (once a run)
    self.checkpoints = checkpoint.Checkpointer(workdir / inference.CHECKPOINT_DIRS["best"],
                                               every=1, keep=1, best_metric="dice_mean")
    self.best_step = self.checkpoints.latest_step()
    self.best = -math.inf
    if self.best_step is not None:
      self.best = (self.checkpoints.metrics(self.best_step) or {}).get("dice_mean", -math.inf)

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.last

  def __call__(self, step: int, state) -> float:
    """Validates ``state`` (after ``step`` steps); returns the seconds it took."""
    started = time.time()
    if self.main:
      row = {"step": step, **self.validator(distributed.local_copy(state))}
      score = row["dice/mean"]
    score = distributed.broadcast_from_main(score if self.main else math.nan)
    if score > self.best and step != self.best_step:  # a replayed step's best is there already
      self.checkpoints.save(step, state, force=True, metrics={"dice_mean": score})
      self.best, self.best_step = score, step
    if not self.main:
      return time.time() - started
    self.rows.write(row)
    if self.events is not None:
      # The row's values over steps, as curves; the number of cases is the same at every step,
      # a count to read once, not a curve.
      self.events.scalars(step, {k: v for k, v in row.items() if k not in ("step", "cases")},
                          prefix="validation/")
      if not self._described:
        self.events.text(step, "validation/cases", describe_cases(row["cases"]))
        self._described = True
      self.events.image(step, "panels/segmentation", self.validator.panel_pixels(f"step {step}"))
      self.events.flush()
    regions = "  ".join(f"{r} {row[f'dice/{r}']:.3f}" for r in REGIONS)
    self.log(f"validation step {step}: Dice {regions} (mean over modalities, {row['cases']} val "
             f"cases); mean {score:.3f}, best {self.best:.3f} at step {self.best_step} "
             f"[{time.time() - started:.1f} s]")
    return time.time() - started

  def close(self) -> None:
    self.checkpoints.close()
