"""PNG pictures: segmentation panels (image, ground truth, prediction) per modality, translation
panels, and training curves (every training loss, among them the Dice loss, and validation Dice)
over steps. The panels' ``*_figure`` functions and `figure_pixels` give the same pictures as
pixel arrays (the trainer's TensorBoard images, `uagan_jax.tensorboard`).

Colours follow the BraTS figures: oedema (WT minus TC) green, necrotic/non-enhancing core (TC
minus ET) red, enhancing tumour (ET) yellow.
"""

from __future__ import annotations

import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from uagan_jax.data import REGIONS  # pylint: disable=wrong-import-position

_COLOURS = {"oedema": (0.1, 0.85, 0.2), "core": (0.9, 0.1, 0.1), "enhancing": (1.0, 0.9, 0.0)}
# Resolutions of the PNG panels (and of the same panels as TensorBoard images).
SEGMENTATION_DPI = 90
TRANSLATION_DPI = 80


def overlay(image: np.ndarray, regions: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
  """A grey (H, W) image with nested (H, W, 3) WT/TC/ET masks painted on it -> RGB (H, W, 3)."""
  lo, hi = np.percentile(image, [0.5, 99.5]) if image.any() else (0.0, 1.0)
  grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  wt, tc, et = (regions[..., i].astype(bool) for i in range(len(REGIONS)))
  for mask, colour in ((wt & ~tc, "oedema"), (tc & ~et, "core"), (et, "enhancing")):
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(_COLOURS[colour])
  return rgb


def tumour_slice(regions: np.ndarray) -> int:
  """Index along axis 2 of the axial slice with the most whole-tumour voxels (middle if none).

  ``regions`` is (X, Y, Z, 3) WT/TC/ET (or any (X, Y, Z, ...) whose channel 0 is the tumour)."""
  area = regions[..., 0].sum(axis=(0, 1))
  return int(np.argmax(area)) if area.any() else regions.shape[2] // 2


def _display(array_xy: np.ndarray) -> np.ndarray:
  # Canonical RAS volumes have x to the right, y anterior: transpose and flip so anterior is up.
  return np.flipud(np.swapaxes(array_xy, 0, 1))


CASE_DICE_LABEL = "3D Dice of the case"


def case_dice_label(scores: dict[str, float]) -> str:
  """The Dice line above a prediction: ``scores`` (``{"dice_WT": ..., ...}``, as
  `evaluate.score_case` gives) are of the whole case's volume, not of the slice drawn, and the
  text says so: "3D Dice of the case: WT 0.81 TC 0.70 ET 0.55"."""
  return f"{CASE_DICE_LABEL}: " + " ".join(f"{r} {scores[f'dice_{r}']:.2f}" for r in REGIONS)


def segmentation_panel(volume, truth: np.ndarray, predictions: dict[str, np.ndarray],
                       path: pathlib.Path, *, title: str,
                       scores: dict[str, dict[str, float]] | None = None) -> pathlib.Path:
  """One row per modality: image, image + ground truth, image + prediction, at the tumour slice.

  The slice is the axial slice where the true tumour is largest (where the predicted one is, in
  any modality, when the case has no tumour).

  Args:
    volume: a `readers.Volume` (canonical orientation).
    truth: (X, Y, Z, 3) boolean true regions.
    predictions: modality -> (X, Y, Z, 3) boolean predicted regions.
    path: PNG to write (folders are created).
    title: figure title.
    scores: modality -> ``{"dice_WT": ..., ...}`` (`evaluate.score_case`): the 3D Dice of the
      whole case, shown above each prediction as such (`case_dice_label`).

  Returns:
    ``path``.
  """
  return _save(segmentation_panel_figure(volume, truth, predictions, title=title, scores=scores),
               path, dpi=SEGMENTATION_DPI)


def segmentation_panel_figure(volume, truth: np.ndarray, predictions: dict[str, np.ndarray], *,
                              title: str, scores: dict[str, dict[str, float]] | None = None):
  """The figure `segmentation_panel` saves (a matplotlib Figure; close it)."""
  if truth[..., 0].any() or not predictions:
    z = tumour_slice(truth)
  else:
    z = tumour_slice(np.any(np.stack([p[..., :1] for p in predictions.values()]), axis=0))
  modalities = list(predictions)
  fig, axes = plt.subplots(len(modalities), 3, figsize=(7.5, 2.6 * len(modalities)), squeeze=False)
  for row, modality in enumerate(modalities):
    image = volume.images[modality][:, :, z]
    label = "prediction"
    if scores and modality in scores:
      label += "\n" + case_dice_label(scores[modality])
    panels = [(overlay(image, np.zeros(image.shape + (3,), bool), alpha=0), modality.upper()),
              (overlay(image, truth[:, :, z]), "ground truth"),
              (overlay(image, predictions[modality][:, :, z]), label)]
    for col, (rgb, text) in enumerate(panels):
      ax = axes[row, col]
      ax.imshow(_display(rgb), interpolation="nearest")
      ax.set_title(text, fontsize=8)
      ax.axis("off")
  handles = [matplotlib.patches.Patch(color=_COLOURS[k], label=v) for k, v in
             (("oedema", "oedema (WT-TC)"), ("core", "core (TC-ET)"), ("enhancing", "enhancing (ET)"))]
  fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
  fig.suptitle(f"{title}, axial slice {z}", fontsize=10)
  fig.tight_layout(rect=(0, 0.03, 1, 0.97))
  return fig


def translation_panel(panel: dict, path: pathlib.Path, *, title: str, clip: float) -> pathlib.Path:
  """Top row: the true image of each modality. Row per source: its translation into each column's
  modality, and on the diagonal the source image itself, the row's input. Normalised intensities,
  one grey scale [-clip, clip] for all, so contrasts compare across panels."""
  return _save(translation_panel_figure(panel, title=title, clip=clip), path,
               dpi=TRANSLATION_DPI)


def translation_panel_figure(panel: dict, *, title: str, clip: float):
  """The figure `translation_panel` saves (a matplotlib Figure; close it)."""
  modalities = list(panel["true"])
  n = len(modalities)
  fig, axes = plt.subplots(n + 1, n, figsize=(2.1 * n, 2.1 * (n + 1)), squeeze=False)
  for col, target in enumerate(modalities):
    axes[0, col].imshow(_display(panel["true"][target]), cmap="gray", vmin=-clip, vmax=clip)
    axes[0, col].set_title(f"true {target.upper()}", fontsize=9)
    for row, source in enumerate(modalities, start=1):
      axes[row, col].imshow(_display(panel["translated"][(source, target)]), cmap="gray",
                            vmin=-clip, vmax=clip)
      label = (f"{source.upper()} input" if source == target
               else f"{source.upper()} -> {target.upper()}")
      axes[row, col].set_title(label, fontsize=8)
  for ax in axes.flat:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  return fig


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  """The rows of a ``.jsonl`` log (none if it does not exist; stops at a line cut short)."""
  rows = []
  if pathlib.Path(path).is_file():
    for line in pathlib.Path(path).read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def _is_loss(key: str) -> bool:
  # Norms (gradient, update, parameter) and ramped weights are diagnostics, not losses.
  return key != "step" and not key.endswith(("norm", "_weight"))


VALIDATION_DICE_TITLE = "Dice (validation, mean over modalities)"


# The y-label of each training loss, by the last part of its ``metrics.jsonl`` key (``seg/bce`` ->
# "bce"); `losses` and `families.shared` define them. A key not listed is labelled by its name.
_LOSS_QUANTITIES = {
    "dice": "Dice loss (1 - soft Dice)",
    "bce": "binary cross-entropy",
    "weighted_ce": "class-weighted cross-entropy",
    "adversarial": "multi-scale L1 (S vs C)",
    "l1": "multi-scale L1 (C maximises)",
    "shape": "shape loss",
    "gradient_penalty": "gradient penalty",
    "cls": "modality cross-entropy",
    "cycle": "cycle L1",
    "identity": "identity L1",
    "total": "weighted sum of the terms",
}
_WGAN_QUANTITIES = {"disc": "WGAN loss: D(fake) - D(real)", "gen": "WGAN loss: -D(fake)"}


def train_panel_labels(key: str) -> tuple[str, str]:
  """(title, y-label) of the subplot of ``metrics.jsonl`` column ``key``: a training-batch loss.

  The y-label names the quantity (never empty). The Dice term (``seg/dice``) is the soft Dice
  *loss*, 1 - soft Dice on the training batch (lower is better); it is named so, and kept apart
  from the validation Dice (higher is better).
  """
  group, _, name = key.rpartition("/")
  if name == "wgan":
    quantity = _WGAN_QUANTITIES.get(group, "WGAN loss")
  else:
    quantity = _LOSS_QUANTITIES.get(name, name.replace("_", " "))
  if name == "dice":
    return f"{key}: Dice loss (train)\n= 1 - soft Dice, lower is better", quantity
  return f"{key} (train)", quantity


def training_curves_figure(metrics_path: pathlib.Path, validation_path: pathlib.Path | None):
  """The figure `training_curves` saves (a matplotlib Figure; close it), or None if empty.

  One subplot per loss of ``metrics.jsonl`` over steps (titled by `train_panel_labels`), and one
  of validation Dice per region (`VALIDATION_DICE_TITLE`, y from 0 to 1) when there are
  validation rows.
  """
  rows = _read_jsonl(metrics_path)
  validation = _read_jsonl(validation_path) if validation_path is not None else []
  keys = sorted({k for row in rows for k in row if _is_loss(k)})
  panels = len(keys) + (1 if validation else 0)
  if not panels:
    return None
  columns = min(4, panels)
  grid_rows = math.ceil(panels / columns)
  fig, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 2.5 * grid_rows),
                           squeeze=False)
  for ax, key in zip(axes.flat, keys):
    points = [(row["step"], row[key]) for row in rows if key in row]
    ax.plot(*zip(*points), linewidth=1, marker="." if len(points) < 30 else None)
    title, ylabel = train_panel_labels(key)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
  if validation:
    ax = axes.flat[len(keys)]
    steps = [row["step"] for row in validation]
    for region in REGIONS:
      ax.plot(steps, [row[f"dice/{region}"] for row in validation], marker="o", markersize=3,
              linewidth=1, label=region)
    ax.set_title(VALIDATION_DICE_TITLE, fontsize=9)
    ax.set_ylabel("Dice, higher is better", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
  for ax in axes.flat[panels:]:
    ax.axis("off")
  for ax in axes.flat[:panels]:
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  return fig


def training_curves(metrics_path: pathlib.Path, validation_path: pathlib.Path | None,
                    path: pathlib.Path) -> pathlib.Path | None:
  """One subplot per loss of ``metrics.jsonl`` over steps, and one of validation Dice per region.

  The training panels are losses on training batches: ``seg/dice`` is the Dice *loss* (1 - soft
  Dice, lower is better), titled so; the validation panel is Dice itself (higher is better).

  Args:
    metrics_path: the trainer's ``metrics.jsonl`` (``{"step": t, "<loss>": value, ...}`` rows).
    validation_path: its ``validation.jsonl`` (``{"step": t, "dice/WT": ..., ...}`` rows), or
      None; the Dice subplot is left out when there are no rows.
    path: PNG to write (folders are created).

  Returns:
    ``path``, or None when there is nothing to draw (no logged step).
  """
  fig = training_curves_figure(metrics_path, validation_path)
  return None if fig is None else _save(fig, path, dpi=80)


def figure_pixels(fig, *, dpi: int) -> np.ndarray:
  """``fig`` drawn at ``dpi`` as a (H, W, 3) uint8 RGB array (what its PNG would hold); closes it."""
  try:
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.array(fig.canvas.buffer_rgba())[..., :3]
  finally:
    plt.close(fig)


def _save(fig, path: pathlib.Path, *, dpi: int) -> pathlib.Path:
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
  except OSError as e:  # disk full or read-only: one line, not matplotlib's traceback
    from uagan_jax import workdir  # pylint: disable=g-import-not-at-top
    raise workdir.disk_error(path, e, doing="drawing it") from None
  finally:
    plt.close(fig)
  return path
