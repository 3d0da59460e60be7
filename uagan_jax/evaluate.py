"""Held-out evaluation, BraTS style: whole volumes through the segmentor, per case and modality.

Every held-out case is segmented from each of its modalities separately (the model is unified: one
network, any single modality in), through `uagan_jax.inference` (the code path of ``predict``),
and scored against the full label volume per region (WT, TC, ET) with `metrics.region_metrics`.
What each metric means, the empty-mask rules and the files written (``eval_<split>/metrics.csv``,
``summary.json``, ``translation.csv``, PNG panels) are in docs/EVALUATION.md; `definitions`
writes the same definitions into every ``summary.json``.

`uagan_jax.validation` is the cheaper variant the trainer runs every ``train.validate_every``
steps (Dice only, no files, never test-time augmentation).

With ``tta`` the probabilities are averaged over the in-plane mirrorings of the slices
(`inference.SlicePredictor.probabilities`) and the folder is ``eval_<split>..._tta/``; with
``ensemble`` the probabilities of several checkpoints (of one or several workdirs) are averaged
(`inference.mean_probabilities`), thresholded once and nested by the first model's
``eval.nesting``, into the folder ``out`` (docs/EVALUATION.md, "Test-time augmentation and
ensembles").

`evaluate_cross_validation` scores the K folds of a cross-validation (``data.folds``): each
fold's model on its own val cases through `evaluate_split`, the rows together in
``eval_cv[_tta]/`` (docs/EVALUATION.md, "Cross-validation and ensembles").
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from uagan_jax import families, inference, postprocess, timing, visualize, volume_io
from uagan_jax import metrics as metrics_lib
from uagan_jax.data import MODALITIES, REGIONS, checks, readers, resample
from uagan_jax.errors import UserError

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

# The run's splits (splits.json); ``--split all`` scores every case of another folder instead.
SPLITS = ("train", "val", "test")
# Per region, in this order, the CSV columns ``<metric>_<region>``: the global (whole-region)
# metrics of `metrics.region_metrics`, then the BraTS 2023+ lesion-wise ones of
# `metrics.lesion_metrics`.
GLOBAL_METRICS = ("dice", "hd95", "sensitivity", "specificity", "predicted_ml", "true_ml")
LESION_METRICS = ("lesion_dice", "lesion_hd95")
SEGMENTATION_METRICS = GLOBAL_METRICS + LESION_METRICS
# The summary's statistics over cases (std is the population standard deviation, ddof=0).
STATISTICS = {"mean": np.mean, "std": np.std, "median": np.median}


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
      "lesion_dice": "BraTS 2023+ lesion-wise Dice (brats-evaluation 0.0.10): lesions = connected "
                     "components (26-connectivity) of P and T, matched one-to-one maximising the "
                     "summed Dice; the mean over the true lesions of at least "
                     f"{metrics_lib.MIN_LESION_VOLUME_MM3:g} mm^3 (matched: the pair's Dice; missed: "
                     "0) and the unmatched predicted lesions (0); none of either: 1",
      "lesion_hd95": "the same mean of each lesion's HD95 in mm (matched: the pair's HD95, "
                     "Panoptica's definition: one 95th percentile of both directions' surface "
                     f"distances pooled; missed or false positive: "
                     f"{metrics_lib.LESION_HD95_PENALTY_MM:g} mm); none of either: 0",
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

  The global metrics (`metrics.region_metrics`) and the lesion-wise ones (`metrics.lesion_metrics`)
  of each region, in the order of `SEGMENTATION_METRICS`.

  Args:
    predicted: boolean (X, Y, Z, 3) predicted WT/TC/ET.
    truth: boolean (X, Y, Z, 3) true WT/TC/ET on the same grid.
    spacing: voxel size in mm along X, Y, Z.
  """
  row = {}
  for index, region in enumerate(REGIONS):
    values = metrics_lib.region_metrics(predicted[..., index], truth[..., index],
                                        spacing=tuple(spacing))
    values.update(metrics_lib.lesion_metrics(predicted[..., index], truth[..., index],
                                             spacing=tuple(spacing)))
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
# Evaluation of a split
# --------------------------------------------------------------------------------------------


