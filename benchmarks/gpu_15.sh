#!/usr/bin/env bash
# Issue 15 on one GPU (about 3 minutes): the non-finite step skip of DeepSpeed's bf16 ZeRO-3 path on CUDA,
# and preemption (SIGTERM -> checkpoint of the current step, exit 75, exact resume) with NCCL.
#
#   bash benchmarks/gpu_15.sh                 # on the GPU machine, from the repository root
#   NPROC=2 bash benchmarks/gpu_15.sh         # with two GPUs
#
# Everything else of issue 15 (launcher, multi-node, elastic resume, hang watchdog, tool safety) is
# device-independent and covered by the CPU suite. Output: PASS/FAIL lines, runs under $OUT (out/gpu15).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || PYTHON=python
OUT="${OUT:-out/gpu15}"
rm -rf "$OUT"
exec timeout --kill-after=10 540 "$PYTHON" benchmarks/gpu_15_checks.py --nproc "${NPROC:-1}" --out "$OUT"
