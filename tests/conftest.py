"""Shared test set-up: CPU defaults, GPU-test skipping, deterministic seeds, the tiny model config."""
from __future__ import annotations

import logging
import os
import platform
import random

# Numerics (set before torch runs a kernel; subprocesses inherit it): every x86-64 machine runs MKL's
# AVX2 GEMM kernels, the code path MKL takes on AMD EPYC CPUs. Their float sums depend on the thread
# count (1 vs 2 threads: ~3e-7 relative on a tiny-model forward), where the AVX-512 path of Intel CPUs
# happens to agree bit for bit. So a test asserting bit-equality of two computations done in different
# processes or with different thread counts -- never a property of the code -- fails on the developer's
# machine too, not only on an AMD CI host. Cross-process tests run their subprocesses with
# OMP_NUM_THREADS=1 and compare in the test process at its default thread count, with a stated
# tolerance. (ATEN_CPU_CAPABILITY=avx2 is not pinned: torch's bf16 kernels then fail on AVX-512 CPUs.)
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dualforce_mega.config import ModelConfig, model_preset

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # DeepSpeed picks its accelerator at import time; without this it probes for CUDA and fails
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

TEST_SEED = 0
# third-party loggers that flood captured output at DEBUG
_QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "matplotlib", "PIL")


def pytest_configure(config: pytest.Config) -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """A fresh tiny ModelConfig (tests may mutate it)."""
    return model_preset("tiny")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny shapes: one intra-op thread is far faster than several on a shared CPU (and keeps
    results independent of the host's thread count). Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
