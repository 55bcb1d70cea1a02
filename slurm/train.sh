#!/usr/bin/env bash
# Train a PatchSAE on a Slurm cluster: one torchrun per node, one trainer process per GPU.
# Submit from the repository root (or with patchsae installed in $PATCHSAE_PYTHON's env):
#
#   sbatch slurm/train.sh configs/vit_b16_imagenet.yaml --set train.lr=1e-3
#   sbatch --nodes=4 --time=2-00:00:00 slurm/train.sh configs/vit_b16_imagenet.yaml
#   CONFIG=configs/demo.yaml PATCHSAE_SET="train.lr=1e-3 train.out_dir=runs/x" sbatch slurm/train.sh
#
# Edit for your cluster (or override on the sbatch command line, which wins over #SBATCH):
#   - the partition: remove one '#' from the '##SBATCH --partition' line and name yours;
#   - GPUs and CPUs per node: --gpus-per-node, --cpus-per-task (one task per node);
#   - DATA_URLS and MLFLOW_TRACKING_URI below (or set them in the environment you submit from).
# Without GPUs (--gpus-per-node=0) it trains on CPU over gloo with $NPROC processes per node.
#
# Time limits: Slurm sends USR1 to this script 120 s before the limit. Every trainer then
# writes a checkpoint at its next log step and exits; the job requeues itself and the next
# run resumes from that checkpoint (same out_dir, same MLflow run). Keep train.log_every
# short enough that a log step plus a checkpoint fits in those 120 s.
#
#SBATCH --job-name=patchsae
##SBATCH --partition=gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

DATA_URLS=${DATA_URLS:-}  # e.g. /data/imagenet/train-{000000..001281}.tar (empty: the config's)
MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-}  # e.g. http://mlflow:5000 (empty: sqlite in out_dir)
PY=${PATCHSAE_PYTHON:-python}
RDZV_PORT=${RDZV_PORT:-29500}

CONFIG=${CONFIG:-configs/vit_b16_imagenet.yaml}
if [[ $# -gt 0 && $1 != -* ]]; then
  CONFIG=$1
  shift
fi
SETS=()
[[ -n $DATA_URLS ]] && SETS+=(--set "data.urls=$DATA_URLS")
read -ra ENV_SETS <<<"${PATCHSAE_SET:-}"
for item in ${ENV_SETS[@]+"${ENV_SETS[@]}"}; do
  SETS+=(--set "$item")
done
SETS+=("$@")  # command-line arguments come last, so they win
[[ -n $MLFLOW_TRACKING_URI ]] && export MLFLOW_TRACKING_URI

# One process per GPU; without GPUs, $NPROC (default 1) CPU processes.
GPUS=${SLURM_GPUS_PER_NODE:-0}
GPUS=${GPUS##*:}  # "a100:4" -> 4
if [[ -z ${NPROC:-} ]]; then
  if [[ $GPUS =~ ^[0-9]+$ && $GPUS -gt 0 ]]; then NPROC=$GPUS; else NPROC=1; fi
fi
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without this, the
# step (torchrun and all its trainers) could be confined to a single CPU.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x" \
  "$NPROC process(es), rendezvous at $HEAD:$RDZV_PORT, config $CONFIG"

# USR1 (the time-limit warning) reaches only this shell. srun passes it on to every process
# of the step, trainers included. A trainer that is still starting up ignores it, so it is
# sent again every $RESEND_S s until the step ends; then the job goes back in the queue.
RESEND_S=10
stop_and_requeue() {
  echo "job $SLURM_JOB_ID: USR1, asking the trainers to checkpoint and stop"
  if [[ -n ${SRUN_PID:-} ]]; then
    local waited=0
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
    while kill -0 "$SRUN_PID" 2>/dev/null; do
      sleep 1
      waited=$((waited + 1))
      if ((waited % RESEND_S == 0)) && kill -USR1 "$SRUN_PID" 2>/dev/null; then
        echo "job $SLURM_JOB_ID: USR1 again"
      fi
    done
    wait "$SRUN_PID" || echo "job $SLURM_JOB_ID: training step exited with status $?"
  fi
  echo "job $SLURM_JOB_ID: requeueing"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap stop_and_requeue USR1

# torchrun's agent dies on USR1 (its default action) and would take the trainers down with
# it before they checkpoint, so the agent ignores USR1; the trainers install their own
# handler, and Slurm signals every process of the step, not only the agent.
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' torchrun \
  "$PY" -m torch.distributed.run \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$RDZV_PORT" \
  -m patchsae.launchers.train --config "$CONFIG" "${SETS[@]}" --resume if-present &
SRUN_PID=$!
wait "$SRUN_PID"  # in the background, so that the USR1 trap runs as soon as it arrives
