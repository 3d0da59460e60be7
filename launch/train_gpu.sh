#!/usr/bin/env bash
# Training on one host with all its GPUs: one process drives every local GPU (data parallel over
# them; no jax.distributed needed on one host).
#
#   bash launch/train_gpu.sh                          # edit the block below first
#   bash launch/train_gpu.sh --config.train.steps=500 # extra args go to 'uagan-jax train'
#   CUDA_VISIBLE_DEVICES=0 bash launch/train_gpu.sh   # one GPU
#
# Resume: run the same command again (same WORKDIR). Ctrl-C or SIGTERM saves a checkpoint first.
# Outputs in WORKDIR: config.json, splits.json, metrics.jsonl, checkpoints/, figures/, eval_test/,
# tensorboard/ (watch it: pip install tensorboard; tensorboard --logdir WORKDIR/tensorboard).
set -euo pipefail
cd "$(dirname "$0")/.."

# --- edit here -----------------------------------------------------------------------------------
CONFIG=${CONFIG:-configs/uagan.py}        # recipe (FILE[:VARIANT])
DATA=${DATA:-/path/to/BraTS2021}          # data folder
WORKDIR=${WORKDIR:-runs/uagan_gpu}        # checkpoints, logs, evaluation
BATCH_SIZE=${BATCH_SIZE:-32}              # global batch: a multiple of the GPU count
# -------------------------------------------------------------------------------------------------

# Deterministic GPU reductions (scatter/atomics replaced): a run and its resumed twin give the
# same numbers, at a few % of speed. Drop it for the last few % once a recipe is settled.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
# JAX preallocates 75% of each GPU by default; 0.9 leaves room for cuDNN workspaces. Lower it if
# another program shares the GPUs (or set XLA_PYTHON_CLIENT_PREALLOCATE=false).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

if [ ! -x .venv/bin/python ]; then
  source launch/_setup.sh
  .venv/bin/python -m pip install --quiet "jax[cuda12]==0.10.2"  # the CUDA build, same jax
fi
exec .venv/bin/uagan-jax train --config "$CONFIG" --data "$DATA" --workdir "$WORKDIR" \
  --config.train.batch_size="$BATCH_SIZE" "$@"
