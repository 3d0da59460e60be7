"""The ``uagan-jax`` command line: a thin entry point over the library.

  uagan-jax synth    --out DIR --cases N --seed S [--shape X Y Z]
  uagan-jax train    --config configs/segan.py[:variant] --data DIR --workdir W [--config.a.b=v ...]
  uagan-jax evaluate --workdir W --data DIR [--split test|all] [--checkpoint latest|best|STEP]
                     [--no-tta] [--timing] [--no-postprocessing] [--out DIR]
                     [--workdir W2 ... --checkpoint C ...: an ensemble]
  uagan-jax evaluate --cross-validation --workdir F0 --workdir F1 ... --data DIR --out DIR
  uagan-jax translate --workdir W --input FILE --source t1 --target flair --output OUT.nii.gz
  uagan-jax predict  --workdir W --input FILE|CASE|DATA --modality flair --output SEG.nii.gz|DIR
                     [--checkpoint latest|best|STEP] [--no-tta] [--save-probabilities]
                     [--no-postprocessing] [--workdir W2 ...] [--timing]
  uagan-jax postprocess --workdir W --data DIR [--checkpoint latest|best|STEP] [--pooled]
  uagan-jax export   --workdir W [--checkpoint latest|best|STEP] --output MODEL.zip [--force]
  (predict, translate: --model MODEL.zip in place of --workdir; evaluate: --model MODEL.zip
  --out DIR)
  uagan-jax study    STUDY.py[:variant] --out DIR [--config.a.b=v ...]

Bad input (a missing or corrupt file, an unknown config key, ...) ends with one line
``error: <file or key>: <problem>`` on stderr and exit code 2, never a traceback; so does a
command line without a command (after the usage and the list of commands). ``--help`` and
``--version`` print and exit 0 (argparse's SystemExit(0), which ``main`` lets through).

Commands import their modules lazily (inside ``_synth``, ``_train``, ...) so that ``--help``
answers without loading JAX; the help text itself comes from jax-free sources only: the
`uagan_jax.families` table and the recipe files' source text (read with `ast`, never imported).
This docstring is for developers; the printed help is built in `_build_parser`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import pathlib
import re
import shutil
import sys
import textwrap
import time

import uagan_jax
from uagan_jax import families
from uagan_jax.errors import UserError

_SYNTH_SHAPE = (128, 128, 96)
# = synthetic.DEMO_SPACING (not imported: --help loads nothing heavy): the phantoms' brain then
# has a head's size, and the :demo recipes train at it.
_SYNTH_SPACING = 2.0


def _log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def version() -> str:
  """The installed package's version (setup.cfg), or `uagan_jax.__version__` from a bare tree."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version("uagan_jax")
  except importlib.metadata.PackageNotFoundError:
    return uagan_jax.__version__


class _Parser(argparse.ArgumentParser):
  """argparse that reports a usage problem as a UserError (one line, exit 2)."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Descriptions and epilogs as written (they are pre-wrapped); every option states its default.

  An option's help gets " (required)" or " (default: ...)" appended unless it already says.
  """

  def __init__(self, prog, **kwargs):
    kwargs.setdefault("width", _width())
    super().__init__(prog, **kwargs)

  def _get_help_string(self, action):
    text = action.help or ""
    if action.default is argparse.SUPPRESS or not action.option_strings:
      return text
    if "%(default)" in text or "default:" in text or "required" in text:
      return text
    if action.required:
      return f"{text} (required)"
    if isinstance(action, argparse._StoreTrueAction):  # pylint: disable=protected-access
      return f"{text} (default: off)"
    return f"{text} (default: %(default)s)"


class _VersionAction(argparse.Action):
  """``--version``: prints ``uagan-jax <version>`` and exits 0 (looked up only when asked)."""

  def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
               help="print the program's version and exit"):  # pylint: disable=redefined-builtin
    super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0,
                     help=help)

  def __call__(self, parser, namespace, values, option_string=None):
    print(f"{parser.prog} {version()}", flush=True)
    parser.exit(0)


def _width() -> int:
  """The help's width: terminal columns - 2 (as argparse), kept between 60 and 100."""
  return max(60, min(100, shutil.get_terminal_size().columns - 2))


