"""scripts/install.sh decisions (checked with a python shim that records pip calls instead of
installing anything) and the exit codes of .ci/run."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Forwards everything to the real interpreter except `-m pip ...` (logged, optionally failing) and the
# `import torch` probe (its result is set by the test).
SHIM = r"""#!/usr/bin/env bash
if [[ "$1" == "-m" && "$2" == "pip" ]]; then
    echo "pip ${*:3}" >> "$SHIM_LOG"
    prev=""
    for a in "$@"; do
        if [[ "$prev" == "-c" ]]; then echo "constraints: $(cat "$a")" >> "$SHIM_LOG"; fi
        prev="$a"
    done
    if [[ -n "${SHIM_PIP_FAIL:-}" && "$*" == *"$SHIM_PIP_FAIL"* ]]; then exit 1; fi
    exit 0
fi
if [[ "$1" == "-c" && "$2" == "import torch" ]]; then exit "${SHIM_TORCH_RC:-0}"; fi
exec "$REAL_PYTHON" "$@"
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def sandbox(tmp_path: Path):
    """A copy of install.sh next to its own requirement files, a python shim and a fake nvidia-smi."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "install.sh", tmp_path / "scripts" / "install.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = _executable(bin_dir / "python-shim", SHIM)
    log = tmp_path / "pip.log"

    def run(requirements: str, gpu_requirements: str = "flash-attn\n", gpu: bool = False, **env: str
            ) -> tuple[subprocess.CompletedProcess, list[str]]:
        (tmp_path / "requirements.txt").write_text(requirements)
        (tmp_path / "requirements-gpu.txt").write_text(gpu_requirements)
        # a stand-in nvidia-smi decides "GPU or not" whatever this machine has
        _executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n" if gpu else "#!/bin/sh\nexit 9\n")
        log.write_text("")
        full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(shim),
                    "REAL_PYTHON": sys.executable, "SHIM_LOG": str(log), **env}
        full_env.pop("VERBOSE", None)
        proc = subprocess.run(["bash", str(tmp_path / "scripts" / "install.sh")], env=full_env,
                              capture_output=True, text=True, timeout=120)
        return proc, [line for line in log.read_text().splitlines() if line]

    run.root = tmp_path
    return run


def test_nothing_installed_when_satisfied(sandbox) -> None:
    proc, calls = sandbox("pyyaml>=5.0\npytest>=7  # comment\n\n")
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    assert proc.stdout == "" and proc.stderr == ""  # quiet by default


def test_missing_requirement_installed_with_torch_pinned(sandbox) -> None:
    proc, calls = sandbox("pyyaml>=5.0\nsurely-not-installed-pkg-dualforce==1.0\n")
    assert proc.returncode == 0, proc.stderr
    req = sandbox.root / "requirements.txt"
    assert len(calls) == 2 and calls[0].startswith(f"pip install -q -r {req} -c ")
    assert calls[1] == f"constraints: torch=={version('torch')}"


def test_too_old_version_counts_as_missing(sandbox) -> None:
    _, calls = sandbox("pyyaml>=999\n")
    assert calls and "-r" in calls[0]


def test_torch_installed_only_when_missing(sandbox) -> None:
    _, calls = sandbox("pyyaml>=5.0\n", SHIM_TORCH_RC="1")
    assert calls == [f"pip install -q torch==2.13.0 --index-url {CPU_INDEX}"]
    # an importable torch is never touched, with or without a GPU
    for gpu in (False, True):
        _, calls = sandbox("surely-not-installed-pkg-dualforce\n", gpu=gpu, SHIM_PIP_FAIL="flash-attn")
        assert not any(c.startswith("pip ") and "torch==" in c for c in calls), calls


def test_cpu_index_failure_falls_back_to_default_index(sandbox) -> None:
    proc, calls = sandbox("pyyaml>=5.0\n", SHIM_TORCH_RC="1", SHIM_PIP_FAIL="--index-url")
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"pip install -q torch==2.13.0 --index-url {CPU_INDEX}", "pip install -q torch==2.13.0"]
    assert "WARNING" in proc.stderr


def test_gpu_extras_tried_and_failure_only_warns(sandbox) -> None:
    proc, calls = sandbox("pyyaml>=5.0\n", gpu_requirements="surely-not-installed-gpu-pkg\n", gpu=True,
                          SHIM_PIP_FAIL="requirements-gpu.txt")
    assert proc.returncode == 0, proc.stderr
    gpu_req = sandbox.root / "requirements-gpu.txt"
    assert calls[0].startswith(f"pip install -q --no-build-isolation -r {gpu_req} -c ")
    assert "WARNING: GPU extras failed" in proc.stderr
    # no GPU: the extras are not attempted
    _, calls = sandbox("pyyaml>=5.0\n", gpu_requirements="surely-not-installed-gpu-pkg\n", gpu=False)
    assert calls == []


def test_nodeps_requirements_installed_without_dependencies(sandbox) -> None:
    nodeps = sandbox.root / "requirements-nodeps.txt"
    nodeps.write_text("surely-not-installed-nodeps-pkg==1.0\n")
    proc, calls = sandbox("pyyaml>=5.0\n")
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"pip install -q --no-deps -r {nodeps}"]
    nodeps.write_text("pyyaml>=5.0\n")  # satisfied: nothing to do
    _, calls = sandbox("pyyaml>=5.0\n")
    assert calls == []


def test_failed_requirements_install_fails_the_script(sandbox) -> None:
    proc, _ = sandbox("surely-not-installed-pkg-dualforce\n", SHIM_PIP_FAIL="requirements.txt")
    assert proc.returncode != 0


# set in the nested run so that a mistake in the arguments can never make .ci/run recurse into this file
_NESTED = "DUALFORCE_CI_SELFTEST"


def _ci(*args: str) -> subprocess.CompletedProcess:
    if os.environ.get(_NESTED):
        pytest.skip("already inside a .ci/run self-test")
    return subprocess.run(["bash", str(REPO / ".ci" / "run"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CI": "true", _NESTED: "1"})


def test_ci_fails_when_no_test_ran() -> None:
    proc = _ci("-p", "no:python")  # no python test collection at all: pytest exits 5 without importing the suite
    assert proc.returncode == 1
    assert "collected no tests" in proc.stderr
    assert "no tests ran" in proc.stdout.splitlines()[-1]  # pytest's summary line comes last


def test_ci_propagates_pytest_errors() -> None:
    proc = _ci("--no-such-pytest-option")
    assert proc.returncode == 4  # pytest's usage-error code, unchanged
