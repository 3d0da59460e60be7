"""A trained model as one file to hand on: ``uagan-jax export`` writes it, ``--model`` reads it.

A model file is a zip archive (the format is spelt out in docs/MODEL_FILE.md) holding what
inference needs and nothing else:

* ``manifest.json``: the format's name and version, the package version and time that wrote it,
  the family, the checkpoint exported (kind and step), per array its role, its path in the
  network's variables, dtype, shape and the SHA-256 of its bytes, and the SHA-256 of every other
  member;
* ``config.json``: the run's resolved config, byte for byte as the workdir holds it;
* ``arrays/<role>/<path>.npy``: the variables (``params``, ``batch_stats``) of the networks that
  run at inference, the family's ``SEGMENTATION_ROLE`` and ``TRANSLATION_ROLE``; never optimizer
  states, critics or discriminators;
* ``splits.json``: the run's training record where the workdir has one (case ids and the
  modalities training saw: the refusal of an untrained modality and evaluation's held-out
  splits read it), ``postprocessing.json`` where the workdir has one (`postprocessing`);
* ``model_card.json`` and ``MODEL_CARD.md``: what the model is, what it was trained on and how
  well it did (`model_card`).

Reading (`read`) verifies everything before anything is used: the zip's CRCs, a format version
this package reads, every member the manifest lists present and no other, every SHA-256, and
every array's path, dtype and shape against the network this version builds. Any failure is one
`UserError` line naming the file (and the member or array). The variables come back exactly as
`inference.load_network` returns them from the workdir, so the same predictors run them.

`is_model_file` tells a model file from a workdir; `inference.load_model` and
`volume_io.trained_modalities` take either, and `read_json` reads a JSON member of either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import shlex
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence

from uagan_jax import families
from uagan_jax.errors import UserError

FORMAT = "uagan-jax model"
# Raised when a reader of the previous version could no longer read what this one writes; a
# reader refuses a file of a newer version than its own.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
CONFIG = "config.json"
SPLITS = "splits.json"
POSTPROCESSING = "postprocessing.json"
CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
ARRAYS = "arrays"
# Copied from the workdir as they are, where present.
_COPIED = (SPLITS, POSTPROCESSING)
# What the manifest says of each array.
_ARRAY_KEYS = ("member", "role", "path", "dtype", "shape", "sha256")
# A name of the variable tree that can be a member's path as it is.
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


def package_version() -> str:
  """The installed package's version (the one ``uagan-jax --version`` prints)."""
  from uagan_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.version()


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def inference_roles(family_name: str) -> tuple[str, ...]:
  """The roles of the networks that run at inference: the family's segmentation network and
  translation network, whichever it has (UAGAN's are one network: one role)."""
  family = families.get(family_name)
  implementation = families.implementation(family_name)
  roles = []
  if family.segments:
    roles.append(implementation.SEGMENTATION_ROLE)
  if family.translates:
    roles.append(implementation.TRANSLATION_ROLE)
  return tuple(dict.fromkeys(roles))