def _wrap(text: str, indent: str = "  ") -> str:
  """One paragraph, wrapped to the help width (paths and hyphenated words kept whole)."""
  return textwrap.fill(" ".join(text.split()), width=_width(), initial_indent=indent,
                       subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def _either(names) -> str:
  """("a", "b", "c") -> "a, b or c"."""
  names = list(names)
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _table(rows: list[tuple[str, str]], indent: str = "  ") -> str:
  """Two columns, the second wrapped under itself (a newline in it starts a new line)."""
  column = max(len(name) for name, _ in rows) + 2
  lines = []
  for name, text in rows:
    wrapped = [line for part in text.split("\n")
               for line in textwrap.wrap(" ".join(part.split()), break_on_hyphens=False,
                                         break_long_words=False,
                                         width=max(30, _width() - len(indent) - column))]
    lines.append(f"{indent}{name:<{column}}{wrapped[0] if wrapped else ''}".rstrip())
    lines.extend(f"{indent}{'':<{column}}{more}" for more in wrapped[1:])
  return "\n".join(lines)


def _families_table() -> str:
  """One line per model family, from the jax-free `uagan_jax.families` table."""
  rows = []
  for name in families.names():
    family = families.get(name)
    does = " + ".join(word for word, yes in (("segments", family.segments),
                                             ("translates", family.translates)) if yes)
    rows.append((name, f"[{does or 'trains only'}] {family.summary}"))
  return _table(rows)


# ------------------------------------------------------------------------------------------------
# Recipes: the configs/*.py files next to the package, read as text: importing one would run it
# (and load ml_collections), and a broken recipe must not break --help.
# ------------------------------------------------------------------------------------------------


def recipes_folder() -> pathlib.Path:
  """Where the recipes live: ``configs/`` beside the ``uagan_jax`` package (a source checkout)."""
  return pathlib.Path(uagan_jax.__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What ``train --help`` says about one recipe file, read from its source text."""
  path: pathlib.Path
  summary: str  # the docstring's first sentence
  family: str  # the first ``c.model.name = "..."`` in get_config ("" if none)
  variants: tuple[str, ...]  # what may follow the ':' (from get_config's comparisons)


def _first_sentence(docstring: str) -> str:
  paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
  return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph, maxsplit=1)[0]


def _strings(node) -> list[str]:
  """The string constants of ``"a"`` or of a tuple/list/set of them."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return [node.value]
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
  return []


def read_recipe(path: pathlib.Path) -> Recipe:
  """A recipe's summary, model family and variants, from its source text (nothing is imported).

  The variants are the strings ``get_config``'s first argument is compared with (``variant ==
  "demo"``, ``variant in ("stargan", "uagan")``), and any named after "known:" in its
  ``ValueError`` message. A file that does not parse is reported in the summary, not raised.
  """
  path = pathlib.Path(path)
  try:
    tree = ast.parse(path.read_text(), filename=str(path))
  except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
    return Recipe(path, f"(cannot be read: {type(e).__name__})", "", ())
  summary = _first_sentence(ast.get_docstring(tree) or "") or "(no docstring)"
  function = next((node for node in tree.body
                   if isinstance(node, ast.FunctionDef) and node.name == "get_config"), None)
  if function is None:
    return Recipe(path, summary, "", ())
  arg = function.args.args[0].arg if function.args.args else None
  variants: list[str] = []
  family = ""
  for node in ast.walk(function):
    if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == arg
        and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.In))):
      variants += _strings(node.comparators[0])
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "known:" in node.value:
      known = node.value.split("known:", 1)[1].split(")", 1)[0]
      variants += [v.strip() for v in known.split(",") if v.strip()]
    elif (not family and isinstance(node, ast.Assign) and len(node.targets) == 1
          and ast.unparse(node.targets[0]).endswith("model.name") and _strings(node.value)):
      family = _strings(node.value)[0]
  variants = [v for v in dict.fromkeys(variants) if v]  # in order of appearance, once each
  return Recipe(path, summary, family, tuple(variants))


def recipes(folder: pathlib.Path | None = None) -> list[Recipe]:
  """Every ``*.py`` recipe in ``folder`` (default `recipes_folder`), by name."""
  folder = recipes_folder() if folder is None else pathlib.Path(folder)
  if not folder.is_dir():
    return []
  return [read_recipe(p) for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")]


def _shown(path: pathlib.Path) -> str:
  """``path`` relative to the current folder when it is below it (as a user would type it)."""
  try:
    return str(path.relative_to(pathlib.Path.cwd()))
  except ValueError:
    return str(path)


def _train_epilog() -> str:
  folder = recipes_folder()
  found = recipes(folder)
  parts = []
  if found:
    rows = []
    for recipe in found:
      facts = ([f"model.name {recipe.family}"] if recipe.family else []) + [
          f"variants: {', '.join(recipe.variants) if recipe.variants else 'none'}"]
      rows.append((_shown(recipe.path), f"{recipe.summary}\n{'; '.join(facts)}"))
    parts.append("recipes (pass one as --config FILE or --config FILE:VARIANT):\n" + _table(rows))
  else:
    parts.append("recipes:\n" + _wrap(
        f"none found: the recipes are the configs/*.py files of the source checkout, next to the "
        f"uagan_jax package (looked in {folder}). Any file with a get_config() works."))
  parts.append("model families (config key model.name):\n" + _families_table())
  example = (f"{_shown(folder / 'segan.py')}:demo" if (folder / "segan.py").is_file()
             else "configs/segan.py:demo")
  parts.append(
      "config overrides:\n"
      + _wrap("Any config key of the recipe can be changed after the options, as "
              "--config.GROUP.KEY=VALUE or --config.GROUP.KEY VALUE (the keys and their "
              "defaults are uagan_jax/config.py's base_config, then the recipe's changes). "
              "An unknown key or a value of the wrong type is an error (exit 2), reported "
              "before anything is written. For example:")
      + f"\n    uagan-jax train --config {example} --data data_synth --workdir runs/demo \\"
        "\n        --config.train.steps=2000 --config.optim.segmentor_lr=1e-4")
  parts.append(
      "outputs (in --workdir):\n"
      + _wrap("config.json, splits.json, metrics.jsonl, checkpoints/, figures/, tensorboard/ "
              "(TensorBoard event files; --config.train.tensorboard=False: none) and, unless "
              "--no-eval, eval_test/ (metrics.csv, summary.json). Running the same command again "
              "resumes from the newest checkpoint."))
  return "\n\n".join(parts)


def _top_description() -> str:
  segments = families.with_capability(segments=True)
  translates = families.with_capability(translates=True)
  return "\n\n".join([
      _wrap("Brain-tumour segmentation and MRI modality translation with GAN-trained models.",
            indent=""),
      _wrap("uagan-jax segments brain tumours in multi-modal MRI (T1, T1ce, T2, FLAIR) into whole "
            "tumour (WT), tumour core (TC) and enhancing tumour (ET) from any single modality "
            f"({_either(segments)} models), and translates an image from one modality into "
            f"another ({_either(translates)} models); uagan does both with one network. Models "
            "train on unpaired data (each patient contributes one modality) in the BraTS "
            "2018-2023, UPENN-GBM or MSD Task01 layouts.", indent=""),
      "model families (choose one with a recipe, see 'uagan-jax train --help'):\n"
      + _families_table(),
  ])


# The workflow 'uagan-jax --help' prints, one command a line (tests/test_cli.py runs it). The
# uagan recipe both segments and translates, in the workdir launch/demo.sh gives it.
WORKFLOW = (
    "uagan-jax synth    --out data_synth --cases 80 --seed 0 --shape 96 96 64",
    "uagan-jax train    --config configs/uagan.py:demo --data data_synth --workdir runs/demo_uagan",
    "uagan-jax evaluate --workdir runs/demo_uagan --data data_synth --checkpoint best",
    "uagan-jax predict  --workdir runs/demo_uagan --input data_synth/SynthBraTS_00000 "
    "--modality flair --output seg.nii.gz",
    "uagan-jax translate --workdir runs/demo_uagan --input data_synth/SynthBraTS_00000 "
    "--source t1 --target flair --output flair.nii.gz",
)


def _top_epilog() -> str:
  return "\n".join([
      "typical workflow (synthetic data, a CPU-sized demo; the first two lines are what",
      "'MODEL=uagan bash launch/demo.sh' runs, 'bash launch/demo.sh' trains segan into",
      "runs/demo instead):",
      *(f"  {line}" for line in WORKFLOW),
      "",
      _wrap("Run 'uagan-jax COMMAND --help' for a command's options; 'uagan-jax train --help' "
            "lists the recipes and the --config.KEY=VALUE overrides. Bad input ends with one "
            "line 'error: ...' on stderr and exit code 2.", indent=""),
  ])


CHECKPOINT_HELP = ("which checkpoint of --workdir: the newest, the best by validation Dice "
                   "(train.validate_every; checkpoints_best/) or the step number of one kept in "
                   "checkpoints/")
# --checkpoint of the commands that also take --model (a model file holds one checkpoint) and
# ensembles (--workdir and --checkpoint repeated).
CHECKPOINT_OR_MODEL_HELP = (CHECKPOINT_HELP + "; repeat it for an ensemble (see --workdir); not "
                            "with --model, which holds the one it was exported from (default: "
                            "latest)")


def _add_model_source(parser: argparse.ArgumentParser, *, workdir_help: str,
                      ensembles: bool = False) -> None:
  """``--workdir DIR | --model MODEL.zip``: exactly one kind, where the model comes from;
  ``ensembles``: --workdir may be repeated (an ensemble)."""
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--workdir", type=pathlib.Path, metavar="DIR",
                     action="append" if ensembles else "store",
                     help=f"{workdir_help} (default: none; this or --model is required)")
  group.add_argument("--model", type=pathlib.Path, metavar="MODEL.zip",
                     help="a model file written by 'uagan-jax export', in place of --workdir "
                          "(default: none)")


