#!/usr/bin/env bash
# FaceFormer inference: per-frame FLAME meshes of every test record (docs/BASELINES.md).
#
#   DATA_ROOT=/data bash launch/inference_faceformer.sh --run RUN_DIR [--exp-name NAME] \
#       [--out results/metrics/faceformer_run/test] [--gt-out DIR] [--flame-masks FLAME_masks.pkl]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m eval.baselines.faceformer "$@"
