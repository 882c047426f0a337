#!/usr/bin/env bash
# Set up the environment, then run the CPU test suite. Extra arguments go to pytest,
# e.g.  bash test.sh -x -k config      (GPU tests run only where CUDA is available)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/install.sh
exec "${PYTHON:-python}" -m pytest -q tests "$@"