NO_POSTPROCESSING_HELP = ("do not apply the model's postprocessing.json (chosen on the "
                          "validation cases by 'uagan-jax postprocess'); without the file "
                          "nothing is applied anyway")


# Test-time augmentation is on by default in predict and evaluate: it raised Dice on the measured
# runs (docs/EXPERIMENTS.md, "Test-time augmentation").
TTA_DEFAULT = True
TTA_HELP = ("test-time augmentation: each slice also segmented mirrored along H, along W and "
            "both, the four probability maps (mirrored back) averaged before the threshold, as "
            "nnU-Net mirrors; about 4x the network's time. --no-tta: one pass, as before")


def _ensemble_help(model: str, command: str) -> str:
  """--workdir's help: one model, or several (an ensemble) and how they pair with --checkpoint."""
  out = (" An ensemble's scores go to --out DIR (needed with several models)."
         if command == "evaluate" else "")
  return (f"training workdir of {model}; repeat it for an ensemble. Pairing with "
          "--checkpoint: one --workdir and N --checkpoint = that workdir at each checkpoint; N "
          "--workdir and one --checkpoint (or none: latest) = each at it; N and N = paired in "
          "order; other counts are an error. Each model segments at its own config's spacing and "
          "slice size, and must segment the modality; their probabilities are averaged (after "
          "TTA), thresholded once at 0.5 and nested by the first model's eval.nesting." + out)


