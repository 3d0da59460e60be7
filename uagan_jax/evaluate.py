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
      allowed = [MODALITIES.index(m) for m in config.data.modalities]

      def probs_fn(variables, images, modality):
        # UAGAN's segmentation stream takes the translation stream's features through the fusion
        # gates, and in training that stream always translates into *another* modality. So the
        # prediction is the mean over every other trained modality as the target (with a single
        # trained modality, the target is the source itself).
        total = 0.0
        for offset in range(1, max(len(allowed), 2)):
          position = jnp.argmax(jnp.asarray(allowed) == modality[:, None], axis=-1)
          target = jnp.asarray(allowed)[(position + offset) % len(allowed)]
          _, logits = module.apply(variables, images, modality, target, train=False,
                                   translation_input=images / clip)
          total = total + jax.nn.sigmoid(logits)
        return total / max(len(allowed) - 1, 1)
    else:
      module = train.unmapped_module(networks.segmentor)

      def probs_fn(variables, images, modality):
        return jax.nn.sigmoid(module.apply(variables, images, modality, train=False))

    self._predict = jax.jit(probs_fn)

  def __call__(self, slices: np.ndarray, modality_id: int) -> np.ndarray:
    """(Z, H, W) normalised slices -> (Z, H, W, 3) region probabilities."""
    modality = np.full((self.batch_size,), modality_id, np.int32)
    return _in_fixed_batches(lambda images: self._predict(self.variables, images, modality),
                             slices, self.batch_size)


class SliceTranslator:
  """Translates stacks of normalised slices into another modality, in fixed-size batches.

  Works for stargan (the generator) and uagan (the translation stream of the unified network).
  Inputs and outputs are in the normalised space of training: z-scores clipped to [-clip, clip].
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict, *, batch_size: int):
    from uagan_jax import train  # pylint: disable=g-import-not-at-top
    networks = train.build_networks(config, bn_axis_name=None)
    clip = config.data.clip
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    if networks.unified is not None:
      module = train.unmapped_module(networks.unified)

      def translate(variables, images, source, target):
        translated, _ = module.apply(variables, images, source, target, train=False,
                                     translation_input=images / clip)
        return translated * clip
    elif networks.generator is not None:
      module = networks.generator

      def translate(variables, images, source, target):
        del source
        return module.apply(variables, images / clip, target) * clip
    else:
      raise ValueError(f"model {config.model.name} does not translate")
    self._translate = jax.jit(translate)

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
  from uagan_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  slices, _, has_brain, crop_pad = preprocess.volume_to_slices(
      image, None, size=tuple(config.data.image_size), clip=config.data.clip)
  probs = np.zeros(slices.shape + (len(REGIONS),), np.float32)
  if has_brain.any():  # slices without brain are background by definition, as in training
    probs[has_brain] = predictor(slices[has_brain], MODALITIES.index(modality))
  return preprocess.slices_to_volume(probs > 0.5, crop_pad, fill=False)


# --------------------------------------------------------------------------------------------
# Evaluation of a split
# --------------------------------------------------------------------------------------------


def load_state(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """The newest checkpoint's train state (on one device) and its step."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import checkpoint, train
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  directory = pathlib.Path(workdir) / "checkpoints"
  checkpoints = step = None
  if directory.is_dir():
    checkpoints = checkpoint.Checkpointer(directory, every=1, keep=1_000_000)
    step = checkpoints.latest_step()
  if step is None:
    if checkpoints is not None:
      checkpoints.close()
    raise UserError(f"{directory}: no checkpoints; train first with 'uagan-jax train'")
  try:
    state = checkpoints.restore(step, train.abstract_state(config))
  finally:
    checkpoints.close()
  return state, step


