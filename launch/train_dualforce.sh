#!/usr/bin/env bash
# Phase 4: full multimodal Diffusion Forcing training of DualForce.
#
#   bash launch/train_dualforce.sh [--config FILE] [--set k=v ...] [--nproc N] [--hostfile FILE]
#   deepspeed [--num_gpus N | --hostfile FILE] launch/train_dualforce.sh [--config FILE] [--set k=v ...]
#
# This file is valid bash AND valid Python. bash runs the part between the quote marks below
# (argument parsing, GPU count, preflight checks, then the DeepSpeed launcher), and never reaches
# the rest. Python -- which is how DeepSpeed's launcher runs its script argument on every rank --
# sees that part as a string literal and runs the Python part at the end; for bash that Python part
# is the body of a no-op here-document ending at the final `pass` line. See docs/TRAINING.md.
''':'
PHASE=4
SCRIPT="${BASH_SOURCE[0]}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exit 1
: <<'pass'
'''
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dualforce_mega.training.launch_entry import main  # noqa: E402

sys.exit(main(phase=4, argv=sys.argv[1:]))
pass
