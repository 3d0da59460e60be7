"""Held-out evaluation: whole volumes through the segmentor, Dice per region and modality.

Every held-out case is segmented from each of its modalities separately (the model is unified: one
network, any single modality in). A volume is cut into axial slices exactly as in training,
predicted in fixed-size batches (one compiled program for every volume), thresholded at 0.5, put
back on the volume's grid (the crop/pad undone) and scored against the full label volume.

Dice follows the BraTS convention for empty masks: if neither prediction nor truth has a voxel
of a region, the Dice of that region is 1; if exactly one of them is empty, it is 0.
"""

from __future__ import annotations

import csv
import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uagan_jax.data import MODALITIES, REGIONS

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def dice_per_region(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Dice of each region channel of two boolean (..., R) masks; both empty gives 1, one empty 0."""
  predicted = predicted.reshape(-1, predicted.shape[-1]).astype(bool)
  truth = truth.reshape(-1, truth.shape[-1]).astype(bool)
  intersection = np.sum(predicted & truth, axis=0, dtype=np.int64)
  total = np.sum(predicted, axis=0, dtype=np.int64) + np.sum(truth, axis=0, dtype=np.int64)
  with np.errstate(invalid="ignore", divide="ignore"):
    dice = np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1))
  return dice


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


class SlicePredictor:
  """Segments stacks of preprocessed slices in fixed-size batches with one compiled program."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, batch_size: int):
    from uagan_jax import train  # pylint: disable=g-import-not-at-top
    networks = train.build_networks(config, bn_axis_name=None)
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    clip = config.data.clip

    if networks.unified is not None:
      module = train.unmapped_module(networks.unified)

      def logits_fn(variables, images, modality):
        # UAGAN's segmentation stream; the translation stream runs alongside (its features feed
        # the fusion gates) with the image's own modality as the target.
        _, logits = module.apply(variables, images, modality, modality, train=False,
                                 translation_input=images / clip)
        return logits
    else:
      module = train.unmapped_module(networks.segmentor)

      def logits_fn(variables, images, modality):
        return module.apply(variables, images, modality, train=False)

    @jax.jit
    def predict(variables, images, modality):
      return jax.nn.sigmoid(logits_fn(variables, images, modality))
    self._predict = predict

  def __call__(self, slices: np.ndarray, modality_id: int) -> np.ndarray:
    """(Z, H, W) normalised slices -> (Z, H, W, 3) region probabilities."""
    count = slices.shape[0]
    padded = -count % self.batch_size  # pad the last batch so every call has the same shape
    images = np.concatenate([slices, np.zeros((padded,) + slices.shape[1:], slices.dtype)])
    images = images[..., None]
    modality = np.full((self.batch_size,), modality_id, np.int32)
    out = [np.asarray(self._predict(self.variables, images[i:i + self.batch_size], modality))
           for i in range(0, images.shape[0], self.batch_size)]
    return np.concatenate(out)[:count]


def segment_volume(predictor: SlicePredictor, image: np.ndarray, *, modality: str,
                   config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """A canonical (X, Y, Z) volume -> boolean (X, Y, Z, 3) regions on the same grid, and the
  normalised (Z, H, W) slices (for pictures)."""
  from uagan_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  slices, _, has_brain, crop_pad = preprocess.volume_to_slices(
      image, None, size=tuple(config.data.image_size), clip=config.data.clip)
  probs = np.zeros(slices.shape + (len(REGIONS),), np.float32)
  if has_brain.any():  # slices without brain are background by definition, as in training
    probs[has_brain] = predictor(slices[has_brain], MODALITIES.index(modality))
  return preprocess.slices_to_volume(probs > 0.5, crop_pad, fill=False), slices


# --------------------------------------------------------------------------------------------
# Evaluation of a split
# --------------------------------------------------------------------------------------------


def load_segmentor_variables(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[dict, int]:
  """The newest checkpoint's segmentor variables (params and batch statistics) and its step."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import checkpoint, parallel, train
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise UserError(f"{directory}: no checkpoints; train first with 'uagan-jax train'")
  checkpoints = checkpoint.Checkpointer(directory, every=1, keep=1_000_000)
  step = checkpoints.latest_step()
  if step is None:
    checkpoints.close()
    raise UserError(f"{directory}: no checkpoints; train first with 'uagan-jax train'")
  mesh = parallel.make_mesh(1)
  state = checkpoints.restore(step, train.init_state(config, mesh))
  checkpoints.close()
  return segmentation_variables(state), step


def segmentation_variables(state) -> dict:
  """The variables of the network that segments: the segmentor, or UAGAN's unified network."""
  net = state.nets["unified" if "unified" in state.nets else "segmentor"]
  return jax.device_get({"params": net.params, "batch_stats": net.batch_stats})


def evaluate_split(config: ml_collections.ConfigDict, *, workdir: pathlib.Path,
                   data_dir: pathlib.Path, split: str | None = None, state=None,
                   log: Callable[[str], None] = print) -> dict:
  """Scores every case of ``split`` from each modality; writes CSV, JSON, PNG panels.

  Args:
    config: the run's config.
    workdir: the training workdir (its ``splits.json`` names the cases; outputs go to
      ``workdir/eval_<split>/``).
    data_dir: the data folder the run was trained on.
    split: "test", "val" or "train"; default ``config.eval.split``.
    state: a train state to evaluate; default: the newest checkpoint in ``workdir``.
    log: where progress and the table go.

  Returns:
    ``{"rows": [...per case and modality...], "summary": {modality: {region: mean}}}``.
  """
  # pylint: disable=g-import-not-at-top
  from uagan_jax import visualize
  from uagan_jax.data import readers
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  split = split or config.eval.split
  splits_path = workdir / "splits.json"
  if not splits_path.is_file():
    raise UserError(f"{splits_path}: not found; is {workdir} a training workdir?")
  splits = json.loads(splits_path.read_text())
  if split not in ("train", "val", "test"):
    raise UserError(f"--split {split}: use train, val or test")
  case_ids = list(splits[split])
  if config.eval.max_cases:
    case_ids = case_ids[:config.eval.max_cases]
  if not case_ids:
    raise UserError(f"{splits_path}: the {split} split has no cases")
  cases = {c.case_id: c for c in readers.find_cases(data_dir)}
  missing = [c for c in case_ids if c not in cases]
  if missing:
    raise UserError(f"{data_dir}: cases of the {split} split are missing: {', '.join(missing[:5])}")

  if config.model.name == "stargan":
    log("stargan translates only: there is no segmentation to evaluate")
    return {"rows": [], "summary": {}, "step": None}
  if state is not None:
    variables, step = segmentation_variables(state), int(jax.device_get(state.step))
  else:
    variables, step = load_segmentor_variables(config, workdir)
  predictor = SlicePredictor(config, variables, batch_size=config.eval.batch_size)
  out_dir = workdir / f"eval_{split}"
  figures = workdir / "figures"
  out_dir.mkdir(parents=True, exist_ok=True)
  modalities = [m for m in MODALITIES if m in config.data.modalities]
  rows = []
  started = time.time()
  for number, case_id in enumerate(case_ids, 1):
    volume = readers.load_case(cases[case_id], modalities=modalities)
    if volume.label is None:
      raise UserError(f"{cases[case_id].images[modalities[0]].parent}: case {case_id} has no label "
                      "volume to evaluate against")
    truth = readers.labels_to_regions(volume.label, convention=cases[case_id].label_convention)
    predictions = {}
    for modality in modalities:
      predicted, _ = segment_volume(predictor, volume.images[modality], modality=modality,
                                    config=config)
      predictions[modality] = predicted
      dice = dice_per_region(predicted, truth)
      rows.append({"case": case_id, "modality": modality,
                   **{f"dice_{r}": float(d) for r, d in zip(REGIONS, dice)}})
    if number <= config.eval.panels:
      visualize.segmentation_panel(volume, truth, predictions,
                                   figures / f"{split}_{case_id}_step{step}.png",
                                   title=f"{case_id} ({split}), step {step}")
    elapsed = time.time() - started
    log(f"  evaluated {number}/{len(case_ids)} {split} cases ({case_id}); "
        f"ETA {elapsed / number * (len(case_ids) - number):.0f} s")

  summary = {m: {r: float(np.mean([row[f"dice_{r}"] for row in rows if row["modality"] == m]))
                 for r in REGIONS} for m in modalities}
  with (out_dir / "dice.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  (out_dir / "summary.json").write_text(json.dumps(
      {"step": step, "split": split, "cases": len(case_ids), "dice_mean": summary}, indent=2))
  log(format_table(rows, modalities, title=f"Dice on {len(case_ids)} {split} cases, step {step}"))
  log(f"per-case rows in {out_dir / 'dice.csv'}, panels in {figures}")
  return {"rows": rows, "summary": summary, "step": step}


def format_table(rows: list[dict], modalities, *, title: str) -> str:
  """Mean (and standard deviation) Dice per modality and region, as a fixed-width table."""
  lines = [title, f"{'modality':<9}" + "".join(f"{r:>16}" for r in REGIONS) + f"{'mean':>9}"]
  for modality in modalities:
    cells, means = [], []
    for region in REGIONS:
      values = np.array([r[f"dice_{region}"] for r in rows if r["modality"] == modality])
      means.append(values.mean())
      cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
    lines.append(f"{modality:<9}" + "".join(f"{c:>16}" for c in cells) + f"{np.mean(means):>9.3f}")
  return "\n".join(lines)