def evaluate_split(config: ml_collections.ConfigDict, *, workdir: pathlib.Path | None = None,
                   data_dir: pathlib.Path, split: str | None = None, state=None,
                   checkpoint: str = "latest", curves: bool = False, input_notes: bool = True,
                   postprocessing: bool = True, log: Callable[[str], None] = print,
                   model=None, out: pathlib.Path | None = None, tta: bool = False,
                   ensemble: Sequence[tuple[pathlib.Path, str]] = (),
                   stopwatch: timing.Stopwatch | None = None, translation: bool = True) -> dict:
  """Scores every case of ``split`` (or of an external test set) from each modality; writes CSV,
  JSON, PNG panels.

  Args:
    config: the run's config.
    workdir: the training workdir (its ``splits.json`` names the cases; outputs go to
      ``workdir/eval_<split>/``, or ``eval_<split>_best/`` for the best checkpoint; for an
      external test set ``eval_external_<folder name>/``; ``eval_<split>_ensemble/`` for an
      ``ensemble``; ``_tta`` appended with ``tta``).
    model: in place of ``workdir``, a `model_file.ModelFile` (``config`` its config): its
      networks are scored, its ``splits.json`` names the cases, and the outputs go to ``out``
      as they would go to the workdir (the suffix that of the checkpoint it was exported from).
    out: the folder that receives ``eval_<split>.../`` and ``figures/`` in place of the
      workdir (required with ``model`` and with ``ensemble``).
    data_dir: the data folder the run was trained on (``splits.json`` "data"), or any other
      folder of cases: an external test set, scored whole unless ``split`` names a split (the
      run's data moved or copied).
    split: "test", "val" or "train"; "all": every case of ``data_dir`` as an external test set
      (refused if it holds a case the run trained or validated on); default
      ``config.eval.split``, or "all" where ``data_dir`` is not the run's data folder.
    state: a train state to evaluate; default: the ``checkpoint`` in ``workdir``.
    checkpoint: without ``state``: "latest", "best" or a step number (see `load_state`);
      the outputs go to ``eval_<split>/``, ``eval_<split>_best/`` or ``eval_<split>_step<N>/``.
    input_notes: say, per image file, where its constant background was set to 0 and where it
      does not look skull-stripped (`checks`); off where the caller said so already (training,
      whose data preparation names every file of the data folder once).
    postprocessing: apply the model's ``postprocessing.json`` (its workdir's or model file's;
      `postprocess`, as ``predict`` does) to each segmentation before it is scored, where there
      is one; a line says which and summary.json records it ("postprocessing"). False:
      ``--no-postprocessing``. An ensemble is not post-processed (a note says so).
    curves: also draw ``figures/training_curves.png`` from the workdir's logs (training draws it
      when it ends; evaluating a finished run leaves it as it is).
    log: where progress, the table and a ``warning: ...`` per image file that does not look
      skull-stripped (`checks`) go.
    tta: test-time augmentation: average each model's probabilities over the in-plane
      mirrorings of the slices (`inference.SlicePredictor.probabilities`). Training's own
      evaluation and validation never mirror.
    ensemble: more models, (workdir, checkpoint) each, whose segmentation probabilities are
      averaged with this one's (`inference.mean_probabilities`) before the one threshold and
      this config's ``eval.nesting``; each must have ``splits.json`` and none may have trained
      or validated on a scored case. Segmentation only (translation is scored per model).
    stopwatch: counts the wall time of loading, reading, compiling, segmenting (``tta``: the
      mirrored passes apart), scoring and drawing (``uagan-jax evaluate --timing``).
    translation: False leaves a translating family's translation unscored (no translation.csv,
      no translation panels): a study reads the segmentation only, and for uagan the twelve
      translations a case cost more than its four segmentations.

  Returns:
    ``{"rows": [...per case and modality...], "translation_rows": [...], "summary":
    {modality: {region: {metric: {"mean", "std", "median"}}}}, "report": <summary.json>,
    "step": step}``.
  """
  if (workdir is None) == (model is None):
    raise ValueError("pass exactly one of workdir and model")
  ensemble = [(pathlib.Path(w), inference.check_checkpoint(c)) for w, c in ensemble]
  if ensemble and model is not None:
    raise ValueError("an ensemble is of workdirs")
  if ensemble and out is None:
    raise UserError(f"an ensemble of {len(ensemble) + 1} models belongs to no one workdir: name "
                    "the folder its scores go to with --out DIR")
  if ensemble and state is not None:
    raise ValueError("state is one model's; an ensemble is loaded from its workdirs")
  phase = stopwatch.phase if stopwatch is not None else lambda _: contextlib.nullcontext()
  if model is None:
    workdir = pathlib.Path(workdir)
    out = workdir if out is None else pathlib.Path(out)
    splits_path = workdir / "splits.json"
    splits = volume_io.workdir_splits(workdir)
  else:
    if out is None:
      raise ValueError("a model file has no folder of its own: pass out")
    out = pathlib.Path(out)
    splits_path = f"{model.path}: splits.json"
    splits = model.training_record or {}
  if split not in (None, *SPLITS, "all"):
    raise UserError(f"--split {split}: use {', '.join(SPLITS)} or all")
  if split == "all" or (split is None and not _is_run_data(data_dir, splits)):
    # An external test set: every case of the folder, none of which the run has seen.
    cases = {c.case_id: c for c in readers.find_cases(data_dir)}
    case_ids = _external_case_ids(cases, data_dir, splits)
    split = f"external_{pathlib.Path(data_dir).resolve().name}"
    log(f"scoring every case of {data_dir} ({count(len(case_ids), 'case')}) as an external test set "
        f"(the run's data folder is {splits.get('data')})")
    if config.eval.max_cases:
      case_ids = case_ids[:config.eval.max_cases]
  else:
    split = split or config.eval.split
    if split not in splits:  # a model file exported from a workdir without splits.json
      raise UserError(f"{model.path}: holds no {split} split (its workdir had no splits.json); "
                      "score a folder of cases as an external test set: --split all")
    case_ids = list(splits[split])
    if config.eval.max_cases:
      case_ids = case_ids[:config.eval.max_cases]
    if not case_ids:
      raise UserError(f"{splits_path}: the {split} split has no cases")
    cases = {c.case_id: c for c in readers.find_cases(data_dir)}
    missing = [c for c in case_ids if c not in cases]
    if missing:
      raise UserError(f"{data_dir}: cases of the {split} split are missing: "
                      f"{', '.join(missing[:5])}")
  for member_workdir, _ in ensemble:
    _check_held_out_from(member_workdir, case_ids, cases, split=split)

  source = workdir if model is None else model.path  # where splits, post-processing come from
  if postprocessing and not ensemble:
    postprocess.load(source)  # a damaged postprocessing.json is reported before the model loads
  family = families.get(config.model.name)
  segments, translates = family.segments, family.translates and not ensemble and translation
  if ensemble and not segments:
    raise UserError(f"{workdir}: model family {config.model.name} does not segment; an ensemble "
                    "averages segmentations")
  modalities = [m for m in MODALITIES if m in config.data.modalities]
  with phase("load model"):
    if model is not None:
      step, checkpoint = model.step, model.checkpoint
      variables = model.network
    else:
      if state is not None:
        step = int(jax.device_get(state.step))
        checkpoint = "latest"  # the trainer's final state
      else:
        state, step = inference.load_state(config, workdir, checkpoint=checkpoint)
      variables = lambda capability: (inference.segmentation_variables
                                      if capability == "segments"
                                      else inference.translation_variables)(state, config)
    predictor = (inference.SlicePredictor(config, variables("segments"),
                                          batch_size=config.eval.batch_size, stopwatch=stopwatch)
                 if segments else None)
    translator = (inference.SliceTranslator(config, variables("translates"),
                                            batch_size=config.eval.batch_size)
                  if translates else None)
    models = [(predictor, config)]
    checkpoint = inference.check_checkpoint(checkpoint)
    described = [{"workdir": str(source), "checkpoint": checkpoint, "step": step}]
    for member_workdir, member_checkpoint in ensemble:
      member_config, variables, member_step = inference.load_model(
          member_workdir, capability="segments", task="segment", network_only=True,
          checkpoint=member_checkpoint,
          check=lambda c, w=member_workdir: _check_modalities(c, modalities, workdir=w))
      models.append((inference.SlicePredictor(member_config, variables,
                                              batch_size=member_config.eval.batch_size,
                                              stopwatch=stopwatch), member_config))
      described.append({"workdir": str(member_workdir), "checkpoint": member_checkpoint,
                        "step": member_step})
  suffix = ("_ensemble" if ensemble
            else {"latest": "", "best": "_best"}.get(checkpoint, f"_step{checkpoint}"))
  suffix += "_tta" if tta else ""
  base = workdir if out is None else pathlib.Path(out)
  out_dir = base / f"eval_{split}{suffix}"
  figures = base / "figures"
  out_dir.mkdir(parents=True, exist_ok=True)
  processing = None
  if segments and not ensemble:
    processing = postprocess.for_run(source, enabled=postprocessing, step=step,
                                     modalities=modalities, log=log, tta=tta)
  elif ensemble and postprocessing:
    postprocess.note_ensemble([workdir, *(w for w, _ in ensemble)], log=log)
  trained = volume_io.trained_modalities(config, workdir=source)
  untrained = [m for m in modalities if m not in trained]
  if untrained:
    # Scored all the same (a researcher may want to see how a model does on a modality it never
    # saw), but never mistaken for a trained one: a note here and a '*' in the table.
    log(f"note: the model{' in ' + str(workdir) if ensemble else ''} never trained on "
        f"{', '.join(untrained)} (splits.json: training gave "
        f"slices of {', '.join(trained) or 'no modality'} only); they are scored all the same "
        "and marked * in the table")
  for (_, member_config), (member_workdir, _) in zip(models[1:], ensemble):
    member_trained = volume_io.trained_modalities(member_config, workdir=member_workdir)
    member_untrained = [m for m in modalities if m not in member_trained]
    if member_untrained:
      log(f"note: the model in {member_workdir} never trained on {', '.join(member_untrained)} "
          f"(splits.json); they are scored all the same and marked * in the table")
      untrained = [m for m in modalities if m in untrained or m in member_untrained]
  if ensemble:
    log(f"ensemble of {len(models)} models, probabilities averaged, then thresholded once and "
        f"nested by the first's eval.nesting ({config.eval.nesting}): "
        + "; ".join(_model_words(d) for d in described))
    if family.translates:
      log("note: an ensemble scores segmentation only; translation is scored per model "
          "(evaluate each workdir alone)")
  if tta:
    log(f"test-time augmentation: the mean over the {len(inference.MIRRORS)} in-plane mirrorings "
        "of the slices")
  which = (f"ensemble of {len(models)} models" if ensemble
           else _checkpoint_words(checkpoint, step))
  which += ", mirrored (TTA)" if tta else ""
  rows, translation_rows = [], []
  started = time.time()
  for number, case_id in enumerate(case_ids, 1):
    with phase("read"):
      volume = readers.load_case(cases[case_id], modalities=modalities, with_label=segments)
    for modality in modalities if input_notes else ():
      checks.log_background_note(volume, cases[case_id], modality, log=log)
      warning = checks.skull_strip_warning(volume.images[modality],
                                           path=checks.image_name(cases[case_id], modality))
      if warning is not None:
        log(f"warning: {warning}")
    if segments:
      truth = truth_regions(volume, cases[case_id])
      predictions, scores = {}, {}
      for modality in modalities:
        with phase("segment"):
          predictions[modality] = inference.to_regions(
              inference.mean_probabilities(models, volume.images[modality], modality=modality,
                                           spacing=volume.spacing, tta=tta), config=config)
          if processing is not None:
            predictions[modality] = processing.apply(predictions[modality], modality=modality,
                                                     spacing=volume.spacing)
        with phase("score"):
          scores[modality] = score_case(predictions[modality], truth, spacing=volume.spacing)
        rows.append({"case": case_id, "modality": modality, **scores[modality]})
      if number <= config.eval.panels:
        with phase("figures"):
          label = f"ensemble of {len(models)} models" if ensemble else f"step {step}"
          visualize.segmentation_panel(
              volume, truth, predictions,
              figures / f"{split}_{case_id}_{'ensemble' if ensemble else f'step{step}'}"
                        f"{'_tta' if tta else ''}.png",
              title=f"{case_id} ({split}), {label}{', TTA' if tta else ''}", scores=scores)
    if translates:
      with phase("translate"):
        case_rows, panel = _evaluate_translation(translator, volume, case_id, modalities, config,
                                                 spacing=volume.spacing)
        translation_rows.extend(case_rows)
        if number <= config.eval.panels:
          visualize.translation_panel(panel,
                                      figures / f"{split}_{case_id}_translation_step{step}.png",
                                      title=f"{case_id} ({split}), step {step}",
                                      clip=config.data.clip)
    elapsed = time.time() - started
    log(f"  evaluated {number}/{len(case_ids)} {split} cases ({case_id}); "
        f"ETA {elapsed / number * (len(case_ids) - number):.0f} s")

  report = {"step": step, "split": split, "data": str(pathlib.Path(data_dir).absolute()),
            "checkpoint": checkpoint, "cases": len(case_ids), "case_ids": case_ids,
            "nesting": config.eval.nesting, "untrained_modalities": untrained, "tta": tta,
            "models": described,
            "postprocessing": None if processing is None else processing.summary(step)}
  summary = {}
  with phase("write"):
    if rows:
      summary = summarise(rows, modalities)
      report["definitions"] = definitions()
      report["segmentation"] = summary
      _write_csv(out_dir / "metrics.csv", rows)
      spread = "mean ± std over cases" if len(case_ids) > 1 else "the case's values"
      log(format_table(summary, modalities, cases=len(case_ids), untrained=untrained,
                       title=f"Segmentation of {count(len(case_ids), f'{split} case')}, "
                             f"{which}: {spread}"))
    if translation_rows:
      report["translation_mean"] = {
          f"{a}->{b}": {k: float(np.mean([r[k] for r in translation_rows
                                          if r["source"] == a and r["target"] == b]))
                        for k in _TRANSLATION_KEYS}
          for a in modalities for b in modalities if a != b}
      _write_csv(out_dir / "translation.csv", translation_rows)
      log(format_translation_table(report["translation_mean"],
                                   title=f"Translation on {count(len(case_ids), f'{split} case')}, step {step} "
                                         "(normalised intensities; identity = the source image as is)"))
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2))
  if curves and workdir is not None and (workdir / "metrics.jsonl").is_file():
    visualize.training_curves(workdir / "metrics.jsonl", workdir / "validation.jsonl",
                              figures / "training_curves.png")
  log(f"per-case rows and summary.json in {out_dir}, figures in {figures}")
  return {"rows": rows, "translation_rows": translation_rows, "summary": summary,
          "report": report, "step": step}


