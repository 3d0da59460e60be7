"""The ``uagan-jax`` command line: a thin entry point over the library.

  uagan-jax synth    --out DIR --cases N --seed S [--shape X Y Z]
  uagan-jax train    --config configs/segan.py[:variant] --data DIR --workdir W [--config.a.b=v ...]
  uagan-jax evaluate --workdir W --data DIR [--split test] [--checkpoint latest|best]
  uagan-jax translate --workdir W --input FILE --source t1 --target flair --output OUT.nii.gz
  uagan-jax predict  --workdir W --input FILE|CASE|DATA --modality flair --output SEG.nii.gz|DIR

Bad input (a missing or corrupt file, an unknown config key, ...) ends with one line
``error: <file or key>: <problem>`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from uagan_jax.errors import UserError


def _log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class _Parser(argparse.ArgumentParser):
  """argparse that reports a usage problem as a UserError (one line, exit 2)."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message}")


def _build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="uagan-jax", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  synth = commands.add_parser("synth", help="write BraTS-2021-layout synthetic phantom cases")
  synth.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
  synth.add_argument("--cases", type=int, default=24)
  synth.add_argument("--seed", type=int, default=0)
  synth.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), metavar=("X", "Y", "Z"))

  train = commands.add_parser("train", help="train a model; resumes from --workdir's checkpoints")
  train.add_argument("--config", required=True,
                     help="config file, optionally with :variant (e.g. configs/segan.py:demo)")
  train.add_argument("--data", required=True, type=pathlib.Path,
                     help="data folder: BraTS 2018-2021, BraTS 2023, UPENN-GBM or MSD Task01")
  train.add_argument("--workdir", required=True, type=pathlib.Path)
  train.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")

  evaluate = commands.add_parser(
      "evaluate", help="BraTS metrics (Dice, HD95, ...) per case, region and modality on a split")
  evaluate.add_argument("--workdir", required=True, type=pathlib.Path)
  evaluate.add_argument("--data", required=True, type=pathlib.Path)
  evaluate.add_argument("--split", default=None, choices=("train", "val", "test"))
  evaluate.add_argument("--checkpoint", default="latest", choices=("latest", "best"),
                        help="the newest checkpoint, or the best by validation Dice "
                             "(train.validate_every)")

  translate = commands.add_parser(
      "translate", help="translate a NIfTI volume into another modality (stargan, uagan)")
  translate.add_argument("--workdir", required=True, type=pathlib.Path,
                         help="training workdir of a stargan or uagan model")
  translate.add_argument("--input", required=True, type=pathlib.Path,
                         help="a .nii/.nii.gz image, or a case folder holding one case")
  translate.add_argument("--source", required=True,
                         help="the input's modality: t1, t1ce, t2 or flair")
  translate.add_argument("--target", required=True, help="the modality to translate into")
  translate.add_argument("--output", required=True, type=pathlib.Path,
                         help="the .nii.gz (or .nii) to write, on the input's grid and header")

  predict = commands.add_parser(
      "predict", help="segment NIfTI volumes into tumour label maps (segan, unet, uagan)",
      description="Segments one image, one case folder or a data folder of cases; writes uint8 "
                  "label maps with the input's shape, affine, qform/sform codes and header.")
  predict.add_argument("--workdir", required=True, type=pathlib.Path,
                       help="training workdir of a segan, unet or uagan model")
  predict.add_argument("--input", required=True, type=pathlib.Path,
                       help="a .nii/.nii.gz image, a case folder, or a data folder of cases")
  predict.add_argument("--modality", required=True,
                       help="the modality to segment: t1, t1ce, t2 or flair")
  predict.add_argument("--output", required=True, type=pathlib.Path,
                       help="the .nii.gz (or .nii) to write; for a data folder, the folder "
                            "that receives <case_id>.nii.gz per case")
  predict.add_argument("--labels", default="brats", choices=("brats", "brats2023", "msd"),
                       help="label values: brats 1 NCR, 2 ED, 4 ET (default); brats2023 1, 2, "
                            "3; msd (Task01) 1 ED, 2 NCR, 3 ET")
  predict.add_argument("--batch-size", type=int, default=None, metavar="N",
                       help="slices per forward pass (default: the config's eval.batch_size)")
  return parser


def _synth(args) -> None:
  from uagan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  started = time.time()

  def progress(done, total, *_):
    _log(f"wrote {done}/{total} cases, ETA {(time.time() - started) / done * (total - done):.0f} s")

  folders = synthetic.write_dataset(args.out, cases=args.cases, seed=args.seed,
                                    shape=tuple(args.shape), progress=progress)
  _log(f"{len(folders)} synthetic cases in {args.out}")


def _train(args, overrides) -> None:
  # pylint: disable=g-import-not-at-top
  from uagan_jax import config as config_lib
  from uagan_jax import train
  # pylint: enable=g-import-not-at-top
  config = config_lib.load_config(args.config, overrides)
  try:
    train.train_and_evaluate(config, workdir=args.workdir, data_dir=args.data, log=_log,
                             evaluate_after=not args.no_eval)
  except train.TrainingDiverged as e:
    raise UserError(f"training diverged at {e}") from None


def _evaluate(args) -> None:
  # pylint: disable=g-import-not-at-top
  from uagan_jax import config as config_lib
  from uagan_jax import evaluate
  # pylint: enable=g-import-not-at-top
  config = config_lib.from_json_file(args.workdir / "config.json")
  evaluate.evaluate_split(config, workdir=args.workdir, data_dir=args.data, split=args.split,
                          checkpoint=args.checkpoint, log=_log)


def _translate(args) -> None:
  from uagan_jax import translate  # pylint: disable=g-import-not-at-top
  started = time.time()
  result = translate.translate_file(args.input, args.output, source=args.source,
                                    target=args.target, workdir=args.workdir, log=_log)
  _log(f"wrote {result.output} ({result.target} from {result.source}, {result.slices} slices) "
       f"in {time.time() - started:.1f} s")


def _predict(args) -> None:
  from uagan_jax import predict  # pylint: disable=g-import-not-at-top
  started = time.time()
  results = predict.predict(args.input, args.output, modality=args.modality, labels=args.labels,
                            workdir=args.workdir, batch_size=args.batch_size, log=_log)
  if len(results) == 1:
    _log(f"wrote {results[0].output} ({args.labels} labels: {results[0].summary()}) "
         f"in {time.time() - started:.1f} s")
  else:
    _log(f"wrote {len(results)} segmentations ({args.labels} labels) to {args.output} "
         f"in {time.time() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns the process exit code."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = _build_parser()
  try:
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
      _train(args, rest)
    elif rest:
      raise UserError(f"unexpected argument {rest[0]!r}")
    elif args.command == "synth":
      _synth(args)
    elif args.command == "evaluate":
      _evaluate(args)
    elif args.command == "translate":
      _translate(args)
    elif args.command == "predict":
      _predict(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
