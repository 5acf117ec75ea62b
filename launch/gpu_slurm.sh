#!/usr/bin/env bash
# Train clara-jax on GPU nodes with Slurm: one process per GPU, jax.distributed over srun.
#
#   sbatch --nodes=1 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_slurm.sh \
#     configs/pretrain.py:model=mistral_7b /shared/runs/stage1 --config.mesh.fsdp=8
#
# Expects this checkout installed in the job's Python environment with the [gpu] extra
# (pip install -e '.[gpu]'). Each task sees one GPU; jax.distributed.initialize() reads the
# Slurm environment (SLURM_PROCID, SLURM_NTASKS, the first node as coordinator).
#SBATCH --job-name=clara-jax
#SBATCH --output=logs/%x-%j-%t.log
set -euo pipefail

CONFIG="${1:?usage: launch/gpu_slurm.sh CONFIG WORKDIR [--config.x=y ...]}"
WORKDIR="${2:?usage: launch/gpu_slurm.sh CONFIG WORKDIR [--config.x=y ...]}"
shift 2

mkdir -p logs
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
srun --kill-on-bad-exit=1 bash -c \
  "CUDA_VISIBLE_DEVICES=\$SLURM_LOCALID python3 -m clara_jax.train --multihost --config=$CONFIG --workdir=$WORKDIR $*"
