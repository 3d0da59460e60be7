"""Held-out evaluation, BraTS style: whole volumes through the segmentor, per case and modality.

Every held-out case is segmented from each of its modalities separately (the model is unified: one
network, any single modality in). A volume is cut into axial slices exactly as in training,
predicted in fixed-size batches (one compiled program for every volume), thresholded at 0.5, put
back on the volume's grid (the crop/pad undone) and scored against the full label volume, per
region (WT, TC, ET), with `metrics.region_metrics`:

  dice          2|P & T| / (|P| + |T|)
  hd95          95th percentile Hausdorff distance between the surfaces of P and T (MONAI's
                definition), in mm: through the voxel spacing of the case, so anisotropic volumes
                are measured correctly
  sensitivity   |P & T| / |T|        specificity   |~P & ~T| / |~T|
  predicted_ml  |P| in millilitres   true_ml       |T| in millilitres

Empty masks follow the BraTS rules: if neither the prediction nor the truth has a voxel of a
region, Dice is 1 and HD95 is 0; if exactly one of them is empty, Dice is 0 and HD95 is the
penalty `metrics.EMPTY_HD95_PENALTY_MM` (374 mm, about the diagonal of a BraTS volume).

Outputs of `evaluate_split` in ``workdir/eval_<split>/`` (``eval_<split>_best/`` for the best
checkpoint): ``metrics.csv`` (a row per case and modality: ``case``, ``modality``, then for each
region R in WT, TC, ET the columns ``dice_R``, ``hd95_R`` (mm), ``sensitivity_R``,
``specificity_R``, ``predicted_ml_R``, ``true_ml_R``), ``summary.json`` (mean, standard
deviation and median over cases of every metric, per modality and region, with these definitions
spelt out), ``translation.csv`` for models that translate; and PNG panels in ``workdir/figures/``.

`Validator` is the cheaper variant the trainer runs every ``train.validate_every`` steps: Dice only,
no files.
"""

from __future__ import annotations

import csv
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uagan_jax import metrics as metrics_lib
from uagan_jax.data import MODALITIES, REGIONS

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

# Per region, in this order, the CSV columns ``<metric>_<region>``.
SEGMENTATION_METRICS = ("dice", "hd95", "sensitivity", "specificity", "predicted_ml", "true_ml")
# The summary's statistics over cases (std is the population standard deviation, ddof=0).
STATISTICS = {"mean": np.mean, "std": np.std, "median": np.median}
# Workdir folder of each checkpoint kind `evaluate_split` can score.
CHECKPOINT_DIRS = {"latest": "checkpoints", "best": "checkpoints_best"}


def definitions() -> dict[str, str]:
  """What the numbers of ``metrics.csv`` and ``summary.json`` mean, written into the summary."""
  penalty = metrics_lib.EMPTY_HD95_PENALTY_MM
  return {
      "regions": "WT = whole tumour (oedema + core), TC = tumour core (necrotic/non-enhancing "
                 "core + enhancing), ET = enhancing tumour; P = predicted, T = true voxels",
      "columns": "metrics.csv: case, modality (the single input modality), then per region R: "
                 + ", ".join(f"{m}_R" for m in SEGMENTATION_METRICS),
      "dice": "2|P & T| / (|P| + |T|)",
      "hd95": "95th percentile Hausdorff distance in mm (voxel spacing of the case), MONAI's "
              "definition: surface = mask XOR its 6-connected erosion; the 95th percentile of "
              "the distances from P's surface to T's and from T's to P's, the larger of the two",
      "sensitivity": "|P & T| / |T| (T empty: 1 if P is empty, else 0)",
      "specificity": "|~P & ~T| / |~T| over the whole volume, background included",
      "predicted_ml": "|P| times the voxel volume, in millilitres",
      "true_ml": "|T| times the voxel volume, in millilitres",
      "empty_masks": f"BraTS rules: P and T both empty: Dice 1, HD95 0 mm; exactly one empty: "
                     f"Dice 0, HD95 {penalty:g} mm",
      "statistics": "mean, std (population, ddof=0) and median over the cases of the split",
  }


