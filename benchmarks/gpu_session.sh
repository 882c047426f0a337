#!/usr/bin/env bash
# One lent-GPU session for issues 16 and 17 in one command (the device time is short and each
# machine start costs minutes): install the carried wheels, then gpu_17.sh (attention kernel,
# streaming) and gpu_16.sh (the real trainer), each under its own time box, and gather the logs
# into at most a few files under $OUT (the device tool returns <= 8 files).
#
#   bash benchmarks/gpu_session.sh              # on the GPU machine, repo root, wheels in .whl/
#   bash benchmarks/gpu_session.sh --cpu-dry-run
#
# Wheels: EXTRA="torchao==0.18.0" bash ../shared/gpu/fetch_wheels.sh .whl
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=()
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=(--cpu-dry-run)
FINAL="${OUT:-out/gpu_session}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")"
mkdir -p "$FINAL"
START=$SECONDS
S17="${GPU17_BUDGET_S:-215}"     # gpu_17.sh's part timeouts sum to 215 s (SKIP17="cfg": 165 s)
S16="${GPU16_BUDGET_S:-270}"
TOTAL_S="${GPU_SESSION_S:-575}"   # the device call's limit (600 s) less the time to archive the logs

if (( ${#DRY[@]} == 0 )) && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tail -n 3
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
fi
export PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
echo "# wheels installed after $((SECONDS - START)) s"

# the logs come back even if the device call is cut off: copy them into $FINAL as they grow
( while sleep 10; do cp "$WORK/g17/gpu17.log" "$WORK/g16/gpu16.log" "$FINAL/" 2>/dev/null; done ) &
COPIER=$!
OUT="$WORK/g17" timeout --kill-after=5 $((S17 + 15)) bash benchmarks/gpu_17.sh "${DRY[@]}"
echo "# gpu_17 finished after $((SECONDS - START)) s"
LEFT=$(( TOTAL_S - (SECONDS - START) - 15 ))
S16=$(( S16 < LEFT ? S16 : LEFT ))
OUT="$WORK/g16" BUDGET_S="$S16" timeout --kill-after=5 $((S16 + 15)) bash benchmarks/gpu_16.sh "${DRY[@]}"
echo "# gpu_16 finished after $((SECONDS - START)) s (budget ${S16} s)"
kill "$COPIER" 2>/dev/null

# the few files that come back: both logs, both summaries, and everything else as one archive
cp "$WORK/g17/gpu17.log" "$WORK/g16/gpu16.log" "$FINAL/" 2>/dev/null
cp "$WORK/g17/summary.md" "$FINAL/summary17.md" 2>/dev/null
cp "$WORK/g16/compare.json" "$FINAL/compare16.json" 2>/dev/null
tar -czf "$FINAL/all.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='*/checkpoints/*' --exclude='*.tar' . 2>/dev/null
ls -la "$FINAL"
echo "# gpu_session done in $((SECONDS - START)) s"
