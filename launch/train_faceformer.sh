#!/usr/bin/env bash
# FaceFormer baseline training (docs/BASELINES.md) with the project's DeepSpeed trainer.
#
#   DATA_ROOT=/data bash launch/train_faceformer.sh [--config FILE] [--set k=v ...] [--nproc N] [--hostfile FILE]
#   (one rank unless --nproc says otherwise)
#   DATA_ROOT=/data deepspeed [--num_gpus N] launch/train_faceformer.sh [--config FILE] [--set k=v ...]
#
# Valid bash AND valid Python, like launch/train_dualforce.sh (see docs/TRAINING.md): bash runs the part
# between the quote marks; DeepSpeed's launcher runs the file with python on every rank.
''':'
TASK_CONFIG="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/configs/faceformer.yaml"
DEFAULT_NPROC=1     # the seed trains on one device with batch 1; --nproc N with train.global_batch a multiple of N
SCRIPT="${BASH_SOURCE[0]}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exit 1
: <<'pass'
'''
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dualforce_mega.training.launch_entry import main  # noqa: E402

sys.exit(main(config="faceformer.yaml", argv=sys.argv[1:]))
pass
