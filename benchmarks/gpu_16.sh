#!/usr/bin/env bash
# Issue 16's GPU measurements in one script: the real trainer (launch/*.sh, DeepSpeed, 1 GPU), lite,
# 9 latent frames 64x64, micro batch 1 x 4 accumulation steps, bf16 -- the previous configuration
# (ZeRO-3, checkpointing on, eager) next to the new one (ZeRO-2, checkpointing auto, compiled blocks,
# 2 loader workers) and FP8 (torchao), Phase 2 and Phase 4, then a side-by-side table from their
# metrics.jsonl (benchmarks/compare_runs.py) after every part.
#
#   bash benchmarks/gpu_16.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu_16.sh --cpu-dry-run    # the same parts on CPU with the tiny preset (CI / typos)
#   ONLY="fp8_p2 fp8_p4" BUDGET_S=400 bash benchmarks/gpu_16.sh    # some parts again (same $OUT)
#
# Needs (besides torch): deepspeed, webdataset, pydantic, hjson (../shared/gpu/fetch_wheels.sh) and for
# the FP8 parts torchao:  EXTRA="torchao==0.17.0" bash ../shared/gpu/fetch_wheels.sh .whl
# Every part runs under its own `timeout`, within BUDGET_S seconds for the whole script (default 300: the
# first four parts; BUDGET_S=600 adds FP8 and the one-change-at-a-time parts), in priority order (a part
# that would not get MIN_PART_S is skipped and says so); a failing part never stops the rest. Output goes
# to stdout and to $OUT/gpu16.log as it happens.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
PYTHON="${PYTHON:-python3}"
export PYTHON
OUT="${OUT:-out/gpu16}"
mkdir -p "$OUT"
LOG="$OUT/gpu16.log"
: > "$LOG"
BUDGET_S="${BUDGET_S:-300}"
MIN_PART_S="${MIN_PART_S:-25}"
ONLY="${ONLY:-}"          # e.g. ONLY="new_p4 fp8_p4": run just these parts (env always runs)
START=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }

# part NAME MAX_SECONDS CMD...: run the command (not a shell function) under timeout min(MAX, what is left
# of the budget), log as it goes
part() {
    local name=$1 max=$2; shift 2
    if [[ -n "$ONLY" && "$name" != env && " $ONLY " != *" $name "* ]]; then return 0; fi
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    local t=$(( max < left ? max : left ))
    if (( t < MIN_PART_S )); then
        say "== $name: SKIPPED (${left}s of the ${BUDGET_S}s budget left)"
        return 0
    fi
    say "== $name (timeout ${t}s, $(( $(date +%s) - START ))s elapsed): $*"
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if (( rc == 124 || rc == 137 )); then say "== $name: TIMED OUT after ${t}s"
    elif (( rc != 0 )); then say "== $name: FAILED (exit $rc)"
    else say "== $name: done"; fi
    return 0
}

if (( DRY )); then
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
    MODEL=(--set model.preset=tiny --set model.layers=1 --set model.fusion_depth=1 --set model.audio_layers=1
           --set train.precision=fp32 --set data.window=3 --set data.synthetic_frames=3
           --set data.latent_height=8 --set data.latent_width=8)
    NPROC=(--nproc 1)
    STEPS_BASE=3; STEPS_NEW=3; SKIP=1
else
    MODEL=(--set model.preset=lite --set train.precision=bf16 --set data.window=9 --set data.synthetic_frames=9
           --set data.latent_height=64 --set data.latent_width=64)
    NPROC=(--nproc 1)
    STEPS_BASE=4; STEPS_NEW=5; SKIP=2
fi
COMMON=(--config launch/configs/tiny_cpu.yaml "${NPROC[@]}" "${MODEL[@]}" --set train.global_batch=4
        --set train.micro_batch=1 --set train.save_every=0 --set train.log_every=1 --set train.warmup_steps=1
        --set run.tensorboard=false --set data.synthetic_clips=8 --set data.synthetic_shards=8)