# --------------------------------------------------------------------------------------------
# Cross-validation: each fold's model on its own val cases
# --------------------------------------------------------------------------------------------


def check_folds(workdirs: Sequence[pathlib.Path]) -> list[tuple[pathlib.Path, dict, object]]:
  """The workdirs of a cross-validation in fold order: ``[(workdir, splits, config), ...]``.

  They must be the K folds of one split (``data.folds``, recorded in splits.json): each trained
  with the same K, K workdirs holding folds 0..K-1 once each, the same seed, data folder and
  test split, folds validating on disjoint, non-empty sets of cases, and segmenting the same
  modalities.

  Raises:
    UserError: one line naming the workdir and what is wrong.
  """
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if not workdirs:
    raise UserError("--cross-validation: give the workdir of each fold (--workdir F0 "
                    "--workdir F1 ...)")
  found = []
  for workdir in map(pathlib.Path, workdirs):
    splits = volume_io.workdir_splits(workdir)
    if not splits.get("folds"):
      raise UserError(f"{workdir}: not a fold of a cross-validation (splits.json has no folds: "
                      "trained without --config.data.folds=K)")
    found.append((workdir, splits, config_lib.from_json_file(workdir / "config.json")))
  first_workdir, first, first_config = found[0]
  folds = first["folds"]
  for workdir, splits, config in found[1:]:
    for what, mine, theirs in (
        ("data.folds", splits["folds"], folds), ("seed", config.seed, first_config.seed),
        ("data folder", _resolved(splits.get("data")), _resolved(first.get("data"))),
        ("test split", splits.get("test"), first.get("test")),
        ("data.modalities", tuple(config.data.modalities), tuple(first_config.data.modalities))):
      if mine != theirs:
        shown = ("differs" if what == "test split"
                 else f"{mine} against {theirs} in {first_workdir}")
        raise UserError(f"{workdir}: {what} {shown}; the workdirs must be the folds of one "
                        "split (one seed, data folder and data.folds)")
  by_fold = {}
  for workdir, splits, config in found:
    if splits["fold"] in by_fold:
      raise UserError(f"{workdir}: fold {splits['fold']} again (also {by_fold[splits['fold']][0]}); "
                      f"give each of the {folds} folds once")
    by_fold[splits["fold"]] = (workdir, splits, config)
  missing = [str(k) for k in range(folds) if k not in by_fold]
  if missing:
    raise UserError(f"--cross-validation: fold{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(missing)} of {folds} missing (given: "
                    f"{', '.join(str(k) for k in sorted(by_fold))}); give every fold's workdir")
  ordered = [by_fold[k] for k in range(folds)]
  seen = {}
  for workdir, splits, _ in ordered:
    if not splits.get("val"):
      raise UserError(f"{workdir / 'splits.json'}: fold {splits['fold']} has no val cases; "
                      "there is nothing of its to score")
    for case_id in splits["val"]:
      if case_id in seen:
        raise UserError(f"{workdir}: validates on {case_id}, as {seen[case_id]} does; the "
                        "folds of one split validate on disjoint cases")
      seen[case_id] = workdir
  return ordered


