"""Post-processing of the nested regions, chosen on the validation cases (nnU-Net's way).

Two rules, each off at 0, applied to the nested WT/TC/ET masks (`regions.nest`) before ``predict``
writes them and ``evaluate`` scores them:

* **Small components removed, per region.** A connected component (26-connectivity, the lesions
  of the BraTS 2023+ lesion-wise metrics, `metrics.label_components`) smaller than the region's
  size in mm^3 is taken out of that region. The sizes are volumes, not voxel counts, so one rule
  holds across voxel spacings. The regions are done outside in, so the masks stay nested: a WT
  component removed takes the TC and ET inside it along (background); a TC component removed
  stays whole tumour (oedema); an ET component removed stays tumour core (necrotic/non-enhancing).
* **A small enhancing tumour relabelled.** Where the case's whole ET (after the above) is smaller
  than a volume in mm^3, ET is emptied and its voxels stay TC and WT (non-enhancing core). This is
  the BraTS teams' rule: a reference without ET scores Dice 1 only against an empty prediction
  and 0 against any false-positive voxel, so a few enhancing voxels cost more than they bring.

`choose_rule` picks the sizes from `SIZE_GRID_MM3` and `ET_RELABEL_GRID_MM3` that maximise the
mean lesion-wise Dice (the BraTS 2023+ ranking metric, `metrics.lesion_metrics`) over segmented
cases; `choose` (``uagan-jax postprocess``) does that on a workdir's validation split, never its
test split, per input modality (the unified model's errors differ by modality: from T1 it
predicts many small false-positive WT components, from FLAIR few; ``--pooled``: one rule for all,
chosen on every modality's segmentations together), and writes
``<workdir>/postprocessing.json`` (`FILE_NAME`), which `load` reads back for ``predict`` and
``evaluate``. The file's keys are described in docs/EVALUATION.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from uagan_jax import metrics as metrics_lib
from uagan_jax import model_file, volume_io
from uagan_jax.data import MODALITIES, REGIONS, readers
from uagan_jax.errors import UserError

FILE_NAME = "postprocessing.json"
# What `write` puts in the file's "format" key and `load` insists on.
FORMAT = "uagan_jax postprocessing 1"
# The component sizes tried per region, mm^3 (0: off). 1 mm voxels: 1 mm^3 each; the :demo
# recipes' 2 mm voxels: 8 mm^3 each. The lesion-wise metrics leave true lesions under 20 mm^3 out.
SIZE_GRID_MM3 = (0.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
# The whole-ET volumes below which ET is relabelled as tumour core, mm^3 (0: off).
ET_RELABEL_GRID_MM3 = (0.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


# --------------------------------------------------------------------------------------------
# The rule and its application (pure functions)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """One post-processing of nested WT/TC/ET masks.

  Attributes:
    min_component_mm3: Per region (WT, TC, ET), components smaller than this many mm^3 are
      removed from the region; 0: none.
    et_relabel_mm3: A whole ET smaller than this many mm^3 becomes tumour core; 0: never.
  """
  min_component_mm3: tuple[float, float, float] = (0.0, 0.0, 0.0)
  et_relabel_mm3: float = 0.0

  def __post_init__(self):
    sizes = tuple(float(s) for s in self.min_component_mm3)
    if len(sizes) != len(REGIONS):
      raise ValueError(f"min_component_mm3 needs {len(REGIONS)} sizes ({', '.join(REGIONS)}), "
                       f"got {len(sizes)}")
    if not all(math.isfinite(s) and s >= 0 for s in sizes + (float(self.et_relabel_mm3),)):
      raise ValueError("sizes must be finite and >= 0 mm^3")
    object.__setattr__(self, "min_component_mm3", sizes)
    object.__setattr__(self, "et_relabel_mm3", float(self.et_relabel_mm3))

  @property
  def is_identity(self) -> bool:
    """Whether the rule changes nothing (every size 0)."""
    return not any(self.min_component_mm3) and not self.et_relabel_mm3

  def describe(self) -> str:
    """One line, e.g. "WT: remove components < 50 mm^3; ET: relabel as TC when < 200 mm^3"."""
    parts = [f"{region}: remove components < {size:g} mm^3"
             for region, size in zip(REGIONS, self.min_component_mm3) if size]
    if self.et_relabel_mm3:
      parts.append(f"ET: relabel as TC when < {self.et_relabel_mm3:g} mm^3")
    return "; ".join(parts) or "none (every threshold off)"

  def to_json(self) -> dict:
    """``{"min_component_mm3": {"WT": ..., "TC": ..., "ET": ...}, "et_relabel_mm3": ...}``."""
    return {"min_component_mm3": dict(zip(REGIONS, self.min_component_mm3)),
            "et_relabel_mm3": self.et_relabel_mm3}

  @classmethod
  def from_json(cls, data) -> "Rule":
    """The inverse of `to_json`; ValueError for anything else."""
    if not isinstance(data, dict) or set(data) != {"min_component_mm3", "et_relabel_mm3"}:
      raise ValueError("a rule needs exactly the keys min_component_mm3 and et_relabel_mm3")
    sizes = data["min_component_mm3"]
    if not isinstance(sizes, dict) or set(sizes) != set(REGIONS):
      raise ValueError(f"min_component_mm3 needs the keys {', '.join(REGIONS)}")
    values = [sizes[r] for r in REGIONS] + [data["et_relabel_mm3"]]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      raise ValueError("sizes must be numbers (mm^3)")
    return cls(tuple(values[:3]), values[3])


def _components(mask: np.ndarray, voxel_mm3: float) -> tuple[np.ndarray, np.ndarray]:
  """(labels as `metrics.label_components` numbers them, the volume of each label in mm^3,
  index 0 the background)."""
  labels, count = metrics_lib.label_components(mask, full_connectivity=True)
  return labels, np.bincount(labels.ravel(), minlength=count + 1) * float(voxel_mm3)


def _keep(labels: np.ndarray, volumes: np.ndarray, min_volume_mm3: float) -> np.ndarray:
  """The voxels of the components of at least ``min_volume_mm3``."""
  kept = volumes >= min_volume_mm3
  kept[0] = False
  return kept[labels]


def remove_small_components(mask: np.ndarray, *, min_volume_mm3: float,
                            voxel_mm3: float) -> np.ndarray:
  """A boolean mask without its connected components (26-connectivity in 3D, as the lesion-wise
  metrics' lesions) smaller than ``min_volume_mm3``; voxels are ``voxel_mm3`` each. 0: the mask
  as it is."""
  mask = np.asarray(mask, bool)
  if min_volume_mm3 <= 0 or not mask.any():
    return mask
  labels, volumes = _components(mask, voxel_mm3)
  return _keep(labels, volumes, min_volume_mm3)


def apply(masks: np.ndarray, rule: Rule, *, spacing: Sequence[float]) -> np.ndarray:
  """Post-processes nested masks.

  Args:
    masks: bool (X, Y, Z, 3) WT/TC/ET, nested (WT >= TC >= ET; `regions.nest`).
    rule: What to do.
    spacing: The voxel size in mm (the sizes of ``rule`` are volumes).

  Returns:
    bool (X, Y, Z, 3), nested: WT's small components removed (with what TC and ET had inside
    them), then TC's (they stay WT), then ET's (they stay TC); then ET emptied (its voxels stay
    TC) where its whole volume is below ``rule.et_relabel_mm3``.
  """
  masks = np.asarray(masks)
  if masks.dtype != np.bool_ or masks.shape[-1:] != (len(REGIONS),):
    raise ValueError(f"masks must be boolean (..., 3), got {masks.dtype} {masks.shape}")
  if rule.is_identity:
    return masks
  voxel_mm3 = math.prod(float(s) for s in spacing)
  wt_size, tc_size, et_size = rule.min_component_mm3
  wt = remove_small_components(masks[..., 0], min_volume_mm3=wt_size, voxel_mm3=voxel_mm3)
  tc = remove_small_components(masks[..., 1] & wt, min_volume_mm3=tc_size, voxel_mm3=voxel_mm3)
  et = remove_small_components(masks[..., 2] & tc, min_volume_mm3=et_size, voxel_mm3=voxel_mm3)
  if np.count_nonzero(et) * voxel_mm3 < rule.et_relabel_mm3:
    et = np.zeros_like(et)
  return np.stack([wt, tc, et], axis=-1)


# --------------------------------------------------------------------------------------------
# Choosing the rule
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One segmented case to choose on: nested predicted and true (X, Y, Z, 3) masks, voxel size."""
  predicted: np.ndarray
  truth: np.ndarray
  spacing: tuple[float, float, float]


