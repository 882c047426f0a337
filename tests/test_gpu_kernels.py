"""GPU kernels at the benchmark shapes (skipped without CUDA): every block-causal backend vs the
dense-mask reference, forward and backward; FP8 linears vs bf16; FP8 vs bf16 losses over 50 steps.

The checks live in ``benchmarks/gpu_checks.py`` so that ``benchmarks/gpu_suite.sh`` runs them on a
machine without pytest; here they run under pytest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_checks  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup() -> "gpu_checks.Setup":
    from common import allow_recompiles

    allow_recompiles(32)  # one flex compilation per attention shape below
    return gpu_checks.Setup.detect(cpu_smoke=False)


def _assert_all(checks: list) -> None:
    assert checks, "no check ran"
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("sp", [1, 2, 4])
@pytest.mark.parametrize("frames", [8, 32])
def test_backends_forward_match_reference(setup, frames: int, sp: int) -> None:
    _assert_all(gpu_checks.attention_check(setup, frames, sp, backward=False))


@pytest.mark.parametrize("sp", [1, 4])
@pytest.mark.parametrize("frames", [8, 32])
def test_flex_and_flash_backward_match_reference(setup, frames: int, sp: int) -> None:
    checks = gpu_checks.attention_check(setup, frames, sp, backward=True)
    names = {c.name.split()[-1] for c in checks}
    assert {"flash", "merged"} <= names and ("flex" in names or gpu_checks._flex() is None), names
    _assert_all(checks)


def test_f128_sampled_rows_match_reference(setup) -> None:
    """At 128 latent frames the L^2 reference does not fit: rows of three query blocks are checked."""
    _assert_all(gpu_checks.attention_check(setup, 128, 4, backward=False))


@pytest.mark.parametrize("backend", ["te", "torchao", "torch"])
def test_fp8_linear_close_to_bf16(setup, backend: str) -> None:
    if backend not in gpu_checks.fp8_backends_here(setup):
        pytest.skip(f"FP8 backend {backend} not available on {torch.cuda.get_device_name()}")
    _assert_all([gpu_checks.fp8_linear_check(setup, backend, 1536, 8960, 4097)])


def test_fp8_loss_within_2_percent_of_bf16_over_50_steps(setup) -> None:
    here = gpu_checks.fp8_backends_here(setup)
    if not here:
        pytest.skip("no FP8 on this GPU (needs compute capability >= 8.9)")
    args = argparse.Namespace(preset="lite", train_frames=9, latent=64, batch=1, fp8_recipe="delayed")
    _assert_all([gpu_checks.fp8_loss_check(setup, args, here[0], gpu_checks.LOSS_STEPS)])