def _resolved(path: str | None) -> str | None:
  return None if path is None else str(pathlib.Path(path).resolve())


def evaluate_cross_validation(*, workdirs: Sequence[pathlib.Path], data_dir: pathlib.Path,
                              out: pathlib.Path, checkpoint: str = "latest", tta: bool = False,
                              postprocessing: bool = True, log: Callable[[str], None] = print,
                              stopwatch: timing.Stopwatch | None = None) -> dict:
  """Scores a cross-validation: each fold's model on that fold's val cases, all rows together.

  Every non-test case is scored by the one model that held it out (its fold's), as nnU-Net
  scores its folds. Each fold goes through `evaluate_split` (``split="val"``, its own config,
  its own ``postprocessing.json`` where it has one) into ``<out>/eval_cv<suffix>/fold<k>/``
  (``eval_val<suffix>/`` and ``figures/``); then all the rows, with a ``fold`` column first, go
  to ``<out>/eval_cv<suffix>/metrics.csv`` and their `summarise` to ``summary.json``, and the
  table is logged. ``suffix``: ``_best``/``_step<N>`` for the checkpoint, ``_tta`` with TTA.
  Translation (the families that translate) is scored per fold only, in the fold folders.

  Args:
    workdirs: the K folds' workdirs, any order (`check_folds`).
    data_dir: the data folder they were trained on.
    out: the folder that receives ``eval_cv.../``.
    checkpoint: each fold's "latest", "best" or a step.
    tta, postprocessing, log, stopwatch: as `evaluate_split`'s.

  Returns:
    ``{"rows", "summary", "report"}`` of the whole cross-validation.
  """
  checkpoint = inference.check_checkpoint(checkpoint)
  ordered = check_folds(workdirs)
  folds = len(ordered)
  suffix = {"latest": "", "best": "_best"}.get(checkpoint, f"_step{checkpoint}")
  suffix += "_tta" if tta else ""
  out_dir = pathlib.Path(out) / f"eval_cv{suffix}"
  config = ordered[0][2]
  modalities = [m for m in MODALITIES if m in config.data.modalities]
  rows, models, untrained = [], [], set()
  for fold, (workdir, _, fold_config) in enumerate(ordered):
    log(f"cross-validation: fold {fold} of {folds}, {workdir}, on its val cases")
    result = evaluate_split(fold_config, workdir=workdir, data_dir=data_dir, split="val",
                            checkpoint=checkpoint, out=out_dir / f"fold{fold}", tta=tta,
                            postprocessing=postprocessing, log=log, stopwatch=stopwatch)
    report = result["report"]
    rows.extend({"fold": fold, **row} for row in result["rows"])
    untrained.update(report["untrained_modalities"])
    models.append({"fold": fold, "workdir": str(workdir), "checkpoint": checkpoint,
                   "step": result["step"], "cases": report["case_ids"],
                   "postprocessing": report["postprocessing"]})
  untrained = [m for m in modalities if m in untrained]
  summary = summarise(rows, modalities)
  cases = len({row["case"] for row in rows})
  report = {"split": "cross_validation", "folds": folds,
            "data": str(pathlib.Path(data_dir).absolute()), "checkpoint": checkpoint,
            "cases": cases, "tta": tta, "untrained_modalities": untrained, "models": models,
            "definitions": {**definitions(),
                            "columns": "metrics.csv: fold (the model that held the case out), "
                                       + definitions()["columns"].removeprefix("metrics.csv: "),
                            "statistics": "mean, std (population, ddof=0) and median over the "
                                          "val cases of every fold, each scored by its fold's "
                                          "model"},
            "segmentation": summary}
  with (stopwatch.phase("write") if stopwatch is not None else contextlib.nullcontext()):
    _write_csv(out_dir / "metrics.csv", rows)
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2))
  which = {"latest": "latest checkpoints", "best": "best checkpoints"}.get(
      checkpoint, f"checkpoints of step {checkpoint}")
  log(format_table(summary, modalities, cases=cases, untrained=untrained,
                   title=f"Cross-validation, {folds} folds: {count(cases, 'val case')}, each "
                         f"scored by the model of its fold ({which}"
                         f"{', mirrored (TTA)' if tta else ''}): mean ± std over cases"))
  log(f"per-case rows (with their fold) and summary.json in {out_dir}, each fold's own in "
      f"{out_dir}/fold<k>/")
  return {"rows": rows, "summary": summary, "report": report}