def _lesion_dice(predicted: np.ndarray, truth: np.ndarray, spacing) -> float:
  return metrics_lib.lesion_metrics(predicted, truth, spacing=tuple(spacing))["lesion_dice"]


def _best(candidates: Sequence, masks_of: Callable, cases: Sequence[Case],
          region: int) -> tuple[object, float, np.ndarray]:
  """The candidate whose masks (``masks_of(case index, candidate)`` -> (key, mask)) have the
  highest mean lesion-wise Dice of ``region``; the first of equals (candidates come smallest
  first, so a tie keeps the smaller threshold or off). Masks of one key score once (most
  thresholds remove the same components as their neighbours). Returns (candidate, mean, the
  per-case masks of it)."""
  scored: dict = {}
  best = None
  for candidate in candidates:
    masks, scores = [], []
    for index, case in enumerate(cases):
      key, mask = masks_of(index, candidate)
      if (index, key) not in scored:
        scored[(index, key)] = _lesion_dice(mask, case.truth[..., region], case.spacing)
      masks.append(mask)
      scores.append(scored[(index, key)])
    mean = float(np.mean(scores))
    if best is None or mean > best[1] + 1e-12:
      best = (candidate, mean, masks)
  return best


def choose_rule(cases: Sequence[Case], *, sizes: Sequence[float] = SIZE_GRID_MM3,
                et_relabel: Sequence[float] = ET_RELABEL_GRID_MM3) -> Rule:
  """The rule of the grid with the highest mean lesion-wise Dice per region over ``cases``.

  A region's masks depend on its own size and those of the regions outside it (`apply` works
  outside in), never on an inner region's, so the regions are chosen in turn, WT, then TC given
  WT's choice, then ET's size and relabel volume together given both: each region gets the best
  of the grid for its own mean lesion-wise Dice. Ties keep the smaller value (0: off); for ET,
  off, then the component size alone, then the relabelling alone, then both.
  """
  if not cases:
    raise ValueError("no cases to choose on")
  sizes = sorted(float(s) for s in sizes)
  et_relabel = sorted(float(s) for s in et_relabel)
  voxels = [math.prod(c.spacing) for c in cases]
  chosen_sizes, outer = [], [np.ones(c.predicted.shape[:-1], bool) for c in cases]
  for region in range(len(REGIONS) - 1):  # WT, TC
    parts = [_components(c.predicted[..., region] & o, v) for c, o, v in zip(cases, outer, voxels)]

    def masks_of(index, size, parts=parts):
      labels, volumes = parts[index]
      kept = volumes >= size
      return kept.tobytes(), _keep(labels, volumes, size)

    size, _, outer = _best(sizes, masks_of, cases, region)
    chosen_sizes.append(size)
  parts = [_components(c.predicted[..., 2] & o, v) for c, o, v in zip(cases, outer, voxels)]

  def et_masks_of(index, candidate):
    size, relabel = candidate
    labels, volumes = parts[index]
    kept = volumes >= size
    mask = _keep(labels, volumes, size)
    if np.count_nonzero(mask) * voxels[index] < relabel:
      return b"empty", np.zeros_like(mask)
    return kept.tobytes(), mask

  # Off first, then one rule on (the component size first: it takes out single components,
  # the relabelling a case's whole ET), then both; each in increasing size.
  candidates = sorted(((s, r) for s in sizes for r in et_relabel),
                      key=lambda c: ((c[0] > 0) + (c[1] > 0), c[1], c[0]))
  (et_size, relabel), _, _ = _best(candidates, et_masks_of, cases, 2)
  return Rule((*chosen_sizes, et_size), relabel)


