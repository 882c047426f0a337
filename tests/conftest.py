"""Shared test set-up: CPU defaults, GPU-test skipping, deterministic seeds, the tiny model config."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch

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
