#!/usr/bin/env bash
# Train clara-jax on a Cloud TPU VM slice (v4 / v5e / v5p), every worker in lockstep.
#
#   TPU_NAME=clara-v5e-64 ZONE=us-west4-a ACCELERATOR=v5litepod-64 \
#   CONFIG=configs/pretrain.py:model=mistral_7b WORKDIR=/mnt/gcs/clara/stage1 \
#   EXTRA="--config.init_from=/mnt/gcs/ckpt/mistral --config.mesh.data=4 --config.mesh.fsdp=16" \
#   bash launch/tpu_pod.sh
#
# WORKDIR (and init_from) must be a directory that every worker sees at the same path (a
# gcsfuse mount of a bucket, or NFS/Filestore): each worker writes its checkpoint shards there.
#
# Creates the TPU VM if it does not exist (RUNTIME selects the image), copies this checkout to
# every worker, installs it with the [tpu] extra, runs the train command on all workers at
# once (jax.distributed finds its peers from the TPU metadata) and collects each worker's log
# into ./logs/. Cannot run without gcloud and a TPU quota; see launch/README.md for meshes.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR (e.g. v5litepod-64)}"
: "${CONFIG:?set CONFIG (e.g. configs/pretrain.py:model=mistral_7b)}" "${WORKDIR:?set WORKDIR}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
EXTRA="${EXTRA:-}"
REMOTE_DIR="${REMOTE_DIR:-clara-jax}"

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }

if ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
  echo "creating $TPU_NAME ($ACCELERATOR, $RUNTIME)"
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi

echo "copying the checkout to every worker"
tar czf /tmp/clara-jax.tgz --exclude .venv --exclude workdir --exclude .git .
tpu scp /tmp/clara-jax.tgz "$TPU_NAME":/tmp/clara-jax.tgz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command "mkdir -p $REMOTE_DIR && tar xzf /tmp/clara-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"

echo "training: $CONFIG -> $WORKDIR"
mkdir -p logs
tpu ssh "$TPU_NAME" --worker=all --command \
  "set -o pipefail; cd $REMOTE_DIR && python3 -m clara_jax.train --multihost --config=$CONFIG --workdir=$WORKDIR $EXTRA 2>&1 | tee train.log"

for w in $(seq 0 $(( $(tpu describe "$TPU_NAME" --format='value(networkEndpoints.len())' 2>/dev/null || echo 1) - 1 ))); do
  tpu scp "$TPU_NAME":"$REMOTE_DIR/train.log" "logs/worker-$w.log" --worker="$w" || true
done
echo "logs in ./logs/"