# the configuration measured on 2026-11-26 (../shared/gpu/README.md), minus its crash
BASE=(--set parallel.zero_stage=3 --set train.activation_checkpointing=on --set train.compile=off
      --set data.workers=0 --set "train.steps=$STEPS_BASE")
# this issue's configuration: ZeRO-2 (no per-module parameter gathering on one GPU), the planner's
# checkpointing choice, compiled blocks, the loader in 2 worker processes
NEW=(--set parallel.zero_stage=2 --set train.activation_checkpointing=auto --set train.compile=on
     --set data.workers=2 --set "train.steps=$STEPS_NEW")
FP8=(--set train.fp8=true --set train.fp8_backend=auto --set train.fp8_recipe=current)

train() {  # train NAME PHASE MAX_SECONDS ARGS...: one trainer run into $OUT/runs/NAME (a part), data shared per phase
    local name=$1 phase=$2 max=$3; shift 3
    local script=launch/train_dualforce.sh
    [[ "$phase" == 2 ]] && script=launch/pretrain_causal.sh
    part "$name" "$max" bash "$script" "${COMMON[@]}" --set "run.dir=$OUT/runs/$name" \
        --set "data.synthetic_dir=$OUT/shards_p$phase" "$@"
    table
}

table() {
    local runs=() r
    for r in base_p2 zero2_p2 new_p2 fp8_p2 base_p4 new_p4 fp8_p4; do
        [[ -d "$OUT/runs/$r" ]] && runs+=(--run "$r=$OUT/runs/$r")
    done
    "$PYTHON" benchmarks/compare_runs.py --skip "$SKIP" "${runs[@]}" \
        --ratio new_p2/base_p2 --ratio new_p4/base_p4 --ratio fp8_p2/new_p2 --ratio fp8_p4/new_p4 \
        --ratio zero2_p2/base_p2 \
        --json "$OUT/compare.json" 2>&1 | tee -a "$LOG"
}

say "# gpu_16 $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET_S}s out=$OUT"
part env 30 "$PYTHON" -c "
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
for m in ('deepspeed', 'webdataset', 'torchao', 'transformer_engine', 'triton'):
    try:
        print(m, getattr(importlib.import_module(m), '__version__', '?'))
    except Exception as e:
        print(m, 'missing:', type(e).__name__)
"
# priority order: baseline and new configuration of Phase 2, then of Phase 4 (the new Phase 4 run compiles
# more block variants; the video blocks without audio come from the inductor cache of the Phase 2 run),
# then FP8 (recompiles with FP8 linears) in Phase 2 and Phase 4
train base_p2 2 70 "${BASE[@]}"
train new_p2 2 100 "${NEW[@]}"
train base_p4 4 70 "${BASE[@]}"
train new_p4 4 150 "${NEW[@]}"
train fp8_p2 2 90 "${NEW[@]}" "${FP8[@]}"
train fp8_p4 4 150 "${NEW[@]}" "${FP8[@]}"
# one change at a time, if the budget allows (BUDGET_S): the baseline with ZeRO-2 only, then the
# compiled-block and FP8-backend knobs side by side in one process (bench_train_step.py, no DeepSpeed)
train zero2_p2 2 70 "${BASE[@]}" --set parallel.zero_stage=2
if (( DRY )); then KNOBS=(--cpu-smoke --variants eager,compile); else
    KNOBS=(--variants eager,compile,compile+fp8=torchao,compile+rowwise,compile+fp8=torch --iters 5 --warmup 1
           --compile-warmup 1 --max-seconds 20); fi
part knobs_p2 150 "$PYTHON" benchmarks/bench_train_step.py --phases 2 --no-search "${KNOBS[@]}" \
    --json "$OUT/knobs_p2.json"
say "# gpu_16 finished after $(( $(date +%s) - START ))s; figures: $OUT/compare.json, logs: $LOG"