def _model_words(model: dict) -> str:
  """'runs/a (latest, step 600)', 'runs/b (best, step 400)', 'runs/c (step 200)'."""
  which = model["checkpoint"] if model["checkpoint"] in ("latest", "best") else "step"
  return (f"{model['workdir']} ({which + ', ' if which != 'step' else ''}"
          f"step {model['step']})")


def _check_modalities(config: ml_collections.ConfigDict, modalities: Sequence[str], *,
                      workdir: pathlib.Path) -> None:
  """UserError unless a model of an ensemble segments every modality scored (its config's
  ``data.modalities``), naming its workdir."""
  missing = [m for m in modalities if m not in config.data.modalities]
  if missing:
    raise UserError(f"{workdir}: the model does not segment {', '.join(missing)} (config "
                    f"data.modalities: {', '.join(config.data.modalities)}), which the "
                    "ensemble's first model is scored on")


def _check_held_out_from(workdir: pathlib.Path, case_ids: Sequence[str], cases: dict, *,
                         split: str) -> None:
  """UserError unless every scored case is held out from the run in ``workdir`` (a model of an
  ensemble): none it trained or validated on (`_seen_cases`)."""
  seen = _seen_cases(case_ids, cases, volume_io.workdir_splits(workdir))
  if seen:
    raise UserError(f"{workdir}: the run trained or validated on {len(seen)} of the "
                    f"{count(len(case_ids), f'{split} case')} scored ({', '.join(seen[:3])}); "
                    "an ensemble is scored on cases held out from every model")


