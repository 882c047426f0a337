"""Python side of the ``launch/*.sh`` polyglot scripts: what each rank runs under DeepSpeed's launcher.

Adds the script's defaults (phase, and the phase config on GPU machines or the tiny CPU config in the
script's own run directory ``runs/tiny_cpu_phase<N>`` without GPUs, unless ``--config`` is given; or
another task's own config) and hands over to ``train.main``. The bash side (``launch/common.sh``) adds the
same defaults.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .train import main as train_main

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "launch" / "configs"
# options of the bash side that mean nothing once a launcher has started the ranks
_BASH_ONLY = ("--nproc", "--hostfile", "--master_addr", "--master_port", "--master-addr", "--master-port",
              "--nnodes", "--node-rank", "--node_rank")


def default_config(phase: int, has_gpu: bool) -> Path:
    return CONFIG_DIR / (f"phase{phase}.yaml" if has_gpu else "tiny_cpu.yaml")


def default_sets(phase: int, has_gpu: bool) -> list[str]:
    """Overrides that come with the default config: without GPUs both scripts share tiny_cpu.yaml, so each
    gets its own run directory (a Phase 4 start never resumes the Phase 2 run)."""
    if has_gpu:
        return []
    return ["--set", f"run.dir=runs/tiny_cpu_phase{phase}", "--set", f"run.name=tiny_cpu_phase{phase}"]


def script_args(phase: Optional[int], argv: list[str], has_gpu: bool, config: Optional[str] = None) -> list[str]:
    """The rank's arguments: without ``--config``, ``config`` (a task's own config) or the phase's default;
    DualForce's scripts (``phase`` set) put ``--set train.phase=<phase>`` first."""
    args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in _BASH_ONLY:
            log.warning("%s is ignored here: the launcher that started this rank fixed the world", name)
            i += 1 if "=" in arg else 2
            continue
        args.append(arg)
        i += 1
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        if config:
            args = ["--config", str(CONFIG_DIR / config)] + args
        else:
            args = ["--config", str(default_config(phase, has_gpu))] + default_sets(phase, has_gpu) + args
    if phase is None:
        return args
    # the script's phase first: an explicit --set train.phase=... later on the command line still wins
    return ["--set", f"train.phase={phase}"] + args


def main(phase: Optional[int] = None, argv: Optional[list[str]] = None, config: Optional[str] = None) -> int:
    """``phase``: DualForce's launch scripts; ``config``: another task's default config file name."""
    import torch
    return train_main(script_args(phase, list(argv or []), torch.cuda.is_available(), config))
