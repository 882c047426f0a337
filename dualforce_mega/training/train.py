"""Training entry point, run by every rank:

    python -m dualforce_mega.training.train --config FILE --set section.key=value ...

Started by ``launch/*.sh`` (``dualforce_mega.training.launcher``), the DeepSpeed launcher or any launcher
that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torchrun, srun wrappers). Without
them it runs as a single process. Running the same command again resumes from
``<run.dir>/checkpoints/latest``; a finished run exits at once. Exit codes: ``training/exit_codes.py``.
A user error ends with one line (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
from datetime import timedelta
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from ..cli import USER_ERRORS, debug_requested, error_line, strip_debug
from ..config import ConfigError, add_config_arguments, save_config
from . import exit_codes
from .preemption import StopSignals
from .preflight import finished, preflight
from .watchdog import diagnose

log = logging.getLogger("dualforce_mega.training")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    # the DeepSpeed launcher appends --local_rank=N; LOCAL_RANK in the environment takes precedence
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def setup_logging(rank: int, run_dir: Optional[Path] = None) -> None:
    """stderr: INFO on rank 0, WARNING on the others. ``<run.dir>/train.log``: the same records of every
    rank (one appended line per record, each prefixed with its rank)."""
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    root.setLevel(level)
    if run_dir is not None:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setLevel(level)
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
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(strip_debug(raw))
    _single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    setup_logging(rank)
    try:   # the same checks launch/*.sh ran before spawning, for direct `deepspeed` / torchrun users
        cfg, _, _ = preflight(args.config, args.overrides, world)
        done = finished(cfg)
    except ConfigError as e:
        log.error("%s", e)
        return exit_codes.USER_ERROR
    if done:               # before any process group exists: nothing to tear down
        log.info("%s", done)
        return exit_codes.OK
    signals = StopSignals(cfg.run.preempt_signals)   # from here on a preemption signal is a clean stop
    try:
        return _train(cfg, rank, world, local_rank, signals)
    except exit_codes.TrainingStop as e:
        log.log(logging.ERROR if e.error else logging.WARNING, "%s", e)
        return e.exit_code
    except USER_ERRORS as e:
        if debug_requested(raw):
            raise
        log.error("%s", error_line(e))
        return exit_codes.USER_ERROR


def _train(cfg, rank: int, world: int, local_rank: int, signals: StopSignals) -> int:
    import deepspeed
    import torch

    from ..parallel.groups import init_groups
    from .recipe import recipe_for
    from .supervision import Supervisor
    from .trainer import Trainer

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"    # DeepSpeed's CPU accelerator would pick oneCCL
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.run.collective_timeout_s))
    groups = init_groups(cfg.parallel.sp)

    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    setup_logging(rank, run_dir)
    recipe = recipe_for(cfg)
    cfg = recipe.prepare(cfg, rank)      # data located / read; the resolved config is the run's config.yaml
    supervisor = Supervisor(cfg, rank, world, signals)
    trainer = Trainer(cfg, groups, device, rank, world, recipe, supervisor)

    def write_config() -> None:     # only once the checkpoint (if any) loaded into this model
        if rank == 0:
            save_config(cfg, run_dir / "config.yaml")

    try:
        trainer.fit(on_resumed=write_config)
    except exit_codes.TrainingStop as e:
        if e.collective:           # every rank stopped at the same point: leave the group cleanly
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        raise
    except RuntimeError as e:      # gloo / NCCL report a collective timeout as a RuntimeError
        if "timed out" not in str(e).lower():
            raise
        raise exit_codes.HangDetected(
            f"a collective timed out (run.collective_timeout_s={cfg.run.collective_timeout_s:g}): "
            f"{diagnose(supervisor.watchdog.dir, world, rank, supervisor.watchdog.period_s)}") from e
    finally:
        trainer.data.close()       # loader workers stop before the process group goes away
        supervisor.close()
    torch.distributed.barrier()
    log.info("training finished: %s", run_dir)
    torch.distributed.destroy_process_group()
    log.info("process group destroyed")
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
