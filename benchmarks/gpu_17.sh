#!/usr/bin/env bash
# Issue 17 on one GPU in one command (at most ~4.3 min: the part timeouts sum to 250 s): correctness
# first, then the new paths timed against the previous configuration (flex attention, the growing
# KV-cache sampler) in the same run.
#
#   bash benchmarks/gpu_17.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu_17.sh --cpu-dry-run    # tiny shapes on CPU: every part and the summary, here
#
# Parts, each under its own timeout and failing soft (the next part runs anyway):
#   checks     merged piece kernels, merged vs dense reference at the benchmark shape (F=8, P=1 and 4,
#              fwd+bwd, bf16), whole model merged vs sdpa, static graphs vs eager KV cache
#   attention  merged vs best full kernel vs flex vs dense mask, fwd+bwd, bf16, F = 8, 32, 128
#              (+ merged through each piece kernel and a tuned flex at F = 32)
#   stream     lite 512^2, 8 steps: static (CUDA graphs) vs cached vs recompute fps, first-frame latency
#   cfg        the same with audio guidance: both branches in one batched forward vs two forwards
#              (diffusion.cfg_batched), static path; prints the batched / two-call ratio
# Output: progressively on stdout and in $OUT/gpu17.log (per part $OUT/<part>.log, JSON), then one
# summary table against the targets (benchmarks/summarize.py). $OUT defaults to out/gpu17.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; fi
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || PYTHON=python
OUT="${OUT:-out/gpu17}"
mkdir -p "$OUT"
LOG="$OUT/gpu17.log"
: > "$LOG"
export PYTHONUNBUFFERED=1

say() { echo "$@" | tee -a "$LOG"; }

part() {  # part <name> <timeout seconds> <command...>
    local name=$1 limit=$2
    shift 2
    if [[ " ${SKIP17:-} " == *" $name "* ]]; then say "== $name: skipped (SKIP17)"; return 0; fi
    say "== $name (timeout ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && say "== $name: TIMED OUT after ${limit}s (rows printed above were kept)"
    say "== $name: exit $rc after $((SECONDS - start)) s"
}

say "# gpu_17 $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') dry-run=$DRY"
"$PYTHON" -c "import torch, sys; print('# python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"

if [ "$DRY" -eq 1 ]; then
    part checks 120 "$PYTHON" benchmarks/gpu_17_checks.py --cpu-smoke --json "$OUT/checks.json"
    part attention 120 "$PYTHON" benchmarks/bench_attention.py --cpu-smoke --sp 1 --backends merged,flex,sdpa \
        --merged-kernels cpu_flash --variant-frames 4 --no-mask-build --json "$OUT/attention.json"
    part stream 120 "$PYTHON" benchmarks/bench_stream.py --cpu-smoke --json "$OUT/stream.json"
    part cfg 120 "$PYTHON" benchmarks/bench_stream.py --cpu-smoke --paths cached,static --cfg-audio 2.0 \
        --cfg-modes batched,two-call --json "$OUT/stream_cfg.json"
else
    part checks 30 "$PYTHON" benchmarks/gpu_17_checks.py --json "$OUT/checks.json"
    part attention 60 "$PYTHON" benchmarks/bench_attention.py --frames 8,32 --sp 1 \
        --backends merged,flex,sdpa --merged-kernels flash --variant-frames 32 \
        --flex-options '{"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}' \
        --warmup 2 --iters 5 --max-seconds 3 --no-mask-build --json "$OUT/attention.json"
    part stream 75 "$PYTHON" benchmarks/bench_stream.py --preset lite --latent-hw 64 64 --steps 8 \
        --latent-frames 9 --recompute-frames 5 --json "$OUT/stream.json"
    part cfg 50 "$PYTHON" benchmarks/bench_stream.py --preset lite --latent-hw 64 64 --steps 8 \
        --latent-frames 5 --paths static --cfg-audio 2.0 --cfg-modes batched,two-call --json "$OUT/stream_cfg.json"
fi

say ""
"$PYTHON" benchmarks/summarize.py "$OUT" 2>&1 | tee -a "$LOG" "$OUT/summary.md"
say "# gpu_17 done in $SECONDS s; logs and JSON in $OUT"
