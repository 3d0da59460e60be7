#!/usr/bin/env bash
# Training on a Cloud TPU VM slice (e.g. v4-32: 4 workers): the same command on every worker, one
# process per worker, each driving its local TPU chips; jax.distributed detects the slice.
#
#   bash launch/tpu_vm.sh setup     # once: copy the checkout to every worker, create .venv there
#   bash launch/tpu_vm.sh train     # start training on all workers (extra args: 'uagan-jax train')
#   bash launch/tpu_vm.sh train --config.train.steps=20000
#
# Resume: run 'train' again (same WORKDIR): every worker restores the newest checkpoint. A
# preempted (spot) slice sends SIGTERM: the workers agree on the stop at the next log step and
# write one checkpoint. WORKDIR must be a folder every worker sees at the same path, e.g. a
# Filestore (NFS) share (a gs:// URL is refused: the logs, the workdir lock (flock) and the JSON
# files go through the file system, and bucket mounts such as gcsfuse have no file locks). DATA
# must be readable from each worker (a copy per worker or a mounted bucket).
# Process 0 (worker 0) writes the logs, metrics, TensorBoard events (WORKDIR/tensorboard/) and
# evaluation; its output is in train.log on worker 0, the others' in train.log on theirs.
set -euo pipefail

# --- edit here -----------------------------------------------------------------------------------
TPU_NAME=${TPU_NAME:-my-tpu}              # gcloud compute tpus tpu-vm create ... name
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-my-project}
CONFIG=${CONFIG:-configs/uagan.py}        # recipe (FILE[:VARIANT])
DATA=${DATA:-/data/BraTS2021}             # data folder on every worker
WORKDIR=${WORKDIR:-/mnt/shared/runs/uagan_tpu}  # on every worker: checkpoints, logs, evaluation
BATCH_SIZE=${BATCH_SIZE:-128}             # global batch: a multiple of the total chip count
REMOTE_DIR=${REMOTE_DIR:-uagan_jax}       # the checkout's folder on each worker
# -------------------------------------------------------------------------------------------------

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all \
    --command="$1"
}

case "${1:-}" in
  setup)
    cd "$(dirname "$0")/.."
    gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --project "$PROJECT" --worker=all \
      . "$TPU_NAME:$REMOTE_DIR"
    on_all_workers "cd $REMOTE_DIR && source launch/_setup.sh && .venv/bin/python -m pip install \
      --quiet 'jax[tpu]==0.10.2'"
    ;;
  train)
    shift
    # TPU: no memory-fraction or determinism flags are needed (XLA:TPU reductions are
    # deterministic and the runtime manages HBM). Quoted args pass through to every worker.
    extra=$(printf ' %q' "$@")
    on_all_workers "cd $REMOTE_DIR && nohup .venv/bin/uagan-jax train --config $CONFIG \
      --data $DATA --workdir $WORKDIR --distributed --config.train.batch_size=$BATCH_SIZE \
      $extra > train.log 2>&1 &"
    echo "started on every worker of $TPU_NAME; follow worker 0 with:"
    echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command='tail -f $REMOTE_DIR/train.log'"
    ;;
  *)
    echo "usage: bash launch/tpu_vm.sh setup|train [--config.KEY=VALUE ...]" >&2
    exit 2
    ;;
esac
