# Shared body of launch/slurm/*.sbatch (sourced; the caller sets SCRIPT = launch/<phase script>.sh).
# One SLURM task per node runs the launch script for that node's ranks, with the node rank, node count
# and rendezvous host taken from SLURM's variables -- no ssh. A run stopped by a preemption signal exits
# 75 after saving a checkpoint; the job is then requeued and resumes from that checkpoint.
set -uo pipefail

NODES="${SLURM_NNODES:?run this through sbatch (SLURM_NNODES is not set)}"
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
MASTER_PORT="${MASTER_PORT:-29500}"
export MASTER_ADDR MASTER_PORT
NPROC_ARGS=()
if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then NPROC_ARGS=(--nproc "$SLURM_GPUS_ON_NODE"); fi

echo "slurm job ${SLURM_JOB_ID:-?}: $NODES nodes, rendezvous $MASTER_ADDR:$MASTER_PORT, $SCRIPT $*"
# SLURM_NODEID is set per task by srun; single quotes: expanded by each task's own shell
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec bash "$0" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
             --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"' \
    "$REPO/$SCRIPT" ${NPROC_ARGS[@]+"${NPROC_ARGS[@]}"} "$@"
rc=$?
if [[ $rc -eq 75 && -n "${SLURM_JOB_ID:-}" ]]; then       # exit_codes.PREEMPTED: checkpoint saved
    echo "preempted with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit $rc
