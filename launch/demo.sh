#!/usr/bin/env bash
# The demo: set up .venv, write 80 synthetic BraTS-layout cases, train configs/segan.py:demo on
# the CPU (a few minutes), evaluate the held-out cases and print Dice per region and modality.
#
#   bash launch/demo.sh                       # everything, into runs/demo
#   bash launch/demo.sh --config.train.steps=100   # extra args go to 'uagan-jax train'
#   MODEL=uagan bash launch/demo.sh           # another recipe's :demo (any configs/MODEL.py: unet,
#                                             # stargan, uagan; 'uagan-jax train --help' lists them),
#                                             # into runs/demo_uagan; uagan took 33 min to train
#                                             # and evaluate pinned to one core (stargan 14)
#
# Outputs (WORKDIR, default runs/demo): checkpoints/, config.json, splits.json, metrics.jsonl,
# eval_test/{metrics.csv,summary.json}, figures/*.png, tensorboard/ (tensorboard --logdir
# runs/demo/tensorboard, after pip install tensorboard). Running it again resumes (or, when the run is
# finished, only re-evaluates); delete the workdir to start afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_setup.sh
DATA=${DATA:-data_synth}
MODEL=${MODEL:-segan}
if [ "$MODEL" = segan ]; then default_workdir=runs/demo; else default_workdir=runs/demo_$MODEL; fi
WORKDIR=${WORKDIR:-$default_workdir}
.venv/bin/uagan-jax synth --out "$DATA" --cases 80 --seed 0 --shape 96 96 64
.venv/bin/uagan-jax train --config "configs/$MODEL.py:demo" --data "$DATA" --workdir "$WORKDIR" "$@"
