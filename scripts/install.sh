#!/usr/bin/env bash
# Idempotent environment set-up for DualForce-Mega; safe to run before every job.
#
#   bash scripts/install.sh            # quiet; VERBOSE=1 shows pip's output
#
# 1. torch: installed (torch==$TORCH_VERSION) only if `import torch` fails. An existing torch —
#    e.g. the CUDA build a GPU cluster already has — is never reinstalled or upgraded.
#    Without nvidia-smi the CPU wheel index is tried first (TORCH_INDEX_URL overrides it).
# 2. requirements.txt under a constraints file, written now, that pins the installed torch, so
#    no dependency can replace it. Skipped in well under a second when everything is satisfied.
# 2b. requirements-nodeps.txt with --no-deps: packages whose metadata pins conflict with ours but
#    that work with what requirements.txt installs (mediapipe 0.10.21 pins numpy<2 and
#    protobuf<5 and pulls jax; its face models run with numpy 2 and protobuf 6).
# 3. With nvidia-smi: requirements-gpu.txt (transformer-engine, flash-attn) with
#    --no-build-isolation; a failure is a warning, not an error (the code has fallbacks).
#    SKIP_GPU_EXTRAS=1 skips this step.
# 4. Debian tools the data pipeline and its tests call (ffmpeg, espeak-ng), via apt-get only when a
#    command is missing and apt-get exists; a failure is a warning (the tests that need them skip).
#    SKIP_APT=1 skips this step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

say() { echo "[install] $*" >&2; }
pip_install() {
    if [[ "${VERBOSE:-0}" == 1 ]]; then
        "$PYTHON" -m pip install "$@"
    else
        "$PYTHON" -m pip install -q "$@"
    fi
}

# Exit 0 iff every requirement in the given files is installed at an allowed version.
satisfied() {
    "$PYTHON" - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement

for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            sys.exit(1)
        if not req.specifier.contains(have, prereleases=True):
            sys.exit(1)
PY
}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# --- 1. torch --------------------------------------------------------------------------------
torch_version() { "$PYTHON" -c "from importlib.metadata import version; print(version('torch'))"; }

# importing (not just finding metadata) catches a broken torch; this is the only torch import here
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    if has_gpu; then
        say "torch missing; installing torch==$TORCH_VERSION (CUDA build from the default index)"
        pip_install "torch==$TORCH_VERSION"
    else
        index="${TORCH_INDEX_URL:-$CPU_TORCH_INDEX}"
        say "torch missing, no GPU; installing torch==$TORCH_VERSION (CPU build)"
        if ! pip_install "torch==$TORCH_VERSION" --index-url "$index"; then
            say "WARNING: CPU index $index unreachable; installing torch==$TORCH_VERSION from the default index"
            pip_install "torch==$TORCH_VERSION"
        fi
    fi
fi
TORCH_INSTALLED="$(torch_version)"

# --- 2. requirements.txt under a torch pin ---------------------------------------------------
constraints="$(mktemp "${TMPDIR:-/tmp}/dualforce-constraints.XXXXXX")"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_INSTALLED" >"$constraints"

if satisfied "$ROOT/requirements.txt"; then
    [[ "${VERBOSE:-0}" == 1 ]] && say "requirements.txt already satisfied (torch $TORCH_INSTALLED)"
else
    say "installing requirements.txt (torch pinned to $TORCH_INSTALLED)"
    pip_install -r "$ROOT/requirements.txt" -c "$constraints"
fi

# --- 2b. --no-deps extras --------------------------------------------------------------------
nodeps="$ROOT/requirements-nodeps.txt"
if [[ -f "$nodeps" ]] && ! satisfied "$nodeps"; then
    say "installing requirements-nodeps.txt without dependencies"
    pip_install --no-deps -r "$nodeps"
fi

# --- 3. GPU extras ---------------------------------------------------------------------------
if has_gpu && [[ "${SKIP_GPU_EXTRAS:-0}" != 1 ]]; then
    if satisfied "$ROOT/requirements-gpu.txt"; then
        [[ "${VERBOSE:-0}" == 1 ]] && say "requirements-gpu.txt already satisfied"
    else
        say "GPU found: building requirements-gpu.txt (transformer-engine, flash-attn); this can take long"
        if ! pip_install --no-build-isolation -r "$ROOT/requirements-gpu.txt" -c "$constraints"; then
            say "WARNING: GPU extras failed to install; continuing with torch.nn.Linear (no FP8) and" \
                "the sdpa/flex attention backends. Retry by hand: pip install --no-build-isolation" \
                "-r requirements-gpu.txt"
        fi
    fi
fi

# --- 4. Debian tools ---------------------------------------------------------------------------
if [[ "${SKIP_APT:-0}" != 1 ]]; then
    missing=()
    for tool in ffmpeg espeak-ng; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
    if (( ${#missing[@]} )); then
        if command -v apt-get >/dev/null 2>&1; then
            say "installing ${missing[*]} with apt-get"
            if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
                    >/dev/null 2>&1; then
                say "WARNING: apt-get could not install ${missing[*]}; the data pipeline tests that need them skip"
            fi
        else
            say "WARNING: ${missing[*]} missing and no apt-get; install them to use data_tools.prepare"
        fi
    fi
fi

# Fail here, not inside a job, if the torch pin was broken somehow.
now="$(torch_version)"
if [[ "$now" != "$TORCH_INSTALLED" ]]; then
    say "ERROR: torch changed from $TORCH_INSTALLED to $now during install"
    exit 1
fi