def scores(cases: Sequence[Case], rule: Rule) -> dict[str, dict[str, float]]:
  """Mean lesion-wise Dice and HD95 and (global) Dice per region over ``cases`` post-processed by
  ``rule``: ``{region: {"lesion_dice", "lesion_hd95", "dice"}}``."""
  rows = {region: {"lesion_dice": [], "lesion_hd95": [], "dice": []} for region in REGIONS}
  for case in cases:
    predicted = apply(case.predicted, rule, spacing=case.spacing)
    for index, region in enumerate(REGIONS):
      lesion = metrics_lib.lesion_metrics(predicted[..., index], case.truth[..., index],
                                          spacing=case.spacing)
      rows[region]["lesion_dice"].append(lesion["lesion_dice"])
      rows[region]["lesion_hd95"].append(lesion["lesion_hd95"])
      rows[region]["dice"].append(metrics_lib.dice(predicted[..., index], case.truth[..., index]))
  return {region: {k: float(np.mean(v)) for k, v in values.items()}
          for region, values in rows.items()}


# --------------------------------------------------------------------------------------------
# postprocessing.json
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PostProcessing:
  """A workdir's ``postprocessing.json``, as `load` reads it.

  Attributes:
    path: The file.
    rules: Input modality -> its `Rule`.
    step: The checkpoint step the rules were chosen for.
    cases: How many validation cases they were chosen on.
    tta: Whether those cases were segmented with test-time augmentation.
  """
  path: pathlib.Path
  rules: dict[str, Rule]
  step: int
  cases: int
  tta: bool = True

  def note(self, step: int, modalities: Sequence[str], tta: bool = True) -> str:
    """The line ``predict`` and ``evaluate`` print: what is applied to ``modalities`` and where
    it comes from; says so where the rules were chosen for another checkpoint step, or on
    segmentations made with(out) the test-time augmentation that ``tta`` says is used now."""
    described = "; ".join(
        f"{m}: {self.rules[m].describe() if m in self.rules else 'none (not chosen for it)'}"
        for m in modalities)
    line = (f"post-processing ({self.path}, chosen on {self.cases} val case"
            f"{'' if self.cases == 1 else 's'} for step {self.step}) {described}")
    if step != self.step:
      line += (f" [note: chosen for step {self.step}, applied to step {step}; "
               "'uagan-jax postprocess' with this --checkpoint chooses again]")
    if tta != self.tta:
      used = lambda on: "with test-time augmentation" if on else "without test-time augmentation"
      line += (f" [note: chosen on segmentations {used(self.tta)}, applied to segmentations "
               f"{used(tta)}]")
    return line

  def apply(self, masks: np.ndarray, *, modality: str, spacing: Sequence[float]) -> np.ndarray:
    """`apply` with ``modality``'s rule (none chosen for it: the masks as they are)."""
    rule = self.rules.get(modality)
    return masks if rule is None else apply(masks, rule, spacing=spacing)

  def summary(self, step: int) -> dict:
    """What evaluate's summary.json records of it."""
    return {"file": str(self.path), "chosen_for_step": self.step, "applied_to_step": step,
            "val_cases": self.cases, "chosen_with_tta": self.tta,
            "rules": {m: rule.to_json() for m, rule in self.rules.items()},
            "descriptions": {m: rule.describe() for m, rule in self.rules.items()}}