def is_model_file(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a model file rather than a workdir: a file, or a missing .zip."""
  path = pathlib.Path(path)
  return path.is_file() or (not path.exists() and path.suffix.lower() == ".zip")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What `export` wrote.

  Attributes:
    output: The model file.
    size: Its size in bytes.
    arrays: How many arrays it holds.
    values: How many numbers those arrays hold.
    roles: The networks it holds.
    step: The training step of the checkpoint exported.
    checkpoint: Which checkpoint: "latest", "best" or a step number (as a string).
  """
  output: pathlib.Path
  size: int
  arrays: int
  values: int
  roles: tuple[str, ...]
  step: int
  checkpoint: str


def _npy(array) -> bytes:
  buffer = io.BytesIO()
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
  return buffer.getvalue()


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  raise ValueError(f"unexpected key {key!r} in a variable tree")


def _array_member(role: str, path: Sequence[str], index: int) -> str:
  """``arrays/<role>/<path>.npy``, or ``arrays/<role>/<index>.npy`` for names a zip member
  should not carry (never in Flax's own names)."""
  if all(_SAFE_KEY.match(part) and part not in (".", "..") for part in (role, *path)):
    return "/".join((ARRAYS, role, *path)) + ".npy"
  return f"{ARRAYS}/{role}/{index:05d}.npy"


def export(workdir: str | os.PathLike, *, output: str | os.PathLike, checkpoint: str = "latest",
           force: bool = False, command: str | None = None,
           log: Callable[[str], None] = print) -> ExportResult:
  """Writes the inference networks of a workdir's checkpoint, its config and model card as one
  model file.

  Args:
    workdir: A training workdir (``config.json``, ``checkpoints/``).
    output: The model file to write (a temporary file beside it, renamed when complete). Its
      folder is created.
    checkpoint: "latest", "best" or a step number (`inference.load_state`).
    force: Replace an existing ``output``; without it an existing file is refused.
    command: The command line that asked for the export, for the model card (default: one
      rebuilt from the arguments).
    log: Where a note on an unreadable checkpoint goes (the one before it is exported instead).

  Returns:
    The `ExportResult`.

  Raises:
    UserError: No config.json or checkpoint, an output that exists (without ``force``), is a
      folder or cannot be written.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from uagan_jax import config as config_lib
  from uagan_jax import inference
  # pylint: enable=g-import-not-at-top
  workdir, output = pathlib.Path(workdir), pathlib.Path(output)
  checkpoint = inference.check_checkpoint(checkpoint)
  if output.is_dir():
    raise UserError(f"{output}: a folder; --output is the model file to write (e.g. model.zip)")
  if output.exists() and not force:
    raise UserError(f"{output}: exists; pass --force to replace it")
  if workdir.is_file():
    raise UserError(f"{workdir}: a file; --workdir is a training workdir (the folder 'uagan-jax "
                    "train' wrote)")
  config_text = (workdir / CONFIG).read_text() if (workdir / CONFIG).is_file() else None
  config = config_lib.from_json_file(workdir / CONFIG)
  if command is None:
    command = shlex.join(["uagan-jax", "export", "--workdir", str(workdir), "--checkpoint",
                          checkpoint, "--output", str(output)])

  members: dict[str, bytes] = {CONFIG: config_text.encode("utf-8")}
  arrays, steps = [], {}
  roles = inference_roles(config.model.name)
  for role in roles:
    variables, steps[role] = inference.load_network(config, workdir, role=role, log=log,
                                                    checkpoint=checkpoint)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
      value = np.ascontiguousarray(np.asarray(leaf))
      keys = [_key_name(key) for key in path]
      member = _array_member(role, keys, len(arrays))
      members[member] = _npy(value)
      arrays.append({"member": member, "role": role, "path": keys, "dtype": value.dtype.str,
                     "shape": list(value.shape), "sha256": sha256(value.tobytes())})
  if len(set(steps.values())) > 1:  # a checkpoint fell back for one role only: mixed networks
    raise UserError(f"{workdir}: the networks came from different checkpoints ({steps}); "
                    "repair or remove the unreadable one and export again")
  step = int(next(iter(steps.values())))
  for name in _COPIED:
    if (workdir / name).is_file():
      members[name] = (workdir / name).read_bytes()
  card = model_card(workdir, config=config, step=step, checkpoint=checkpoint,
                    export_command=command)
  members[CARD_JSON] = (json.dumps(card, indent=2) + "\n").encode("utf-8")
  members[CARD_MARKDOWN] = card_markdown(card).encode("utf-8")

  manifest = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "package_version": package_version(),
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "family": config.model.name,
      "checkpoint": {"kind": checkpoint, "step": step},
      "roles": list(roles),
      "arrays": arrays,
      "files": {name: sha256(data) for name, data in members.items()
                if not name.startswith(ARRAYS + "/")},
  }
  _write_zip(output, {MANIFEST: (json.dumps(manifest, indent=2) + "\n").encode("utf-8"),
                      **members})
  return ExportResult(output=output, size=output.stat().st_size, arrays=len(arrays),
                      values=int(sum(np.prod(a["shape"], dtype=np.int64) for a in arrays)),
                      roles=roles, step=step, checkpoint=checkpoint)


def _write_zip(output: pathlib.Path, members: dict[str, bytes]) -> None:
  """The members as a zip (the manifest first), written to a temporary file beside ``output``,
  fsync'ed and renamed over it: a reader never sees half a model file."""
  from uagan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
  try:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
      with zipfile.ZipFile(f, "w") as archive:
        for name, data in members.items():
          # Arrays stored (float weights hardly compress: a few per cent for the time it takes),
          # the text deflated.
          compression = zipfile.ZIP_STORED if name.endswith(".npy") else zipfile.ZIP_DEFLATED
          info = zipfile.ZipInfo(name, date_time=time.gmtime()[:6])
          info.compress_type = compression
          info.external_attr = 0o644 << 16
          archive.writestr(info, data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, output)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise workdir_lib.disk_error(output, e, doing="writing the model file") from None


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------


def _json_file(path: pathlib.Path):
  """A JSON file's contents, or None where it is missing or unreadable."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _jsonl_rows(path: pathlib.Path) -> list[dict]:
  """The rows of a JSON-lines log; a line cut short by a crash is skipped."""
  rows = []
  try:
    lines = path.read_text().splitlines()
  except OSError:
    return rows
  for line in lines:
    with contextlib.suppress(ValueError):
      row = json.loads(line)
      if isinstance(row, dict):
        rows.append(row)
  return rows


def _checkpoint_steps(folder: pathlib.Path) -> list[int]:
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _eval_summary(folder: pathlib.Path) -> dict | None:
  """The headline numbers of an ``eval_*/summary.json``: per modality and region the mean Dice
  and HD95 over cases, the translation means, and what was scored."""
  report = _json_file(folder / "summary.json")
  if not isinstance(report, dict):
    return None
  out = {"folder": folder.name,
         **{key: report.get(key) for key in ("split", "checkpoint", "step", "cases")}}
  segmentation = report.get("segmentation")
  if isinstance(segmentation, dict):
    out["segmentation_mean"] = {
        modality: {region: {metric: values[metric]["mean"] for metric in ("dice", "hd95")
                            if metric in values}
                   for region, values in regions.items()}
        for modality, regions in segmentation.items()}
  if "translation_mean" in report:
    out["translation_mean"] = report["translation_mean"]
  if report.get("untrained_modalities"):
    out["untrained_modalities"] = report["untrained_modalities"]
  return out


def model_card(workdir: pathlib.Path, *, config, step: int, checkpoint: str,
               export_command: str) -> dict:
  """What a model is, what it was trained on and how well it did, from its workdir.

  Every key is present; what the workdir does not hold is None (e.g. ``validation`` without a
  ``validation.jsonl``, ``train_command`` without a ``run.json``), and ``absent`` lists those
  keys with the file that was missing.
  """
  from uagan_jax import volume_io  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  family = families.get(config.model.name)
  splits = _json_file(workdir / SPLITS)
  splits = splits if isinstance(splits, dict) else None
  absent = {}
  training_data = None
  if splits is not None:
    training_data = {
        "folder": pathlib.Path(splits["data"]).name if splits.get("data") else None,
        "layout": splits.get("layout"),
        "protocol": splits.get("protocol"),
        "cases": {name: len(splits[name]) for name in ("train", "val", "test")
                  if isinstance(splits.get(name), list)},
    }
  else:
    absent["training_data"] = "no splits.json in the workdir"
  validation = None
  rows = [row for row in _jsonl_rows(workdir / "validation.jsonl") if "dice/mean" in row]
  if rows:
    validation = {"best": max(rows, key=lambda row: row["dice/mean"]), "last": rows[-1],
                  "at_exported_step": next((row for row in rows if row.get("step") == step),
                                           None)}
  else:
    absent["validation"] = "no validation.jsonl rows in the workdir (train.validate_every 0)"
  evaluations = {}
  for kind, pattern in (("test", "eval_test*"), ("external", "eval_external_*")):
    found = [summary for folder in sorted(workdir.glob(pattern)) if folder.is_dir()
             for summary in [_eval_summary(folder)] if summary is not None]
    evaluations[kind] = found or None
    if not found:
      absent[kind] = f"no {pattern}/summary.json in the workdir"
  run = _json_file(workdir / "run.json")
  train_command = None
  if isinstance(run, dict) and run.get("recipe"):
    words = ["uagan-jax", "train", "--config", run["recipe"]]
    if splits is not None and splits.get("data"):
      words += ["--data", splits["data"]]
    words += ["--workdir", str(workdir), *run.get("overrides", [])]
    train_command = shlex.join(words)
  else:
    run = None
    absent["train_command"] = "no run.json in the workdir: the run is older than that record"
  trained = list(volume_io.trained_modalities(config, workdir=workdir))
  steps_trained = _checkpoint_steps(workdir / "checkpoints")
  return {
      "family": config.model.name,
      "family_summary": family.summary,
      "segments": family.segments,
      "regions": ["WT", "TC", "ET"] if family.segments else None,
      "translates": family.translates,
      "modalities": list(config.data.modalities),
      "trained_modalities": trained,
      "spacing_mm": list(config.data.spacing),
      "slice_size": list(config.data.image_size),
      "training_data": training_data,
      "steps": {"planned": int(config.train.steps),
                "trained": steps_trained[-1] if steps_trained else None,
                "exported": int(step), "checkpoint": checkpoint},
      "validation": validation,
      "test": evaluations["test"],
      "external": evaluations["external"],
      "package_version": package_version(),
      "train_command": train_command,
      "run_record": run,
      "export_command": export_command,
      "absent": absent,
  }


def _format_row(row: dict | None) -> str:
  if row is None:
    return "absent"
  regions = ", ".join(f"{key.split('/')[1]} {row[key]:.3f}" for key in ("dice/WT", "dice/TC",
                                                                         "dice/ET") if key in row)
  return f"step {row.get('step')}: Dice mean {row['dice/mean']:.3f} ({regions})"


def card_markdown(card: dict) -> str:
  """``MODEL_CARD.md``: the model card for people."""
  does = " and ".join(word for word, yes in (("segments WT/TC/ET", card["segments"]),
                                             ("translates between modalities",
                                              card["translates"])) if yes)
  absent = card["absent"]
  lines = [f"# Model card: {card['family']}", "",
           f"{card['family_summary']}. This model {does}.", "",
           "## Inputs", "",
           f"- Modalities in the config: {', '.join(card['modalities'])}; trained on: "
           f"{', '.join(card['trained_modalities']) or 'none'}",
           f"- Voxel spacing (mm): {' x '.join(f'{s:g}' for s in card['spacing_mm'])} (other "
           "spacings are resampled to it)",
           f"- Slice size: {' x '.join(map(str, card['slice_size']))}", "",
           "## Training", ""]
  data = card["training_data"]
  if data is None:
    lines.append(f"- Training data: absent ({absent['training_data']})")
  else:
    cases = ", ".join(f"{count} {name}" for name, count in data["cases"].items())
    lines.append(f"- Training data: {data['folder']} ({data['layout']} layout, "
                 f"{data['protocol']} protocol; cases: {cases})")
  steps = card["steps"]
  lines += [f"- Steps: {steps['trained']} trained of {steps['planned']} planned; exported: step "
            f"{steps['exported']} ({steps['checkpoint']} checkpoint)",
            "- Command: " + (f"`{card['train_command']}`" if card["train_command"]
                             else f"absent ({absent['train_command']})"), "",
            "## Validation", ""]
  if card["validation"] is None:
    lines.append(f"Absent ({absent['validation']}).")
  else:
    for name in ("best", "last", "at_exported_step"):
      lines.append(f"- {name.replace('_', ' ')}: {_format_row(card['validation'][name])}")
  for kind in ("test", "external"):
    lines += ["", f"## {kind.capitalize()} metrics", ""]
    if card[kind] is None:
      lines.append(f"Absent ({absent[kind]}).")
      continue
    for summary in card[kind]:
      lines.append(f"- {summary['folder']}: {summary.get('cases')} cases, "
                   f"{summary.get('checkpoint')} checkpoint (step {summary.get('step')})")
      for modality, regions in summary.get("segmentation_mean", {}).items():
        cells = ", ".join(f"{region} Dice {values.get('dice', float('nan')):.3f} / HD95 "
                          f"{values.get('hd95', float('nan')):.1f} mm"
                          for region, values in regions.items())
        lines.append(f"  - {modality}: {cells}")
      for pair, values in summary.get("translation_mean", {}).items():
        lines.append(f"  - {pair}: PSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.3f}, "
                     f"MAE {values['mae']:.3f}")
  lines += ["", "## Provenance", "",
            f"- uagan_jax {card['package_version']}",
            f"- Exported with `{card['export_command']}`", ""]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFile:
  """A verified model file.

  Attributes:
    path: The file.
    manifest: ``manifest.json``.
    config: The run's resolved config.
    variables: Role -> ``{"params", "batch_stats"}`` of that network, host arrays, as
      `inference.load_network` returns them.
    step: The training step of the checkpoint exported.
    checkpoint: Which checkpoint of the workdir it was: "latest", "best" or a step number.
    training_record: The run's ``splits.json``, or None.
    postprocessing: The run's ``postprocessing.json``, or None.
    card: ``model_card.json``.
  """
  path: pathlib.Path
  manifest: dict
  config: object
  variables: dict
  step: int
  checkpoint: str
  training_record: dict | None
  postprocessing: dict | None
  card: dict

  def network(self, capability: str) -> dict:
    """The variables of the network that ``capability`` ("segments" or "translates") needs."""
    implementation = families.implementation(self.config.model.name)
    role = (implementation.SEGMENTATION_ROLE if capability == "segments"
            else implementation.TRANSLATION_ROLE)
    return self.variables[role]


def _is_array_entry(entry) -> bool:
  """Whether a manifest's array entry has every key, each of the type the reader needs."""
  return (isinstance(entry, dict) and all(key in entry for key in _ARRAY_KEYS)
          and all(isinstance(entry[key], str) for key in ("member", "role", "dtype", "sha256"))
          and isinstance(entry["path"], list) and isinstance(entry["shape"], list))


class _Archive:
  """An open model file whose members are read, and checked, one at a time."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    if not path.exists():
      raise UserError(f"{path}: no such file")
    if path.is_dir():
      raise UserError(f"{path}: a folder; --model takes a model file written by 'uagan-jax "
                      "export' (a training workdir goes to --workdir)")
    try:
      self.zip = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
      raise UserError(f"{path}: not a model file, or truncated (not a readable zip archive: "
                      f"{e})") from None
    except OSError as e:
      raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    self.names = set(self.zip.namelist())
    self.manifest = self._manifest()

  def close(self) -> None:
    self.zip.close()

  def raw(self, name: str) -> bytes:
    """A member's bytes (the zip's CRC checked by `zipfile`)."""
    if name not in self.names:
      raise UserError(f"{self.path}: member {name} is missing (the manifest lists it); the "
                      "file is incomplete")
    try:
      return self.zip.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
      raise UserError(f"{self.path}: damaged or truncated member {name} ({e})") from None

  def _manifest(self) -> dict:
    if MANIFEST not in self.names:
      raise UserError(f"{self.path}: not a uagan-jax model file (no {MANIFEST}; write one with "
                      "'uagan-jax export')")
    try:
      manifest = json.loads(self.raw(MANIFEST))
    except ValueError as e:
      raise UserError(f"{self.path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise UserError(f"{self.path}: not a uagan-jax model file ({MANIFEST} names no format "
                      f"{FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
      raise UserError(f"{self.path}: unknown model file format version {version!r}")
    if version > FORMAT_VERSION:
      raise UserError(f"{self.path}: made by uagan_jax {manifest.get('package_version', '?')} "
                      f"(model file format {version}); this is version {package_version()}, "
                      f"which reads format {FORMAT_VERSION}: upgrade")
    arrays, files = manifest.get("arrays"), manifest.get("files")
    checkpoint = manifest.get("checkpoint")
    if (not isinstance(arrays, list) or not isinstance(files, dict)
        or not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("step"), int)
        or not all(_is_array_entry(entry) for entry in arrays)):
      raise UserError(f"{self.path}: {MANIFEST} is not a complete manifest (its arrays, files "
                      "or checkpoint are missing or malformed: damaged or edited)")
    listed = {MANIFEST, *files, *(entry["member"] for entry in arrays)}
    missing, extra = sorted(listed - self.names), sorted(self.names - listed)
    if missing:
      raise UserError(f"{self.path}: member {missing[0]} is missing (the manifest lists it); the "
                      "file is incomplete")
    if extra:
      raise UserError(f"{self.path}: member {extra[0]} is not in the manifest (added to the file "
                      "after it was written?)")
    return manifest

  def member(self, name: str) -> bytes:
    """A member listed under the manifest's "files", checked against its SHA-256."""
    if name not in self.manifest["files"]:
      raise UserError(f"{self.path}: {MANIFEST} lists no {name} (damaged or edited)")
    data = self.raw(name)
    if sha256(data) != self.manifest["files"][name]:
      raise UserError(f"{self.path}: {name} does not match its SHA-256 in {MANIFEST} (the file "
                      "was changed after it was written)")
    return data

  def json_member(self, name: str):
    """A JSON member, checked; None where the model file has none of that name."""
    if name not in self.manifest["files"]:
      return None
    try:
      return json.loads(self.member(name))
    except ValueError as e:
      raise UserError(f"{self.path}: {name} is not valid JSON ({e})") from None

  def array(self, entry: dict):
    """One array, checked against the manifest's dtype, shape and SHA-256."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    name = "/".join([entry["role"], *map(str, entry["path"])])
    data = self.raw(entry["member"])
    try:
      value = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise UserError(f"{self.path}: array {name} ({entry['member']}) is not a readable .npy "
                      f"({e})") from None
    if value.dtype.str != entry["dtype"] or list(value.shape) != list(entry["shape"]):
      raise UserError(f"{self.path}: array {name} is {value.dtype.str} {list(value.shape)}, the "
                      f"manifest says {entry['dtype']} {list(entry['shape'])} (changed after it "
                      "was written)")
    if sha256(np.ascontiguousarray(value).tobytes()) != entry["sha256"]:
      raise UserError(f"{self.path}: array {name} does not match its SHA-256 in {MANIFEST} (the "
                      "file was changed after it was written)")
    return value


def read(path: str | os.PathLike) -> ModelFile:
  """Reads and verifies a model file (see the module doc).

  Raises:
    UserError: A missing file, no zip, a damaged or truncated one, a format newer than this
      version reads, a missing, extra or changed member, or arrays that do not fit the networks
      this version builds; one line naming the file.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from uagan_jax import config as config_lib
  from uagan_jax import train_state
  # pylint: enable=g-import-not-at-top
  path = pathlib.Path(path)
  archive = _Archive(path)
  try:
    manifest = archive.manifest
    config = config_lib.from_json_text(archive.member(CONFIG).decode("utf-8"),
                                       name=f"{path}: {CONFIG}")
    try:
      roles = inference_roles(config.model.name)
    except UserError as e:
      raise UserError(f"{path}: {e}; it was made by uagan_jax "
                      f"{manifest.get('package_version', '?')}") from None
    by_role: dict[str, dict] = {}
    for entry in manifest["arrays"]:
      by_role.setdefault(entry["role"], {})[tuple(map(str, entry["path"]))] = entry
    if set(by_role) != set(roles):
      raise UserError(f"{path}: holds the networks {', '.join(sorted(by_role)) or 'none'}; a "
                      f"{config.model.name} model needs {', '.join(roles)}")
    variables = {}
    for role in roles:
      entries = by_role[role]
      expected = train_state.abstract_variables(config, role)
      wanted = {tuple(_key_name(k) for k in key_path): leaf
                for key_path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
      for key in sorted(set(wanted) ^ set(entries)):
        where = "has no" if key in wanted else "has an array"
        raise UserError(f"{path}: {where} {role}/{'/'.join(key)}"
                        f"{'' if key in wanted else ' that the network does not have'}; the "
                        f"{config.model.name} network of uagan_jax {package_version()} differs "
                        f"from the one of {manifest.get('package_version', '?')} that wrote it")
      arrays = {}
      for key, leaf in wanted.items():
        value = archive.array(entries[key])
        if value.shape != tuple(leaf.shape) or value.dtype != leaf.dtype:
          raise UserError(f"{path}: array {role}/{'/'.join(key)} is {value.dtype} "
                          f"{value.shape}; the network of this version has {leaf.dtype} "
                          f"{tuple(leaf.shape)} (model file of an incompatible version)")
        arrays[key] = value
      variables[role] = jax.tree_util.tree_map_with_path(
          lambda key_path, _, arrays=arrays: arrays[tuple(_key_name(k) for k in key_path)],
          expected)
    training_record = archive.json_member(SPLITS)
    postprocessing = archive.json_member(POSTPROCESSING)
    card = archive.json_member(CARD_JSON) or {}
    archive.member(CARD_MARKDOWN)  # checked like every member, though nothing reads it
  finally:
    archive.close()
  return ModelFile(path=path, manifest=manifest, config=config, variables=variables,
                   step=int(manifest["checkpoint"]["step"]),
                   checkpoint=str(manifest["checkpoint"].get("kind", "latest")),
                   training_record=training_record, postprocessing=postprocessing, card=card)


def read_json(source: str | os.PathLike, name: str):
  """A JSON file of a workdir (``source/name``) or the member ``name`` of a model file
  (checked against the manifest); None where there is none.

  E.g. ``read_json(source, "postprocessing.json")`` for whoever applies the post-processing of
  either kind of model.
  """
  source = pathlib.Path(source)
  if not is_model_file(source):
    path = source / name
    if not path.is_file():
      return None
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise UserError(f"{path}: cannot read it ({e})") from None
  archive = _Archive(source)
  try:
    return archive.json_member(name)
  finally:
    archive.close()


def postprocessing(source: str | os.PathLike) -> dict | None:
  """The post-processing (``postprocessing.json``) of a workdir or model file, or None."""
  return read_json(source, POSTPROCESSING)


def load_model(path: str | os.PathLike, *, capability: str, task: str,
               checkpoint: str = "latest",
               check: Callable[[object], None] | None = None) -> tuple[object, dict, int]:
  """`inference.load_model` (``network_only``) of a model file: (config, the variables of the
  network that does the job, checkpoint step).

  Raises:
    UserError: as `read`; a family that cannot do the job; a ``checkpoint`` other than the
      default (the file holds one).
  """
  from uagan_jax import inference  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if inference.check_checkpoint(checkpoint) != "latest":
    raise UserError(f"--checkpoint {checkpoint}: {path} holds one checkpoint, the one it was "
                    "exported from; --checkpoint is for --workdir")
  model = read(path)
  inference.check_capability(model.config, capability=capability, task=task, source=path,
                             kind="model file")
  if check is not None:
    check(model.config)
  return model.config, model.network(capability), model.step