def load_segmentor_variables(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[dict, int]:
  """The newest checkpoint's segmentation variables (params and batch statistics) and its step."""
  state, step = load_state(config, workdir)
  return segmentation_variables(state), step


def translation_variables(state) -> dict:
  """The variables of the network that translates: StarGAN's generator or UAGAN's unified one."""
  net = state.nets["unified" if "unified" in state.nets else "generator"]
  return jax.device_get({"params": net.params, "batch_stats": net.batch_stats})


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

  if state is not None:
    step = int(jax.device_get(state.step))
  else:
    state, step = load_state(config, workdir)
  segments = config.model.name != "stargan"
  translates = config.model.name in ("stargan", "uagan")
  predictor = (SlicePredictor(config, segmentation_variables(state),
                              batch_size=config.eval.batch_size) if segments else None)
  translator = (SliceTranslator(config, translation_variables(state),
                                batch_size=config.eval.batch_size) if translates else None)
  out_dir = workdir / f"eval_{split}"
  figures = workdir / "figures"
  out_dir.mkdir(parents=True, exist_ok=True)
  modalities = [m for m in MODALITIES if m in config.data.modalities]
  rows, translation_rows = [], []
  started = time.time()
  for number, case_id in enumerate(case_ids, 1):
    volume = readers.load_case(cases[case_id], modalities=modalities, with_label=segments)
    if segments:
      if volume.label is None:
        raise UserError(f"{cases[case_id].images[modalities[0]].parent}: case {case_id} has no "
                        "label volume to evaluate against")
      truth = readers.labels_to_regions(volume.label, convention=cases[case_id].label_convention)
      predictions = {}
      for modality in modalities:
        predicted = segment_volume(predictor, volume.images[modality], modality=modality,
                                      config=config)
        predictions[modality] = predicted
        dice = dice_per_region(predicted, truth)
        rows.append({"case": case_id, "modality": modality,
                     **{f"dice_{r}": float(d) for r, d in zip(REGIONS, dice)}})
      if number <= config.eval.panels:
        visualize.segmentation_panel(volume, truth, predictions,
                                     figures / f"{split}_{case_id}_step{step}.png",
                                     title=f"{case_id} ({split}), step {step}")
    if translates:
      case_rows, panel = _evaluate_translation(translator, volume, case_id, modalities, config)
      translation_rows.extend(case_rows)
      if number <= config.eval.panels:
        visualize.translation_panel(panel, figures / f"{split}_{case_id}_translation_step{step}.png",
                                    title=f"{case_id} ({split}), step {step}",
                                    clip=config.data.clip)
    elapsed = time.time() - started
    log(f"  evaluated {number}/{len(case_ids)} {split} cases ({case_id}); "
        f"ETA {elapsed / number * (len(case_ids) - number):.0f} s")

  report = {"step": step, "split": split, "cases": len(case_ids)}
  if rows:
    report["dice_mean"] = {
        m: {r: float(np.mean([row[f"dice_{r}"] for row in rows if row["modality"] == m]))
            for r in REGIONS} for m in modalities}
    _write_csv(out_dir / "dice.csv", rows)
    log(format_table(rows, modalities, title=f"Dice on {len(case_ids)} {split} cases, step {step}"))
  if translation_rows:
    report["translation_mean"] = {
        f"{a}->{b}": {k: float(np.mean([r[k] for r in translation_rows
                                        if r["source"] == a and r["target"] == b]))
                      for k in _TRANSLATION_KEYS}
        for a in modalities for b in modalities if a != b}
    _write_csv(out_dir / "translation.csv", translation_rows)
    log(format_translation_table(report["translation_mean"],
                                 title=f"Translation on {len(case_ids)} {split} cases, step {step} "
                                       "(normalised intensities; identity = the source image as is)"))
  (out_dir / "summary.json").write_text(json.dumps(report, indent=2))
  log(f"per-case rows and summary.json in {out_dir}, panels in {figures}")
  return {"rows": rows, "translation_rows": translation_rows, "summary": report.get("dice_mean", {}),
          "report": report, "step": step}


_TRANSLATION_KEYS = ("mae", "psnr", "ssim", "identity_mae", "identity_psnr", "identity_ssim")


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _evaluate_translation(translator: SliceTranslator, volume, case_id: str, modalities,
                          config) -> tuple[list[dict], dict]:
  """Every source->target pair of one case against the true target image (held out in training:
  no patient's modalities are ever paired), with the identity baseline beside it.

  Returns the rows and, for the picture, the true and translated slices at the middle of the brain.
  """
  # pylint: disable=g-import-not-at-top
  from uagan_jax import metrics
  from uagan_jax.data import preprocess
  # pylint: enable=g-import-not-at-top
  size, clip = tuple(config.data.image_size), config.data.clip
  normalised = {}
  for modality in modalities:
    slices, _, has_brain, _ = preprocess.volume_to_slices(volume.images[modality], None, size=size,
                                                          clip=clip)
    normalised[modality] = (slices, has_brain)
  brain_slices = np.flatnonzero(normalised[modalities[0]][1])
  middle = int(brain_slices[len(brain_slices) // 2]) if len(brain_slices) else 0
  panel = {"true": {m: normalised[m][0][middle] for m in modalities}, "translated": {}}
  rows = []
  data_range = 2.0 * clip
  for source in modalities:
    source_slices, has_brain = normalised[source]
    for target in modalities:
      translated = translate_slices(translator, source_slices, has_brain, source=source,
                                    target=target)
      panel["translated"][(source, target)] = translated[middle]
      if source == target:
        continue
      truth = normalised[target][0]
      keep = has_brain & normalised[target][1]
      mask = truth[keep] != 0
      row = {"case": case_id, "source": source, "target": target}
      for prefix, candidate in (("", translated), ("identity_", source_slices)):
        row[prefix + "mae"] = metrics.mae(predicted=candidate[keep], target=truth[keep], mask=mask)
        row[prefix + "psnr"] = metrics.psnr(predicted=candidate[keep], target=truth[keep],
                                            data_range=data_range, mask=mask)
        row[prefix + "ssim"] = metrics.ssim(predicted=candidate[keep], target=truth[keep],
                                            data_range=data_range)
      rows.append(row)
  return rows, panel


def format_translation_table(summary: dict[str, dict], *, title: str) -> str:
  """PSNR, SSIM and MAE per source->target pair, the model beside the identity baseline."""
  lines = [title, f"{'pair':<14}{'PSNR dB':>9}{'(ident.)':>10}{'SSIM':>8}{'(ident.)':>10}"
                  f"{'MAE':>8}{'(ident.)':>10}"]
  for pair, values in summary.items():
    lines.append(f"{pair:<14}{values['psnr']:>9.2f}{values['identity_psnr']:>10.2f}"
                 f"{values['ssim']:>8.3f}{values['identity_ssim']:>10.3f}"
                 f"{values['mae']:>8.3f}{values['identity_mae']:>10.3f}")
  return "\n".join(lines)


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
