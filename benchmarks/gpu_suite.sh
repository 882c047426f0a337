#!/usr/bin/env bash
# The whole GPU performance suite in one command, on a machine with only Python + a CUDA build of
# torch and this repository (no DeepSpeed, WebDataset, pytest or internet needed):
#
#   bash benchmarks/gpu_suite.sh                       # everything, ~15-25 min on one H100
#   SECTIONS="checks attention" bash benchmarks/gpu_suite.sh
#   ATTN_ARGS="--frames 8,32" TRAIN_ARGS="--no-search" bash benchmarks/gpu_suite.sh
#
# Sections: tests (the repository's pytest -m gpu tests, when pytest and the test deps are
# installed), checks (benchmarks/gpu_checks.py: kernels vs reference, FP8 numerics, FP8 vs bf16
# loss), attention (bench_attention.py), train (bench_train_step.py). Each writes
# $OUT_DIR/<section>.log (+ .json); the last step prints one summary table against the targets.
# Exit status: non-zero if any section failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT_DIR:-out/gpu_suite/$(date -u +%Y%m%dT%H%M%SZ)}"  # /out/ is git-ignored
SECTIONS="${SECTIONS:-tests checks attention train}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: torch sees no CUDA device ($("$PYTHON" -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
"$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_suite: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"

status=0
run() {  # run <section> <command...>: tee output to $OUT_DIR/<section>.log, remember failures
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then echo "== $name FAILED (exit $rc)"; status=1; fi
}

for section in $SECTIONS; do
    case "$section" in
        tests)
            if "$PYTHON" -c "import pytest, numpy, yaml" 2>/dev/null; then
                # test_gpu_kernels.py runs the same functions as the checks section: not twice
                run tests "$PYTHON" -m pytest -q -m gpu tests --ignore=tests/test_gpu_kernels.py \
                    --continue-on-collection-errors
            else
                echo "== tests: pytest/numpy/yaml not installed, repository GPU tests skipped" \
                     "(the checks section runs the kernel tests without them)"
            fi ;;
        checks)    run checks "$PYTHON" benchmarks/gpu_checks.py --json "$OUT_DIR/checks.json" ${CHECK_ARGS:-} ;;
        attention) run attention "$PYTHON" benchmarks/bench_attention.py --json "$OUT_DIR/attention.json" ${ATTN_ARGS:-} ;;
        train)     run train "$PYTHON" benchmarks/bench_train_step.py --json "$OUT_DIR/train_step.json" ${TRAIN_ARGS:-} ;;
        *) echo "gpu_suite: unknown section '$section' (tests, checks, attention, train)" >&2; status=1 ;;
    esac
done

echo
"$PYTHON" benchmarks/summarize.py "$OUT_DIR" | tee "$OUT_DIR/summary.md"
echo "gpu_suite: logs and JSON in $OUT_DIR"
exit $status