def load(source: str | os.PathLike) -> PostProcessing | None:
  """The `FILE_NAME` of a workdir or of a model file (``uagan-jax export`` copies it in, checked
  against the file's manifest), or None where there is none.

  Raises:
    UserError: A file that is not JSON or lacks what `write` puts in (one line naming it); a
      damaged model file (`model_file`).
  """
  source = pathlib.Path(source)
  in_model_file = model_file.is_model_file(source)
  path = pathlib.Path(f"{source}:{FILE_NAME}") if in_model_file else source / FILE_NAME
  if not in_model_file and not path.is_file():
    return None
  try:
    data = model_file.postprocessing(source) if in_model_file else json.loads(path.read_text())
    if data is None:
      return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      raise ValueError(f"no \"format\": \"{FORMAT}\"")
    rules = {}
    for modality, entry in data["modalities"].items():
      if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
      rules[modality] = Rule.from_json(entry["rule"])
    step, cases, tta = data["step"], data["cases"], data.get("tta", False)
    if not isinstance(tta, bool):
      raise ValueError("tta must be true or false")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step, cases)):
      raise ValueError("step and cases must be counts")
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError,
          AttributeError) as e:
    detail = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
    raise UserError(f"{path}: damaged post-processing file ({detail}); choose again with "
                    "'uagan-jax postprocess', or delete it") from None
  return PostProcessing(path=path, rules=rules, step=step, cases=cases, tta=tta)


