"""Training entry point, run by every rank:

    python -m dualforce_mega.training.train --config FILE --set section.key=value ...

Started by ``launch/*.sh`` (DeepSpeed launcher) or any launcher that sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torchrun, deepspeed, srun wrappers). Without them it runs as a
single process. Running the same command again resumes from ``<run.dir>/checkpoints/latest``.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from ..config import ConfigError, add_config_arguments, save_config
from .preflight import preflight

log = logging.getLogger("dualforce_mega.training")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    # the DeepSpeed launcher appends --local_rank=N; LOCAL_RANK in the environment takes precedence
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def setup_logging(rank: int, run_dir: Optional[Path] = None) -> None:
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    root.setLevel(level)
    if run_dir is not None and rank == 0:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """No launcher: behave as rank 0 of a world of 1."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    _single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    setup_logging(rank)
    try:   # the same checks launch/*.sh ran before spawning, for direct `deepspeed` / torchrun users
        cfg, _, _ = preflight(args.config, args.overrides, world)
    except ConfigError as e:
        log.error("%s", e)
        return 2

    import deepspeed
    import torch

    from ..parallel.groups import init_groups
    from .data_setup import ensure_data
    from .trainer import Trainer

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"    # DeepSpeed's CPU accelerator would pick oneCCL
    deepspeed.init_distributed(dist_backend=backend)
    groups = init_groups(cfg.parallel.sp)

    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    setup_logging(rank, run_dir)
    cfg = ensure_data(cfg, rank)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg, groups, device, rank, world)
    trainer.fit()
    torch.distributed.barrier()
    log.info("training finished: %s", run_dir)
    torch.distributed.destroy_process_group()
    log.info("process group destroyed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
