# Shared bash side of launch/pretrain_causal.sh and launch/train_dualforce.sh (sourced, not run).
# The caller sets PHASE (2 or 4) and SCRIPT (its own path). See docs/TRAINING.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

usage() {
    cat <<USAGE
usage: bash $SCRIPT [--config FILE] [--set section.key=value ...] [--nproc N]
                    [--hostfile FILE [--master_addr ADDR]] [--master_port PORT]
   or: deepspeed [launcher options] $SCRIPT [--config FILE] [--set section.key=value ...]

  --config FILE     YAML config (default: launch/configs/phase$PHASE.yaml with GPUs,
                    launch/configs/tiny_cpu.yaml without)
  --set K=V         override one config key (repeatable), e.g. --set train.steps=100
  --nproc N         ranks on this node (default: the GPUs in CUDA_VISIBLE_DEVICES, else all GPUs
                    nvidia-smi lists, or 2 CPU ranks without GPUs)
  --hostfile FILE   multi-node run through the DeepSpeed launcher (see launch/hostfile.example)
  --master_addr A   rendezvous host for multi-node runs (default: MASTER_ADDR, else the first host)
  --master_port P   rendezvous port (default: MASTER_PORT, else 29500 multi-node / a free port locally)
USAGE
}

CONFIG=""
SETS=()
NPROC=""
HOSTFILE=""
ADDR="${MASTER_ADDR:-}"
PORT="${MASTER_PORT:-}"
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --config=*) CONFIG="${1#*=}"; shift ;;
        --set) need_value "$@"; SETS+=(--set "$2"); shift 2 ;;
        --set=*) SETS+=(--set "${1#*=}"); shift ;;
        --nproc) need_value "$@"; NPROC="$2"; shift 2 ;;
        --nproc=*) NPROC="${1#*=}"; shift ;;
        --hostfile) need_value "$@"; HOSTFILE="$2"; shift 2 ;;
        --hostfile=*) HOSTFILE="${1#*=}"; shift ;;
        --master_addr) need_value "$@"; ADDR="$2"; shift 2 ;;
        --master_addr=*) ADDR="${1#*=}"; shift ;;
        --master_port) need_value "$@"; PORT="$2"; shift 2 ;;
        --master_port=*) PORT="${1#*=}"; shift ;;
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
if [[ -z "$CONFIG" ]]; then
    if [[ "$GPUS" -gt 0 ]]; then CONFIG="$REPO/launch/configs/phase$PHASE.yaml"; else CONFIG="$REPO/launch/configs/tiny_cpu.yaml"; fi
fi
TRAIN_ARGS=(--config "$CONFIG" --set "train.phase=$PHASE" ${SETS[@]+"${SETS[@]}"})

if [[ -n "$HOSTFILE" ]]; then
    # multi-node: validate against the hostfile's total slots, then the DeepSpeed launcher (pdsh) starts
    # this same script with python on every node (see the polyglot note in the script)
    "$PYTHON" -m dualforce_mega.training.preflight --hostfile "$HOSTFILE" "${TRAIN_ARGS[@]}"
    LAUNCH=(--hostfile "$HOSTFILE" --master_port "${PORT:-29500}")
    [[ -n "$ADDR" ]] && LAUNCH+=(--master_addr "$ADDR")
    exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCH[@]}" "$SCRIPT" "${TRAIN_ARGS[@]}"
fi

RESOURCES=()
if [[ -z "$NPROC" && "$GPUS" -gt 0 && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    # respect a GPU selection: one rank per listed device
    IFS=',' read -r -a VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
    NPROC="${#VISIBLE[@]}"
    RESOURCES=(--include "localhost:$CUDA_VISIBLE_DEVICES")
fi
if [[ -z "$NPROC" ]]; then
    if [[ "$GPUS" -gt 0 ]]; then NPROC="$GPUS"; else NPROC=2; fi
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nproc '$NPROC' must be a positive integer" >&2; exit 2; }
[[ ${#RESOURCES[@]} -gt 0 ]] || RESOURCES=(--num_gpus "$NPROC")
if [[ -z "$PORT" ]]; then
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
# every check that can fail does so here, before any rank starts
"$PYTHON" -m dualforce_mega.training.preflight --world "$NPROC" "${TRAIN_ARGS[@]}"
exec "$PYTHON" -m deepspeed.launcher.runner "${RESOURCES[@]}" --master_port "$PORT" "$SCRIPT" "${TRAIN_ARGS[@]}"