def for_run(source: str | os.PathLike, *, enabled: bool, step: int, modalities: Sequence[str],
            log: Callable[[str], None], tta: bool = True) -> PostProcessing | None:
  """What ``predict`` and ``evaluate`` apply: the post-processing of ``source`` (a workdir or a
  model file) unless ``enabled`` is False (``--no-postprocessing``); one line says which (none
  where there is none)."""
  if not enabled:
    try:
      held = load(source)
      where = None if held is None else held.path
    except UserError:  # a damaged file is not applied either: --no-postprocessing gets past it
      where = pathlib.Path(source) / FILE_NAME
    if where is not None:
      log(f"post-processing off (--no-postprocessing; {where} not applied)")
    return None
  loaded = load(source)
  if loaded is not None:
    log(loaded.note(step, modalities, tta=tta))
  return loaded


def note_ensemble(sources: Sequence[str | os.PathLike], *, log: Callable[[str], None]) -> None:
  """What ``predict`` and ``evaluate`` say of an ensemble's models (``sources``): none of their
  post-processing is applied (each was chosen on one model's segmentations); a note names those
  that hold one."""
  held = [source for source in sources if load(source) is not None]
  if held:
    log(f"note: an ensemble is not post-processed (the postprocessing.json of "
        f"{', '.join(map(str, held))} was chosen for one model's segmentations)")


def write(path: pathlib.Path, report: dict) -> None:
  """Writes ``report`` (`choose`'s) as JSON, atomically (a reader never sees half a file)."""
  temporary = path.with_name(f".{path.name}.tmp")
  temporary.write_text(json.dumps(report, indent=2) + "\n")
  os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# uagan-jax postprocess
# --------------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
  """Per modality: the chosen rule, and lesion-wise Dice / HD95 per region before -> after."""
  lines = [f"{'modality':<9}" + "".join(f"{'lesion Dice ' + r:>22}" for r in REGIONS)
           + "".join(f"{'lesion HD95 ' + r:>22}" for r in REGIONS)]
  for modality, entry in report["modalities"].items():
    before, after = entry["before"], entry["after"]
    lines.append(
        f"{modality:<9}"
        + "".join(f"{before[r]['lesion_dice']:>13.3f} -> {after[r]['lesion_dice']:.3f}"
                  for r in REGIONS)
        + "".join(f"{before[r]['lesion_hd95']:>13.1f} -> {after[r]['lesion_hd95']:>5.1f}"
                  for r in REGIONS))
    lines.append(f"{'':<9}rule: {entry['description']}")
  return "\n".join(lines)