def _is_run_data(data_dir: pathlib.Path, splits: dict) -> bool:
  """Whether ``data_dir`` is the folder the run was trained on (``splits.json`` "data")."""
  if "data" not in splits:
    return True  # nothing to tell it by: the run's own, as before the key was written
  trained_on, given = pathlib.Path(splits["data"]), pathlib.Path(data_dir)
  try:
    return trained_on.resolve() == given.resolve() or os.path.samefile(trained_on, given)
  except OSError:
    return False


def _seen_cases(case_ids: Sequence[str], cases: dict, splits: dict) -> list[str]:
  """The ids among ``case_ids`` (of ``cases``, id -> `readers.CaseFiles`) that the run of
  ``splits`` (its splits.json) trained or validated on, sorted."""
  seen = sorted(set(case_ids) & (set(splits.get("train", ())) | set(splits.get("val", ()))))
  if seen and "data" in splits and pathlib.Path(splits["data"]).is_dir():
    # The same case name is not the same scan (synthetic sets, other centres' numbering): a case
    # counts as seen only if its files are the size of the run's own case's files.
    own = {c.case_id: c for c in readers.find_cases(splits["data"]) if c.case_id in seen}
    seen = [case_id for case_id in seen
            if case_id not in own or _file_sizes(own[case_id]) == _file_sizes(cases[case_id])]
  return seen