def dice_per_region(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Dice of each region channel of two boolean (..., R) masks; both empty gives 1, one empty 0."""
  return np.array([metrics_lib.dice(predicted[..., r], truth[..., r])
                   for r in range(predicted.shape[-1])])


def score_case(predicted: np.ndarray, truth: np.ndarray, *,
               spacing: Sequence[float]) -> dict[str, float]:
  """Every metric of every region of one prediction: ``{"<metric>_<region>": value}``.

  Args:
    predicted: boolean (X, Y, Z, 3) predicted WT/TC/ET.
    truth: boolean (X, Y, Z, 3) true WT/TC/ET on the same grid.
    spacing: voxel size in mm along X, Y, Z.
  """
  row = {}
  for index, region in enumerate(REGIONS):
    values = metrics_lib.region_metrics(predicted[..., index], truth[..., index],
                                        spacing=tuple(spacing))
    row.update({f"{metric}_{region}": float(values[metric]) for metric in SEGMENTATION_METRICS})
  return row


def summarise(rows: Sequence[dict], modalities: Sequence[str]) -> dict:
  """``{modality: {region: {metric: {"mean", "std", "median"}}}}`` over the rows (cases)."""
  summary = {}
  for modality in modalities:
    selected = [row for row in rows if row["modality"] == modality]
    summary[modality] = {
        region: {metric: {name: float(statistic(np.array([row[f"{metric}_{region}"]
                                                          for row in selected])))
                          for name, statistic in STATISTICS.items()}
                 for metric in SEGMENTATION_METRICS}
        for region in REGIONS}
  return summary


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


def load_state(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
               checkpoint: str = "latest"):
  """A checkpoint's train state (on one device) and its step.

  Args:
    config: the run's config.
    workdir: the training workdir.
    checkpoint: "latest" (the newest checkpoint in ``checkpoints/``) or "best" (the one kept in
      ``checkpoints_best/`` for the highest validation Dice, see ``train.validate_every``).
  """
  # pylint: disable=g-import-not-at-top
  from uagan_jax import checkpoint as checkpoint_lib
  from uagan_jax import train
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
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
    state = checkpoints.restore(step, train.abstract_state(config))
  finally:
    checkpoints.close()
  return state, step


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
                   checkpoint: str = "latest", curves: bool = True,
                   log: Callable[[str], None] = print) -> dict:
  """Scores every case of ``split`` from each modality; writes CSV, JSON, PNG panels.

  Args:
    config: the run's config.
    workdir: the training workdir (its ``splits.json`` names the cases; outputs go to
      ``workdir/eval_<split>/``, or ``eval_<split>_best/`` for the best checkpoint).
    data_dir: the data folder the run was trained on.
    split: "test", "val" or "train"; default ``config.eval.split``.
    state: a train state to evaluate; default: the ``checkpoint`` in ``workdir``.
    checkpoint: without ``state``: "latest" or "best" (see `load_state`).
    curves: also draw ``figures/training_curves.png`` from the workdir's logs.
    log: where progress and the table go.

  Returns:
    ``{"rows": [...per case and modality...], "translation_rows": [...], "summary":
    {modality: {region: {metric: {"mean", "std", "median"}}}}, "report": <summary.json>,
    "step": step}``.
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
    checkpoint = "latest"  # the trainer's final state
  else:
    state, step = load_state(config, workdir, checkpoint=checkpoint)
  segments = config.model.name != "stargan"
  translates = config.model.name in ("stargan", "uagan")
  predictor = (SlicePredictor(config, segmentation_variables(state),
                              batch_size=config.eval.batch_size) if segments else None)
  translator = (SliceTranslator(config, translation_variables(state),
                                batch_size=config.eval.batch_size) if translates else None)
  out_dir = workdir / (f"eval_{split}" if checkpoint == "latest" else f"eval_{split}_{checkpoint}")
  figures = workdir / "figures"
  out_dir.mkdir(parents=True, exist_ok=True)
  modalities = [m for m in MODALITIES if m in config.data.modalities]
  rows, translation_rows = [], []
  started = time.time()
  for number, case_id in enumerate(case_ids, 1):
    volume = readers.load_case(cases[case_id], modalities=modalities, with_label=segments)
    if segments:
      truth = _truth(volume, cases[case_id])
      predictions, scores = {}, {}
      for modality in modalities:
        predictions[modality] = segment_volume(predictor, volume.images[modality],
                                               modality=modality, config=config)
        scores[modality] = score_case(predictions[modality], truth, spacing=volume.spacing)
        rows.append({"case": case_id, "modality": modality, **scores[modality]})
      if number <= config.eval.panels:
        visualize.segmentation_panel(volume, truth, predictions,
                                     figures / f"{split}_{case_id}_step{step}.png",
                                     title=f"{case_id} ({split}), step {step}", scores=scores)
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

  report = {"step": step, "split": split, "checkpoint": checkpoint, "cases": len(case_ids),
            "case_ids": case_ids}
  summary = {}
  if rows:
    summary = summarise(rows, modalities)
    report["definitions"] = definitions()
    report["segmentation"] = summary
    _write_csv(out_dir / "metrics.csv", rows)
    log(format_table(summary, modalities,
                     title=f"Segmentation of {len(case_ids)} {split} cases, {checkpoint} "
                           f"checkpoint (step {step}): mean ± std over cases"))
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
  if curves and (workdir / "metrics.jsonl").is_file():
    visualize.training_curves(workdir / "metrics.jsonl", workdir / "validation.jsonl",
                              figures / "training_curves.png")
  log(f"per-case rows and summary.json in {out_dir}, figures in {figures}")
  return {"rows": rows, "translation_rows": translation_rows, "summary": summary,
          "report": report, "step": step}


def _truth(volume, case) -> np.ndarray:
  """The boolean (X, Y, Z, 3) WT/TC/ET of a loaded case."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax.data import readers
  from uagan_jax.errors import UserError
  # pylint: enable=g-import-not-at-top
  if volume.label is None:
    raise UserError(f"{case.images[next(iter(case.images))].parent}: case {case.case_id} has no "
                    "label volume to evaluate against")
  return readers.labels_to_regions(volume.label, convention=case.label_convention)


# --------------------------------------------------------------------------------------------
# Validation during training
# --------------------------------------------------------------------------------------------


class Validator:
  """Dice on held-out cases for the trainer (segmenting models only): a flat log row.

  Scores every case from each trained modality, like `evaluate_split`, but Dice only (no HD95,
  no files), so it is cheap enough to run every few hundred steps. The predictor is compiled on
  the first call and reused with each later call's variables.
  """

  def __init__(self, config: ml_collections.ConfigDict, cases: Sequence):
    """``cases``: the `readers.CaseFiles` to validate on (with labels)."""
    self.config = config
    self.cases = list(cases)
    self.modalities = [m for m in MODALITIES if m in config.data.modalities]
    self._predictor = None

  def __call__(self, state) -> dict[str, float]:
    """``{"cases": n, "dice/<region>": mean over cases and modalities, "dice/mean": mean over
    regions, "dice/<modality>/<region>": mean over cases}`` for ``state``."""
    from uagan_jax.data import readers  # pylint: disable=g-import-not-at-top
    variables = segmentation_variables(state)
    if self._predictor is None:
      self._predictor = SlicePredictor(self.config, variables,
                                       batch_size=self.config.eval.batch_size)
    else:
      self._predictor.set_variables(variables)
    dice = {m: [] for m in self.modalities}
    for case in self.cases:
      volume = readers.load_case(case, modalities=self.modalities, with_label=True)
      truth = _truth(volume, case)
      for modality in self.modalities:
        predicted = segment_volume(self._predictor, volume.images[modality], modality=modality,
                                   config=self.config)
        dice[modality].append(dice_per_region(predicted, truth))
    per_modality = {m: np.mean(dice[m], axis=0) for m in self.modalities}
    row = {"cases": len(self.cases)}
    for index, region in enumerate(REGIONS):
      row[f"dice/{region}"] = float(np.mean([per_modality[m][index] for m in self.modalities]))
    row["dice/mean"] = float(np.mean([row[f"dice/{region}"] for region in REGIONS]))
    for modality in self.modalities:
      for index, region in enumerate(REGIONS):
        row[f"dice/{modality}/{region}"] = float(per_modality[modality][index])
    return row


# --------------------------------------------------------------------------------------------
# Files and tables
# --------------------------------------------------------------------------------------------


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
  from uagan_jax.data import preprocess  # pylint: disable=g-import-not-at-top
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
      if source == target:
        # The panel's diagonal shows the row's input: a modality into itself is not a translation
        # anyone asked for, and with pair heads its head is not even trained (identity_weight 0).
        panel["translated"][(source, target)] = source_slices[middle]
        continue
      translated = translate_slices(translator, source_slices, has_brain, source=source,
                                    target=target)
      panel["translated"][(source, target)] = translated[middle]
      truth = normalised[target][0]
      keep = has_brain & normalised[target][1]
      mask = truth[keep] != 0
      row = {"case": case_id, "source": source, "target": target}
      for prefix, candidate in (("", translated), ("identity_", source_slices)):
        row[prefix + "mae"] = metrics_lib.mae(predicted=candidate[keep], target=truth[keep],
                                              mask=mask)
        row[prefix + "psnr"] = metrics_lib.psnr(predicted=candidate[keep], target=truth[keep],
                                            data_range=data_range, mask=mask)
        row[prefix + "ssim"] = metrics_lib.ssim(predicted=candidate[keep], target=truth[keep],
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


def format_table(summary: dict, modalities: Sequence[str], *, title: str) -> str:
  """Dice and HD95 (mm) per modality and region, mean ± std over cases (a `summarise` result), as
  a fixed-width table; the last column is the modality's Dice averaged over the regions."""
  penalty = metrics_lib.EMPTY_HD95_PENALTY_MM

  def cell(stats, digits):
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"

  header = (f"{'modality':<9}" + "".join(f"{'Dice ' + r:>15}" for r in REGIONS)
            + "".join(f"{'HD95 mm ' + r:>16}" for r in REGIONS) + f"{'Dice mean':>11}")
  lines = [title, header]
  for modality in modalities:
    regions = summary[modality]
    lines.append(f"{modality:<9}" + "".join(f"{cell(regions[r]['dice'], 3):>15}" for r in REGIONS)
                 + "".join(f"{cell(regions[r]['hd95'], 1):>16}" for r in REGIONS)
                 + f"{np.mean([regions[r]['dice']['mean'] for r in REGIONS]):>11.3f}")
  lines.append(f"(BraTS rules for empty masks: both empty Dice 1, HD95 0; one empty Dice 0, "
               f"HD95 {penalty:g} mm. Medians and the other metrics: summary.json, metrics.csv)")
  return "\n".join(lines)