def choose(*, workdir: str | os.PathLike, data_dir: str | os.PathLike,
           checkpoint: str = "latest", batch_size: int | None = None, pooled: bool = False,
           tta: bool = True, log: Callable[[str], None] = print) -> dict:
  """``uagan-jax postprocess``: chooses a rule per modality on the workdir's validation split and
  writes ``<workdir>/postprocessing.json``.

  Each validation case is segmented once from each modality the model was trained on (the code
  path of ``predict``, with its test-time augmentation unless ``tta`` is False: the rule is
  chosen on the segmentations it will be applied to); every candidate rule is applied to those
  masks (`choose_rule`).

  Args:
    workdir: A training workdir of a model that segments, with a non-empty val split.
    data_dir: The data folder it was trained on (its val cases are read from there).
    checkpoint: "latest", "best" or a step: the checkpoint that segments.
    batch_size: Slices per forward pass (default the config's eval.batch_size).
    pooled: Choose one rule for every modality, on the val cases of all of them together
      (``--pooled``), instead of a rule per modality on its own cases.
    tta: Segment with test-time augmentation (the default of ``predict`` and ``evaluate``);
      recorded in the file, and ``predict``/``evaluate`` say so where they segment otherwise.
    log: Where progress, the table and the file's name go.

  Returns:
    What was written to the file.

  Raises:
    UserError: No splits.json, an empty val split, val cases missing from ``data_dir``, and
      whatever loading the model raises.
  """
  # pylint: disable=g-import-not-at-top
  from uagan_jax import inference, predict  # JAX, only when run; predict imports this module
  # pylint: enable=g-import-not-at-top
  workdir, data_dir = pathlib.Path(workdir), pathlib.Path(data_dir)
  splits_path = workdir / "splits.json"
  splits = volume_io.workdir_splits(workdir)
  case_ids = list(splits.get("val") or ())
  if not case_ids:
    raise UserError(f"{splits_path}: the val split has no cases; post-processing is chosen on "
                    "them, never on the test cases: train with --config.data.val_fraction > 0")
  found = {c.case_id: c for c in readers.find_cases(data_dir)}
  missing = [c for c in case_ids if c not in found]
  if missing:
    raise UserError(f"{data_dir}: cases of the val split are missing: {', '.join(missing[:5])}")
  segmentor = predict.load_segmentor(workdir, batch_size=batch_size, checkpoint=checkpoint)
  modalities = list(segmentor.modalities)
  log(f"model: {segmentor.config.model.name}, checkpoint step {segmentor.step}; segmenting the "
      f"{len(case_ids)} val cases from {', '.join(modalities)}")
  cases: dict[str, list[Case]] = {m: [] for m in modalities}
  started = time.time()
  for number, case_id in enumerate(case_ids, 1):
    volume = readers.load_case(found[case_id], modalities=modalities, with_label=True)
    truth = readers.labels_to_regions(volume.label, convention=found[case_id].label_convention)
    for modality in modalities:
      predicted = segmentor.segment(volume.images[modality], modality=modality,
                                    spacing=volume.spacing, tta=tta)
      cases[modality].append(Case(predicted, truth, tuple(volume.spacing)))
    log(f"  segmented {number}/{len(case_ids)} val cases ({case_id}); "
        f"ETA {(time.time() - started) / number * (len(case_ids) - number):.0f} s")
  log(f"trying {len(SIZE_GRID_MM3)} component sizes per region and "
      f"{len(ET_RELABEL_GRID_MM3)} ET relabel volumes per modality")
  report = {"format": FORMAT, "checkpoint": inference.check_checkpoint(checkpoint),
            "step": int(segmentor.step), "data": str(data_dir.absolute()), "split": "val",
            "tta": tta,
            "cases": len(case_ids), "case_ids": case_ids,
            "objective": "per region, the mean lesion-wise Dice (BraTS 2023+) over the val cases "
                         + ("segmented from every modality, pooled: one rule for all" if pooled
                            else "of each input modality: a rule per modality")
                         + "; ties keep the smaller size (0: off)",
            "pooled": pooled,
            "grid": {"min_component_mm3": list(SIZE_GRID_MM3),
                     "et_relabel_mm3": list(ET_RELABEL_GRID_MM3)},
            "modalities": {}}
  common = choose_rule([c for m in modalities for c in cases[m]]) if pooled else None
  for modality in modalities:
    rule = common if pooled else choose_rule(cases[modality])
    report["modalities"][modality] = {
        "rule": rule.to_json(), "description": rule.describe(),
        "before": scores(cases[modality], Rule()), "after": scores(cases[modality], rule)}
  path = workdir / FILE_NAME
  write(path, report)
  log(f"Post-processing chosen on {len(case_ids)} val cases, checkpoint step {segmentor.step} "
      "(mean over cases, before -> after):\n" + format_table(report))
  log(f"wrote {path}; 'uagan-jax predict' and 'uagan-jax evaluate' apply it "
      "(--no-postprocessing: not)")
  return report

