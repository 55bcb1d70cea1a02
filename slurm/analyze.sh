#!/usr/bin/env bash
# Analyse a trained SAE on a Slurm cluster: one torchrun per node, one analysis process per GPU;
# each rank reads its share of the shards and rank 0 writes the reduced results.
# Submit from the repository root (or with patchsae installed in $PATCHSAE_PYTHON's env):
#
#   sbatch slurm/analyze.sh runs/vit_b16 --data '/data/imagenet/val-{000000..000063}.tar'
#   sbatch --nodes=4 slurm/analyze.sh runs/vit_b16 --data /data/imagenet/train --out runs/vit_b16/analysis-train
#
# Arguments after the run folder are `patchsae analyze`'s (see `patchsae analyze --help`).
# Time limits: on the warning (USR1, 120 s before the limit) the job stops its step and requeues
# itself; every rank saved its position and sums at most --save-every batches ago, and the next
# run continues from there (same run folder, --out and --data).
#
#SBATCH --job-name=patchsae-analyze
##SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

PY=${PATCHSAE_PYTHON:-python}
RDZV_PORT=${RDZV_PORT:-29500}
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: sbatch slurm/analyze.sh RUN_DIR --data URLS [patchsae analyze options]" >&2
  exit 2
fi

GPUS=${SLURM_GPUS_PER_NODE:-0}
GPUS=${GPUS##*:}  # "a100:4" -> 4
if [[ -z ${NPROC:-} ]]; then
  if [[ $GPUS =~ ^[0-9]+$ && $GPUS -gt 0 ]]; then NPROC=$GPUS; else NPROC=1; fi
fi
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x" \
  "$NPROC process(es), rendezvous at $HEAD:$RDZV_PORT, analysing $1"

requeue() {
  echo "job $SLURM_JOB_ID: USR1, stopping the analysis and requeueing"
  [[ -n ${SRUN_PID:-} ]] && kill -TERM "$SRUN_PID" 2>/dev/null && wait "$SRUN_PID" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' torchrun \
  "$PY" -m torch.distributed.run \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$RDZV_PORT" \
  -m patchsae.launchers.cli analyze "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
