#!/usr/bin/env bash
# The main job: set up the environment, then Phase 4 training (launch/train_dualforce.sh).
# Arguments pass through, e.g.  bash run.sh --config my.yaml --set train.steps=1000
# Without launch/train_dualforce.sh (a partial checkout) it runs the model smoke test instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/install.sh
if [[ -f launch/train_dualforce.sh ]]; then
    exec bash launch/train_dualforce.sh "$@"
fi
echo "run.sh: launch/train_dualforce.sh not found; running the model smoke test (python -m dualforce_mega.smoke)" >&2
exec "${PYTHON:-python}" -m dualforce_mega.smoke "$@"