def _external_case_ids(cases: dict, data_dir: pathlib.Path, splits: dict) -> list[str]:
  """Every case id of an external test set, sorted; UserError if it holds cases the run trained
  or validated on (its scores would not be held-out ones)."""
  seen = _seen_cases(sorted(cases), cases, splits)
  if seen:
    raise UserError(f"{data_dir}: holds {len(seen)} case(s) the run trained or validated on "
                    f"({', '.join(seen[:3])}), so it is no external test set; for the run's own "
                    f"data (moved or copied), name the split: --split test")
  return sorted(cases)


def _file_sizes(case: readers.CaseFiles) -> list[int]:
  paths = list(case.images.values()) + ([case.label] if case.label is not None else [])
  return sorted(path.stat().st_size for path in paths)


def truth_regions(volume, case) -> np.ndarray:
  """The boolean (X, Y, Z, 3) WT/TC/ET of a loaded case."""
  if volume.label is None:
    raise UserError(f"{case.images[next(iter(case.images))].parent}: case {case.case_id} has no "
                    "label volume to evaluate against")
  return readers.labels_to_regions(volume.label, convention=case.label_convention)


# --------------------------------------------------------------------------------------------
# Files and tables
# --------------------------------------------------------------------------------------------


_TRANSLATION_KEYS = ("mae", "psnr", "ssim", "identity_mae", "identity_psnr", "identity_ssim")


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _normalised_slices(volume, modalities, config, *, spacing: Sequence[float] | None
                       ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
  """Each modality of ``volume`` at ``data.spacing`` (resampled where ``spacing`` differs by
  more than 1%) as normalised axial slices through one window that holds every modality's brain:
  ``{modality: (slices (Z, H, W), has_brain (Z,))}``, and the index of the middle brain slice."""
  images = [volume.images[m] for m in modalities]
  if spacing is not None and resample.needs_resampling(spacing, tuple(config.data.spacing)):
    images = [resample.image_to_spacing(image, spacing, tuple(config.data.spacing))
              for image in images]
  slices, has_brain, _ = inference.whole_brain_slices(images, config)
  normalised = {m: (slices[i], has_brain[i]) for i, m in enumerate(modalities)}
  brain_slices = np.flatnonzero(normalised[modalities[0]][1])
  middle = int(brain_slices[len(brain_slices) // 2]) if len(brain_slices) else 0
  return normalised, middle


def translation_panel(translator: inference.SliceTranslator, volume, modalities, config, *,
                      spacing: Sequence[float] | None = None) -> dict:
  """The panel `evaluate_split` draws for a case (`visualize.translation_panel`), without its
  metrics: the middle brain slice of each modality, and its translation into every other one
  (on the diagonal the source slice itself), in the normalised space of training."""
  normalised, middle = _normalised_slices(volume, modalities, config, spacing=spacing)
  panel = {"true": {m: normalised[m][0][middle] for m in modalities}, "translated": {}}
  for source in modalities:
    source_slice = normalised[source][0][middle:middle + 1]
    for target in modalities:
      panel["translated"][(source, target)] = (
          source_slice[0] if source == target else
          inference.translate_slices(translator, source_slice,
                                     normalised[source][1][middle:middle + 1], source=source,
                                     target=target)[0])
  return panel


def _evaluate_translation(translator: inference.SliceTranslator, volume, case_id: str, modalities,
                          config, *, spacing: Sequence[float] | None = None
                          ) -> tuple[list[dict], dict]:
  """Every source->target pair of one case against the true target image (held out in training:
  no patient's modalities are ever paired), with the identity baseline beside it.

  The case's modalities are resampled to ``data.spacing`` where ``spacing`` (the case's voxel
  size in mm; None: taken to be ``data.spacing``) differs by more than 1%, and compared there,
  in the normalised space of training, on the axial slices of one window that holds the brain of
  every modality (`inference.whole_brain_slices`).

  Returns the rows and, for the picture, the true and translated slices at the middle of the brain.
  """
  clip = config.data.clip
  normalised, middle = _normalised_slices(volume, modalities, config, spacing=spacing)
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
      translated = inference.translate_slices(translator, source_slices, has_brain, source=source,
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


def _checkpoint_words(checkpoint: str, step: int) -> str:
  """'latest checkpoint (step 600)', 'best checkpoint (step 400)', 'checkpoint of step 200'."""
  if checkpoint in ("latest", "best"):
    return f"{checkpoint} checkpoint (step {step})"
  return f"checkpoint of step {step}"


def count(number: int, noun: str) -> str:
  """'1 case', '16 cases'."""
  return f"{number} {noun}" + ("" if number == 1 else "s")


def format_table(summary: dict, modalities: Sequence[str], *, title: str,
                 cases: int | None = None, untrained: Sequence[str] = ()) -> str:
  """Dice and HD95 (mm) per modality and region, mean ± std over cases (a `summarise` result), as
  a fixed-width table; the last column is the modality's Dice averaged over the regions. With
  ``cases`` 1 the cells are that case's values (a standard deviation of one value says nothing);
  the ``untrained`` modalities are marked with a '*'."""
  penalty = metrics_lib.EMPTY_HD95_PENALTY_MM

  def cell(stats, digits):
    if cases == 1:
      return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"

  header = (f"{'modality':<9}" + "".join(f"{'Dice ' + r:>15}" for r in REGIONS)
            + "".join(f"{'HD95 mm ' + r:>16}" for r in REGIONS) + f"{'Dice mean':>11}")
  lines = [title, header]
  for modality in modalities:
    regions = summary[modality]
    name = f"{modality}*" if modality in untrained else modality
    lines.append(f"{name:<9}" + "".join(f"{cell(regions[r]['dice'], 3):>15}" for r in REGIONS)
                 + "".join(f"{cell(regions[r]['hd95'], 1):>16}" for r in REGIONS)
                 + f"{np.mean([regions[r]['dice']['mean'] for r in REGIONS]):>11.3f}")
  lines.append(f"(BraTS rules for empty masks: both empty Dice 1, HD95 0; one empty Dice 0, "
               f"HD95 {penalty:g} mm. Medians and the other metrics: summary.json, metrics.csv)")
  if untrained:
    lines.append("(* a modality the model never trained on)")
  return "\n".join(lines)
