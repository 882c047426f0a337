# Shared bash side of the training launch scripts (sourced, not run). See docs/TRAINING.md.
# The caller sets SCRIPT (its own path) and either PHASE (2 or 4: launch/pretrain_causal.sh,
# launch/train_dualforce.sh) or TASK_CONFIG (another task's default config: launch/train_faceformer.sh),
# optionally DEFAULT_NPROC (ranks when --nproc is not given; otherwise every GPU, or 2 CPU ranks).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

usage() {
    cat <<USAGE
usage: bash $SCRIPT [--config FILE] [--set section.key=value ...] [--nproc N]
                    [--nnodes M --node-rank R --master_addr ADDR] [--master_port PORT]
                    [--hostfile FILE [--master_addr ADDR]]
   or: deepspeed [launcher options] $SCRIPT [--config FILE] [--set section.key=value ...]

  --config FILE     YAML config (default: ${TASK_CONFIG:-launch/configs/phase$PHASE.yaml with GPUs,
                    launch/configs/tiny_cpu.yaml without, in run.dir runs/tiny_cpu_phase$PHASE})
  --set K=V         override one config key (repeatable), e.g. --set train.steps=100
  --nproc N         ranks on this node (default: the GPUs in CUDA_VISIBLE_DEVICES, else all GPUs
                    nvidia-smi lists, or 2 CPU ranks without GPUs)
  --nnodes M        nodes of the job; run this script once on every node (SLURM srun, Kubernetes),
  --node-rank R     each with its own R in 0..M-1 -- no ssh involved (launch/slurm/*.sbatch)
  --master_addr A   rendezvous host, node 0 (default: MASTER_ADDR; required with --nnodes > 1 unless set)
  --master_port P   rendezvous port (default: MASTER_PORT, else 29500 multi-node / a free port on one node)
  --hostfile FILE   multi-node run through the DeepSpeed launcher over pdsh/ssh (launch/hostfile.example)
  --debug           show the traceback of a configuration error
Exit codes: 0 done, 2 bad config, 3 non-finite steps, 4 hang, 5 checkpoint write, 75 preempted
(checkpoint saved: run the same command again); see docs/TRAINING.md.
USAGE
}

CONFIG=""
SETS=()
NPROC=""
HOSTFILE=""
NNODES=1
NODE_RANK=0
ADDR="${MASTER_ADDR:-}"
PORT="${MASTER_PORT:-}"
DEBUG=()
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --config=*) CONFIG="${1#*=}"; shift ;;
        --set) need_value "$@"; SETS+=(--set "$2"); shift 2 ;;
        --set=*) SETS+=(--set "${1#*=}"); shift ;;
        --nproc) need_value "$@"; NPROC="$2"; shift 2 ;;
        --nproc=*) NPROC="${1#*=}"; shift ;;
        --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
        --nnodes=*) NNODES="${1#*=}"; shift ;;
        --node-rank|--node_rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
        --node-rank=*|--node_rank=*) NODE_RANK="${1#*=}"; shift ;;
        --hostfile) need_value "$@"; HOSTFILE="$2"; shift 2 ;;
        --hostfile=*) HOSTFILE="${1#*=}"; shift ;;
        --master_addr|--master-addr) need_value "$@"; ADDR="$2"; shift 2 ;;
        --master_addr=*|--master-addr=*) ADDR="${1#*=}"; shift ;;
        --master_port|--master-port) need_value "$@"; PORT="$2"; shift 2 ;;
        --master_port=*|--master-port=*) PORT="${1#*=}"; shift ;;
        --debug) DEBUG=(--debug); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if [[ "$GPUS" -eq 0 ]]; then
    export DS_ACCELERATOR=cpu      # ranks use gloo (train.py picks the backend)
fi
DEFAULT_SETS=()
if [[ -z "$CONFIG" && -n "${TASK_CONFIG:-}" ]]; then
    CONFIG="$TASK_CONFIG"
elif [[ -z "$CONFIG" ]]; then
    if [[ "$GPUS" -gt 0 ]]; then
        CONFIG="$REPO/launch/configs/phase$PHASE.yaml"
    else
        CONFIG="$REPO/launch/configs/tiny_cpu.yaml"
        # one default run directory per script: a Phase 4 run never resumes the Phase 2 one
        DEFAULT_SETS=(--set "run.dir=runs/tiny_cpu_phase$PHASE" --set "run.name=tiny_cpu_phase$PHASE")
    fi
fi
TRAIN_ARGS=(--config "$CONFIG")
[[ -n "${PHASE:-}" ]] && TRAIN_ARGS+=(--set "train.phase=$PHASE")
TRAIN_ARGS+=(${DEFAULT_SETS[@]+"${DEFAULT_SETS[@]}"} ${SETS[@]+"${SETS[@]}"})

# every check that can fail does so here, before any rank starts; a finished run starts nothing
preflight() {
    local rc=0
    "$PYTHON" -m dualforce_mega.training.preflight "$@" "${TRAIN_ARGS[@]}" ${DEBUG[@]+"${DEBUG[@]}"} || rc=$?
    if [[ $rc -eq 10 ]]; then exit 0; fi      # exit_codes.PREFLIGHT_FINISHED: nothing to do
    if [[ $rc -ne 0 ]]; then exit "$rc"; fi
}

if [[ -n "$HOSTFILE" ]]; then
    # multi-node over ssh: validate against the hostfile's total slots, then the DeepSpeed launcher (pdsh)
    # starts this same script with python on every node (see the polyglot note in the script)
    preflight --hostfile "$HOSTFILE"
    LAUNCH=(--hostfile "$HOSTFILE" --master_port "${PORT:-29500}")
    [[ -n "$ADDR" ]] && LAUNCH+=(--master_addr "$ADDR")
    exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCH[@]}" "$SCRIPT" "${TRAIN_ARGS[@]}"
fi

[[ -z "$NPROC" && -n "${DEFAULT_NPROC:-}" ]] && NPROC="$DEFAULT_NPROC"   # a task's own default (FaceFormer: 1)
if [[ -z "$NPROC" && "$GPUS" -gt 0 && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    # respect a GPU selection: one rank per listed device
    IFS=',' read -r -a VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
    NPROC="${#VISIBLE[@]}"
fi
if [[ -z "$NPROC" ]]; then
    if [[ "$GPUS" -gt 0 ]]; then NPROC="$GPUS"; else NPROC=2; fi
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nproc '$NPROC' must be a positive integer" >&2; exit 2; }
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nnodes '$NNODES' must be a positive integer" >&2; exit 2; }
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || {
    echo "error: --node-rank '$NODE_RANK' must be in 0..$((NNODES - 1)) (--nnodes $NNODES)" >&2; exit 2; }
if [[ "$NNODES" -gt 1 ]]; then
    [[ -n "$ADDR" ]] || { echo "error: --nnodes $NNODES needs --master_addr (the host of node rank 0) or MASTER_ADDR" >&2; exit 2; }
    PORT="${PORT:-29500}"
else
    ADDR="${ADDR:-127.0.0.1}"
    if [[ -z "$PORT" ]]; then
        PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    fi
fi
preflight --world "$((NPROC * NNODES))"
# this node's ranks only (no ssh): signals are forwarded to them and none outlives the launcher
exec "$PYTHON" -m dualforce_mega.training.launcher --nproc "$NPROC" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$ADDR" --master-port "$PORT" -- \
    "$PYTHON" -u -m dualforce_mega.training.train "${TRAIN_ARGS[@]}" ${DEBUG[@]+"${DEBUG[@]}"}