def _build_parser() -> argparse.ArgumentParser:
  segments = families.with_capability(segments=True)
  translates = families.with_capability(translates=True)
  parser = _Parser(prog="uagan-jax", usage="%(prog)s [-h] [--version] COMMAND ...",
                   epilog=_top_epilog(), formatter_class=_HelpFormatter)
  parser.add_argument("--version", action=_VersionAction)
  # Listed by _command_list (at the end of the description, and when no command is given).
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS,
                                   prog=parser.prog, parser_class=_Parser)

  def add(name, help, description, **kwargs):  # pylint: disable=redefined-builtin
    return commands.add_parser(name, help=help, formatter_class=_HelpFormatter,
                               description=_wrap(description, indent=""), **kwargs)

  synth = add("synth", "write synthetic BraTS-2021-layout phantom cases (a first run without data)",
              "Writes seeded synthetic phantom cases (four modalities and a tumour label map per "
              "case) in the BraTS 2021 layout: OUT/SynthBraTS_NNNNN/SynthBraTS_NNNNN_{t1,t1ce,t2,"
              "flair,seg}.nii.gz. The same arguments write byte-identical files.")
  synth.add_argument("--out", required=True, type=pathlib.Path, metavar="DIR",
                     help="output folder (missing, empty or a previous synth output)")
  synth.add_argument("--cases", type=int, default=24, metavar="N", help="number of cases")
  synth.add_argument("--seed", type=int, default=0, help="random seed")
  synth.add_argument("--shape", type=int, nargs=3, default=_SYNTH_SHAPE, metavar=("X", "Y", "Z"),
                     help=f"volume shape in voxels (default: {' '.join(map(str, _SYNTH_SHAPE))})")
  synth.add_argument("--spacing", type=float, nargs="+", default=[_SYNTH_SPACING], metavar="MM",
                     help="voxel size in mm written in the headers, one number or X Y Z; the "
                          "arrays are the same at any spacing. At the default the phantom brain "
                          "has a real head's size, and the :demo recipes train at it (default: "
                          f"{_SYNTH_SPACING:g})")
  # A scanner shift of the images (anatomy and labels unchanged): a test set unlike the phantoms
  # a model trained on. The defaults write today's files.
  synth.add_argument("--contrast-jitter", type=float, default=0.0, metavar="J",
                     help="also multiply each tissue's mean per case and modality by "
                          "1 + U(-J, J), J < 1 (default 0: none)")
  synth.add_argument("--noise", type=float, default=1.0, metavar="F",
                     help="multiply the noise level by F (default 1)")
  synth.add_argument("--bias", type=float, default=1.0, metavar="F",
                     help="multiply the bias field's deviation from 1 by F (default 1)")

  prepare = add(
      "prepare", "read a data folder's NIfTI once into a cache that training streams from",
      "Reads every case of a data folder (any known layout) once and writes it, reoriented and "
      "cropped to the brain, as per-case arrays that training reads slice by slice (memory does "
      "not grow with the data set). Cases already prepared and unchanged are kept; a changed "
      "NIfTI is prepared again; an interrupted run resumes. 'uagan-jax train' does this itself "
      "into its default cache ($UAGAN_JAX_CACHE, else ~/.cache/uagan_jax) unless --cache names "
      "the folder.")
  prepare.add_argument("--data", required=True, type=pathlib.Path, metavar="DIR",
                       help="data folder: BraTS 2018-2021, BraTS 2023, UPENN-GBM or MSD Task01")
  prepare.add_argument("--out", default=None, type=pathlib.Path, metavar="CACHE",
                       help="the cache folder (default: the one 'train --data DIR' uses)")
  prepare.add_argument("--workers", type=int, default=0, metavar="N",
                       help="processes reading cases in parallel (default: 0 = one per core)")
  prepare.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                       help="resample cases of another voxel size to this one (one number or X Y "
                            "Z, mm), as 'train' does to the recipe's data.spacing (1 mm in the "
                            "full recipes, 2 in the :demo ones); default: keep each case's own, "
                            "and 'train' prepares again the cases it needs at another spacing")

  train = add("train", "train a model from a recipe; resumes from --workdir's checkpoints",
              "Trains the model of a recipe (a configs/*.py file, listed below) on a data folder, "
              "writes checkpoints, logs and figures to --workdir (resuming from its newest "
              "checkpoint), then evaluates the held-out test cases.",
              usage="%(prog)s [-h] --config FILE[:VARIANT] --data DIR --workdir DIR\n"
                    "                       [--no-eval] [--cache CACHE] [--distributed]\n"
                    "                       [--coordinator HOST:PORT --num-processes N "
                    "--process-id I]\n"
                    "                       [--config.KEY=VALUE ...]",
              epilog=_train_epilog())
  train.add_argument("--config", required=True, metavar="FILE[:VARIANT]",
                     help="recipe file, optionally with :VARIANT (e.g. configs/segan.py:demo); "
                          "the recipes and their variants are listed below")
  train.add_argument("--data", required=True, type=pathlib.Path, metavar="DIR",
                     help="data folder: BraTS 2018-2021, BraTS 2023, UPENN-GBM or MSD Task01")
  train.add_argument("--workdir", required=True, type=pathlib.Path, metavar="DIR",
                     help="output folder; a previous run's folder resumes it")
  train.add_argument("--no-eval", action="store_true",
                     help="skip the held-out evaluation after training")
  train.add_argument("--cache", default=None, type=pathlib.Path, metavar="CACHE",
                     help="the prepared-data cache to read (and build or refresh); default: "
                          "$UAGAN_JAX_CACHE/<data folder>-<hash>, else under ~/.cache/uagan_jax")
  train.add_argument("--distributed", action="store_true",
                     help="one of several processes of one run (jax.distributed): the processes "
                          "are detected from SLURM, Open MPI or a TPU VM, or given by the three "
                          "options below; process 0 writes the files, all share --workdir")
  train.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="process 0's host and a free port (implies --distributed)")
  train.add_argument("--num-processes", default=None, type=int, metavar="N",
                     help="how many processes the run has (implies --distributed)")
  train.add_argument("--process-id", default=None, type=int, metavar="I",
                     help="this process's index, 0..N-1 (implies --distributed)")
  train.add_argument("--distributed-timeout", default=300, type=int, metavar="SECONDS",
                     help="how long the processes wait for each other to join (default: "
                          "%(default)s)")

  evaluate = add(
      "evaluate", "score a trained model on a held-out split or an external test set "
                  "(Dice, HD95, PSNR, ...)",
      "Scores a training workdir's checkpoint on a split of its data, or on every case of "
      "another data folder (an external test set): per case, region (WT, TC, "
      f"ET) and modality Dice, HD95, ... for the models that segment ({_either(segments)}); per "
      f"modality pair PSNR, SSIM and MAE for the models that translate ({_either(translates)}). "
      "Writes WORKDIR/eval_SPLIT/ (eval_SPLIT_best/ with --checkpoint best, eval_SPLIT_stepN/ "
      "with --checkpoint N, eval_SPLIT_ensemble/ for an ensemble), or "
      "WORKDIR/eval_external_FOLDER/ for an external test set (metrics.csv, summary.json, PNG "
      "panels); with test-time augmentation the name ends in _tta (eval_test_tta/), so a run "
      "with and one without never overwrite each other; with --out DIR (required with --model "
      "MODEL.zip, a file from 'uagan-jax export', and with an ensemble) into DIR in place of the "
      "workdir.")
  _add_model_source(evaluate, ensembles=True,
                    workdir_help=_ensemble_help("a model (holds config.json, splits.json, "
                                                "checkpoints/)", "evaluate"))
  evaluate.add_argument("--data", required=True, type=pathlib.Path, metavar="DIR",
                        help="the data folder the model was trained on (its --split is "
                             "scored), or any other folder of cases: an external test set, "
                             "every case scored (refused if it holds a case the run trained "
                             "or validated on)")
  evaluate.add_argument("--split", default=None, choices=("train", "val", "test", "all"),
                        help="which cases to score: a split of the run's data (its data folder "
                             "moved or copied too), or all: every case of --data as an external "
                             "test set (default: the run's config eval.split, normally test, "
                             "for the run's data folder; all for any other folder)")
  evaluate.add_argument("--checkpoint", default=None, metavar="latest|best|STEP",
                        action="append", help=CHECKPOINT_OR_MODEL_HELP)
  evaluate.add_argument("--tta", default=TTA_DEFAULT, action=argparse.BooleanOptionalAction,
                        help=TTA_HELP + "; with TTA the folder's name ends in _tta "
                             "(eval_test_tta/, ...) and summary.json says tta: true")
  evaluate.add_argument("--out", default=None, type=pathlib.Path, metavar="DIR",
                        help="the folder that receives eval_SPLIT.../ and figures/ in place of "
                             "the workdir (default: --workdir; required with --model and with "
                             "an ensemble)")
  evaluate.add_argument("--no-postprocessing", action="store_true",
                        help=NO_POSTPROCESSING_HELP)
  evaluate.add_argument("--cross-validation", action="store_true",
                        help="the --workdir are the K folds of one cross-validation (trained "
                             "with --config.data.folds=K --config.data.fold=k, k = 0..K-1, one "
                             "seed): each fold's model scores its own val cases (with its own "
                             "postprocessing.json), and all the rows go to one metrics.csv "
                             "(with a fold column) and summary.json in --out DIR/eval_cv/ "
                             "(eval_cv_tta/ with TTA; each fold's own under fold<k>/); one "
                             "--checkpoint at most, for every fold; no --split")
  evaluate.add_argument("--timing", action="store_true",
                        help="end with one line of where the wall time went: import, load "
                             "model, read, segment, compile, tta, score, figures, write "
                             "(seconds)")

  translate = add(
      "translate", f"translate a NIfTI volume into another MRI modality ({', '.join(translates)} "
                   "models)",
      "Translates one image (or a one-case folder's image of --source) into the --target "
      "modality with the newest checkpoint of a model that translates "
      f"({_either(translates)}); writes float32 on the input's grid and header.")
  _add_model_source(translate, workdir_help=f"training workdir of a {_either(translates)} model")
  translate.add_argument("--input", required=True, type=pathlib.Path, metavar="PATH",
                         help="a .nii/.nii.gz image, or a case folder holding one case")
  translate.add_argument("--source", required=True, metavar="MODALITY",
                         help="the input's modality: t1, t1ce, t2 or flair")
  translate.add_argument("--target", required=True, metavar="MODALITY",
                         help="the modality to translate into: t1, t1ce, t2 or flair")
  translate.add_argument("--output", required=True, type=pathlib.Path, metavar="FILE",
                         help="the .nii.gz (or .nii) to write, on the input's grid and header")

  predict = add(
      "predict", f"segment tumours in NIfTI volumes into label maps ({', '.join(segments)} "
                 "models)",
      "Segments one image, one case folder or a data folder of cases with the newest "
      f"checkpoint of a model that segments ({_either(segments)}); writes uint8 label maps "
      "with the input's shape, affine, qform/sform codes and header.")
  _add_model_source(predict, ensembles=True,
                    workdir_help=_ensemble_help(f"a {_either(segments)} model", "predict"))
  predict.add_argument("--input", required=True, type=pathlib.Path, metavar="PATH",
                       help="a .nii/.nii.gz image, a case folder, or a data folder of cases")
  predict.add_argument("--modality", required=True,
                       help="the modality to segment: t1, t1ce, t2 or flair")
  predict.add_argument("--output", required=True, type=pathlib.Path, metavar="PATH",
                       help="the .nii.gz (or .nii) to write; for a data folder, the folder "
                            "that receives <case_id>.nii.gz per case")
  predict.add_argument("--labels", default="brats", choices=("brats", "brats2023", "msd"),
                       help="label values: brats 1 NCR, 2 ED, 4 ET; brats2023 1, 2, 3; msd "
                            "(Task01) 1 ED, 2 NCR, 3 ET (default: %(default)s)")
  predict.add_argument("--checkpoint", default=None, metavar="latest|best|STEP",
                       action="append", help=CHECKPOINT_OR_MODEL_HELP)
  predict.add_argument("--tta", default=TTA_DEFAULT, action=argparse.BooleanOptionalAction,
                       help=TTA_HELP)
  predict.add_argument("--save-probabilities", action="store_true",
                       help="also write, beside each label file, the probabilities that were "
                            "thresholded (after TTA and the ensemble's mean, before nesting): "
                            "<output stem>_probabilities.nii.gz, float32 X x Y x Z x 3 with "
                            "volumes WT, TC, ET, on the input's grid and affine")
  predict.add_argument("--batch-size", type=int, default=None, metavar="N",
                       help="slices per forward pass (default: the config's eval.batch_size)")
  predict.add_argument("--no-postprocessing", action="store_true",
                       help=NO_POSTPROCESSING_HELP)
  predict.add_argument("--timing", action="store_true",
                       help="end with one line of where the wall time went: the command line, "
                            "import, load model, read, compile, segment, tta (the mirrored "
                            "passes), write (seconds)")
  export = add(
      "export", "write a trained model as one file to hand on: config, inference networks, "
                "model card (read by --model)",
      "Writes one checkpoint of a training workdir as one zip file that predict, evaluate and "
      "translate read with --model: the run's config, the networks that run at inference only "
      "(the segmentation and/or translation network; no optimizer states, critics or "
      "discriminators) with a SHA-256 per array, the workdir's splits.json and "
      "postprocessing.json where present, and a model card (model_card.json, MODEL_CARD.md: "
      "family, modalities, spacing, slice size, training data, steps, validation and test "
      "metrics, version, commands). Reading it verifies every member; the format is in "
      "docs/MODEL_FILE.md. The file is written under a temporary name and renamed.")
  export.add_argument("--workdir", required=True, type=pathlib.Path, metavar="DIR",
                      help="the training workdir to export")
  export.add_argument("--checkpoint", default="latest", metavar="latest|best|STEP",
                      help=CHECKPOINT_HELP)
  export.add_argument("--output", required=True, type=pathlib.Path, metavar="MODEL.zip",
                      help="the model file to write; its folder is created")
  export.add_argument("--force", action="store_true",
                      help="replace an existing --output (without it, an existing file is "
                           "refused)")
  postprocess = add(
      "postprocess", "choose the post-processing (small components removed, small enhancing "
                     "tumour relabelled) on the validation cases",
      "Segments every case of the workdir's validation split (splits.json val; never the test "
      "split) once from each modality the model trained on, then chooses per modality and "
      "region the connected-component size (mm^3) below which components are removed, "
      "and the enhancing-tumour volume below which ET is relabelled as tumour core, from a small "
      "grid (0 = off), maximising the mean lesion-wise Dice (BraTS 2023+). Writes "
      "WORKDIR/postprocessing.json, which predict and evaluate then apply "
      "(--no-postprocessing: not).")
  postprocess.add_argument("--workdir", required=True, type=pathlib.Path, metavar="DIR",
                           help=f"training workdir of a {_either(segments)} model with a val "
                                "split (data.val_fraction > 0)")
  postprocess.add_argument("--data", required=True, type=pathlib.Path, metavar="DIR",
                           help="the data folder the model was trained on (its val cases are "
                                "read from it)")
  postprocess.add_argument("--checkpoint", default="latest", metavar="latest|best|STEP",
                           help=CHECKPOINT_HELP)
  postprocess.add_argument("--batch-size", type=int, default=None, metavar="N",
                           help="slices per forward pass (default: the config's "
                                "eval.batch_size)")
  postprocess.add_argument("--tta", default=TTA_DEFAULT, action=argparse.BooleanOptionalAction,
                           help="segment the val cases with test-time augmentation, as predict "
                                "and evaluate do by default (--no-tta: one pass, for a model "
                                "that will be used with --no-tta); recorded in the file")
  postprocess.add_argument("--pooled", action="store_true",
                           help="one rule for every modality, chosen on the val cases segmented "
                                "from all of them together, instead of a rule per modality")
  study = add(
      "study", "train and score every arm x seed of a study file, then compare the arms "
               "(intervals, p-values, table, figure)",
      "Reads a study file (a Python file like the recipes: its get_config() names the arms, "
      "each a recipe with overrides, the seeds, the data and the external test sets, and the "
      "comparisons, arm A against arm B; the studies/ folder of the source checkout has "
      "examples), trains every arm x seed into OUT/runs/ARM/seedK (a run already finished is "
      "only scored again; a failed run is recorded and the others go on), scores each like "
      "'uagan-jax evaluate' (the held-out test split and every external folder), and writes "
      "OUT/study.json, OUT/study.md and OUT/study.png: per arm, region and modality the mean "
      "and standard deviation over seeds and a 95% bootstrap interval over cases and seeds; "
      "per comparison the paired per-case difference, its interval and a Wilcoxon signed-rank "
      "p-value. Exit code 0 all runs scored, 1 some failed, 2 a bad study file, 143/130 "
      "stopped by SIGTERM/SIGINT (run the same command to resume).",
      usage="%(prog)s [-h] STUDY.py[:VARIANT] --out DIR [--data DIR] [--external DIR]\n"
            "                       [--config.KEY=VALUE ...]")
  study.add_argument("study", metavar="STUDY.py[:VARIANT]",
                     help="the study file, optionally with :VARIANT passed to its get_config "
                          "(e.g. studies/results_table.py:smoke) (required)")
  study.add_argument("--out", required=True, type=pathlib.Path, metavar="DIR",
                     help="the study's folder: runs/, study.json, study.md, study.png; the "
                          "same command again resumes it")
  study.add_argument("--data", default=None, type=pathlib.Path, metavar="DIR",
                     help="the training data folder, in place of the study file's data "
                          "(default: the study's)")
  study.add_argument("--external", action="append", default=[], type=pathlib.Path,
                     metavar="DIR", help="one more external test set, scored whole; may be "
                                         "repeated (default: the study's only)")
  parser.description = _top_description() + "\n\n" + _command_list(parser)
  return parser


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # pylint: disable=protected-access
  return next(a for a in parser._actions  # pylint: disable=protected-access
              if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access


def _command_list(parser: argparse.ArgumentParser) -> str:
  return "commands:\n" + _table([(a.dest, a.help or "")
                                 for a in _subcommands(parser)._choices_actions])  # pylint: disable=protected-access


# Each command imports what it runs here, not at the top: `--help` must answer without JAX.
# The commands that run JAX turn its persistent compilation cache on first
# (`compilation_cache.enable`), so that a later run loads its programs instead of compiling them.


def _enable_compilation_cache() -> None:
  from uagan_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.enable()


def _prepare(args) -> None:
  from uagan_jax.data import cache  # pylint: disable=g-import-not-at-top
  if args.workers < 0:
    raise UserError(f"--workers {args.workers}: must be 0 (one per core) or more")
  spacing = args.spacing
  if spacing is not None:
    if len(spacing) not in (1, 3) or not all(s > 0 for s in spacing):
      raise UserError(f"--spacing {' '.join(map(str, spacing))}: give one or three positive "
                      "numbers (mm)")
    spacing = tuple(spacing) * 3 if len(spacing) == 1 else tuple(spacing)
  started = time.time()
  out = cache.prepare(args.data, args.out or cache.default_location(args.data),
                      workers=args.workers, spacing=spacing, log=_log)
  _log(f"cache ready in {out} ({time.time() - started:.0f} s); train with --cache {out}")


def _synth(args) -> None:
  from uagan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  started = time.time()

  def progress(done, total, *_):
    _log(f"wrote {done}/{total} cases, ETA {(time.time() - started) / done * (total - done):.0f} s")

  shift = synthetic.ScannerShift(contrast_jitter=args.contrast_jitter, noise=args.noise,
                                 bias=args.bias)
  folders = synthetic.write_dataset(args.out, cases=args.cases, seed=args.seed,
                                    shape=tuple(args.shape),
                                    spacing=args.spacing[0] if len(args.spacing) == 1
                                    else tuple(args.spacing), progress=progress, shift=shift)
  _log(f"{len(folders)} synthetic cases in {args.out}")


def _train(args, overrides) -> int:
  """Trains; returns the exit code: 0, or 128 + the signal (143 SIGTERM, 130 SIGINT) when a
  signal stopped the run after its checkpoint, so that a scheduler requeues it."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import config as config_lib
  from uagan_jax import train
  from uagan_jax.train_utils import Interrupted, TrainingDiverged
  # pylint: enable=g-import-not-at-top
  config = config_lib.load_config(args.config, overrides)
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if args.distributed or any(value is not None for value in explicit):
    # After the config is read (a bad one stops this process before it joins) and before any
    # JAX computation, as jax.distributed requires.
    from uagan_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id, timeout_s=args.distributed_timeout)
  _enable_compilation_cache()
  try:
    train.train_and_evaluate(config, workdir=args.workdir, data_dir=args.data,
                             cache_dir=args.cache, log=_log, evaluate_after=not args.no_eval,
                             recipe=args.config, overrides=overrides)
  except TrainingDiverged as e:
    raise UserError(f"training diverged at {e}") from None
  except Interrupted as e:
    print(f"{e}; exit code {e.exit_code}: run the same command to resume", file=sys.stderr,
          flush=True)
    return e.exit_code
  return 0


def _evaluate(args, main_started: float) -> None:
  """``main_started``: `time.perf_counter` when `main` began (the command line's parsing)."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import timing
  stopwatch = timing.Stopwatch()
  stopwatch.add("command line", time.perf_counter() - main_started)
  with stopwatch.phase("import"):
    from uagan_jax import config as config_lib
    from uagan_jax import evaluate, inference, model_file
    _enable_compilation_cache()
  # pylint: enable=g-import-not-at-top
  _refuse_checkpoint_with_model(args)
  common = dict(data_dir=args.data, split=args.split, out=args.out, tta=args.tta,
                postprocessing=not args.no_postprocessing, stopwatch=stopwatch, log=_log)
  if args.cross_validation:
    _refuse_with_cross_validation(args)
    evaluate.evaluate_cross_validation(
        workdirs=args.workdir, checkpoint=(args.checkpoint or ["latest"])[0], data_dir=args.data,
        out=args.out, tta=args.tta, postprocessing=not args.no_postprocessing,
        stopwatch=stopwatch, log=_log)
  elif args.model is None:
    models = inference.pair_models(args.workdir, args.checkpoint)
    (workdir, checkpoint), ensemble = models[0], models[1:]
    config = config_lib.from_json_file(workdir / "config.json")
    evaluate.evaluate_split(config, workdir=workdir, checkpoint=checkpoint, ensemble=ensemble,
                            **common)
  else:
    if args.out is None:
      raise UserError(f"--model {args.model}: give --out DIR too, the folder that receives the "
                      "evaluation (a model file has no workdir to write into)")
    with stopwatch.phase("load model"):
      model = model_file.read(_model_or_workdir(args))
    evaluate.evaluate_split(model.config, model=model, **common)
  if args.timing:
    _log(stopwatch.summary())


def _refuse_with_cross_validation(args) -> None:
  """--cross-validation scores the folds' val cases from their workdirs, into --out."""
  if args.model is not None:
    raise UserError(f"--cross-validation --model {args.model}: give the folds' training "
                    "workdirs (--workdir F0 --workdir F1 ...); a model file holds one model")
  if args.split is not None:
    raise UserError(f"--cross-validation --split {args.split}: each fold is scored on its own "
                    "val cases; score the test split with the folds' ensemble (no "
                    "--cross-validation)")
  if args.checkpoint is not None and len(args.checkpoint) > 1:
    raise UserError(f"--cross-validation --checkpoint {' '.join(args.checkpoint)}: give one "
                    "checkpoint (latest, best or a step), for every fold")
  if args.out is None:
    raise UserError("--cross-validation: give --out DIR, the folder that receives eval_cv/ "
                    "(the folds' scores belong to no one workdir)")


def _model_or_workdir(args):
  """Where the model comes from: ``--workdir``, or ``--model`` (a file: one that is missing or
  a folder is refused here, where a path without a file would pass for a workdir)."""
  if args.model is None:
    return args.workdir
  if args.model.is_dir():
    raise UserError(f"{args.model}: a folder; --model takes a model file written by 'uagan-jax "
                    "export' (a training workdir goes to --workdir)")
  if not args.model.exists():
    raise UserError(f"{args.model}: no such file")
  return args.model


def _refuse_checkpoint_with_model(args) -> None:
  if args.model is not None and args.checkpoint is not None:
    given = (" ".join(map(str, args.checkpoint)) if isinstance(args.checkpoint, list)
             else args.checkpoint)
    raise UserError(f"--checkpoint {given}: {args.model} holds one checkpoint, the "
                    "one it was exported from; --checkpoint is for --workdir")


def _export(args, argv: list[str]) -> None:
  """``argv``: the command line, for the model card."""
  import shlex  # pylint: disable=g-import-not-at-top
  from uagan_jax import model_file  # pylint: disable=g-import-not-at-top
  started = time.time()
  result = model_file.export(args.workdir, output=args.output, checkpoint=args.checkpoint,
                             force=args.force, command=shlex.join(["uagan-jax", *argv]),
                             log=lambda message: print(f"warning: {message}", file=sys.stderr,
                                                       flush=True))
  _log(f"wrote {result.output} ({result.size / 1e6:.2f} MB: {result.arrays} arrays, "
       f"{result.values:,} values of the {' and '.join(result.roles)} network"
       f"{'s' if len(result.roles) > 1 else ''}; step {result.step}, {result.checkpoint} "
       f"checkpoint) in {time.time() - started:.1f} s")


def _postprocess(args) -> None:
  from uagan_jax import postprocess  # pylint: disable=g-import-not-at-top
  _enable_compilation_cache()
  started = time.time()
  postprocess.choose(workdir=args.workdir, data_dir=args.data, checkpoint=args.checkpoint,
                     batch_size=args.batch_size, pooled=args.pooled, tta=args.tta, log=_log)
  _log(f"done in {time.time() - started:.0f} s")


def _study(args, overrides) -> int:
  """Runs a study; returns its exit code (`study.run_study`). ``overrides``: the
  ``--config.KEY=VALUE`` items after the options, for every arm."""
  from uagan_jax import study  # pylint: disable=g-import-not-at-top
  loaded = study.load_study(args.study, overrides=overrides, data=args.data,
                            external=args.external)
  _enable_compilation_cache()
  return study.run_study(loaded, out=args.out, log=_log)


def _translate(args) -> None:
  from uagan_jax import translate  # pylint: disable=g-import-not-at-top
  _enable_compilation_cache()
  started = time.time()
  result = translate.translate_file(args.input, args.output, source=args.source,
                                    target=args.target, workdir=_model_or_workdir(args),
                                    log=_log)
  _log(f"wrote {result.output} ({result.target} from {result.source}, {result.slices} slices) "
       f"in {time.time() - started:.1f} s")


def _predict(args, main_started: float) -> None:
  """``main_started``: `time.perf_counter` when `main` began (the command line's parsing)."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import timing
  _refuse_checkpoint_with_model(args)
  source = _model_or_workdir(args)
  stopwatch = timing.Stopwatch()
  stopwatch.add("command line", time.perf_counter() - main_started)
  with stopwatch.phase("import"):
    from uagan_jax import predict
    _enable_compilation_cache()
  # pylint: enable=g-import-not-at-top
  started = time.time()
  results = predict.predict(args.input, args.output, modality=args.modality, labels=args.labels,
                            workdir=source, batch_size=args.batch_size,
                            checkpoint=args.checkpoint or "latest",
                            postprocessing=not args.no_postprocessing, log=_log,
                            stopwatch=stopwatch, tta=args.tta,
                            save_probabilities=args.save_probabilities)
  if len(results) == 1:
    _log(f"wrote {results[0].output} ({args.labels} labels: {results[0].summary()}) "
         f"in {time.time() - started:.1f} s")
  else:
    _log(f"wrote {len(results)} segmentations ({args.labels} labels) to {args.output} "
         f"in {time.time() - started:.1f} s")
  if args.timing:
    _log(stopwatch.summary())


# Commands after which the program (not an in-process call) leaves without Python's teardown:
# JAX's exit handler clears its backends and caches, 0.3-0.5 s of CPU (seconds of wall time on a
# loaded machine) that a finished read-only command does not need. Their outputs are written
# and closed (atomically renamed) and the compilation cache written before they return.
_EXIT_WITHOUT_TEARDOWN = ("predict", "translate")


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns the process exit code.

  ``--help`` and ``--version`` print to stdout and raise argparse's ``SystemExit(0)``. Without a
  command, the usage and the commands go to stderr, then one ``error: ...`` line; returns 2.
  Exit codes: 0 done; 2 bad input, disk full or read-only, diverged, workdir in use (one
  ``error:`` line); 143 (SIGTERM) or 130 (SIGINT, Ctrl-C) stopped by a signal, checkpoint saved:
  run the same command to resume.

  Called without ``argv`` (as the program), a successful predict or translate ends the process
  itself (`os._exit`, after flushing stdout and stderr) instead of returning.
  """
  started = time.perf_counter()
  program = argv is None
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = _build_parser()
  try:
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
      print(parser.format_usage() + "\n" + _command_list(parser) + "\n", file=sys.stderr)
      raise UserError(f"{parser.prog}: no command given; choose one of "
                      f"{', '.join(_subcommands(parser).choices)} (see '{parser.prog} --help')")
    if args.command == "train":
      return _train(args, rest)
    elif args.command == "study":
      return _study(args, rest)
    elif rest:
      raise UserError(f"unexpected argument {rest[0]!r}")
    elif args.command == "prepare":
      _prepare(args)
    elif args.command == "synth":
      _synth(args)
    elif args.command == "evaluate":
      _evaluate(args, started)
    elif args.command == "translate":
      _translate(args)
    elif args.command == "predict":
      _predict(args, started)
    elif args.command == "export":
      _export(args, argv)
    elif args.command == "postprocess":
      _postprocess(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  if program and args.command in _EXIT_WITHOUT_TEARDOWN:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
