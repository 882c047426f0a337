"""Checks that must fail before any rank starts: config, world/batch divisibility, shards, and what the
run directory already holds (a run of another model / phase is refused; a finished run starts nothing).

``launch/*.sh`` runs this module once before spawning ranks; ``train.py`` repeats the same checks on
every rank before initialising the process group (for users who call the DeepSpeed launcher directly).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from ..config import Config, ConfigError, add_config_arguments, load_config
from ..parallel.deepspeed_config import grad_accum_steps
from . import exit_codes
from .data_feed import logical_streams
from .phase import apply_phase
from .run_dir import check_run_dir


def check_shards(cfg: Config) -> int:
    """Configured shards exist, are non-empty and are enough for the logical data streams (see
    ``data_feed``); ``data.shards=""`` means synthetic shards, checked by count. Returns the shard count."""
    from ..data.schema import ShardSchema
    from ..data.shard_source import ShardSetError, resolve_shards

    streams = logical_streams(cfg) * max(1, cfg.data.workers)
    if not cfg.data.shards:
        if cfg.data.synthetic_shards < streams:
            raise ConfigError(f"data.synthetic_shards: {cfg.data.synthetic_shards} shards cannot feed "
                              f"{streams} streams (train.global_batch / train.micro_batch x max(1, data.workers))")
        return cfg.data.synthetic_shards
    try:
        shard_set = resolve_shards(cfg.data.shards, ShardSchema.from_model(cfg.model))
    except ShardSetError as e:
        raise ConfigError(str(e)) from e
    for ref in shard_set.shards:
        local = "://" not in ref.url and not ref.url.startswith("pipe:")
        if local and Path(ref.url).stat().st_size == 0:
            raise ConfigError(f"data.shards: {ref.url} is empty (0 bytes)")
        if ref.samples == 0:
            raise ConfigError(f"data.shards: {ref.url} holds no samples according to {shard_set.index_path}")
    if len(shard_set.shards) < streams:
        raise ConfigError(
            f"data.shards: {cfg.data.shards} has {len(shard_set.shards)} shards; this run reads {streams} "
            f"streams (train.global_batch / train.micro_batch = {logical_streams(cfg)} logical streams x "
            f"max(1, data.workers={cfg.data.workers})), each of whole shards")
    return len(shard_set.shards)


def check_world(cfg: Config, world_size: int) -> tuple[int, int]:
    """-> (data-parallel size, gradient accumulation steps)."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    sp = cfg.parallel.sp
    if world_size % sp != 0:
        raise ConfigError(f"parallel.sp: world size {world_size} is not divisible by parallel.sp={sp}")
    dp = world_size // sp
    return dp, grad_accum_steps(cfg, dp)


def hostfile_slots(path: str) -> int:
    """Total ``slots=N`` of a DeepSpeed hostfile (``host slots=N`` per line, # comments)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--hostfile {path}: file not found")
    total = 0
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        slots = [f for f in fields[1:] if f.startswith("slots=")]
        if len(slots) != 1 or not slots[0][len("slots="):].isdigit():
            raise ConfigError(f"{path}:{lineno}: expected 'hostname slots=N', got {line!r}")
        total += int(slots[0][len("slots="):])
    if total == 0:
        raise ConfigError(f"{path}: no hosts with slots")
    return total


def finished(cfg: Any) -> Optional[str]:
    """The message for a run whose latest checkpoint reached ``train.steps`` (nothing to do), else None
    (also when the task only knows its steps once it has read its data)."""
    from .recipe import recipe_for
    recipe = recipe_for(cfg)
    step = check_run_dir(cfg, recipe.derived_keys)
    steps = recipe.known_steps(cfg)
    if step is not None and steps is not None and step >= steps:
        return (f"nothing to do: {cfg.run.dir} is finished (checkpoint step {step} >= train.steps="
                f"{steps}); raise train.steps to train on")
    return None


def preflight(config: Optional[str], overrides: list[str], world_size: int) -> tuple[Any, int, int]:
    """The config of any task (``run.task``), its data-parallel size and gradient accumulation steps."""
    from .recipe import recipe_for
    cfg = load_config(config, overrides)
    if isinstance(cfg, Config):
        cfg = apply_phase(cfg)
        if cfg.train.init_from and not Path(cfg.train.init_from).exists():
            raise ConfigError(f"train.init_from: {cfg.train.init_from} does not exist")
    recipe = recipe_for(cfg)
    dp, accum = check_world(cfg, world_size)
    recipe.check(cfg, world_size)
    check_run_dir(cfg, recipe.derived_keys)
    return cfg, dp, accum


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Validate a training launch before any rank starts.")
    add_config_arguments(ap)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--world", type=int, help="number of ranks that will be started")
    group.add_argument("--hostfile", help="DeepSpeed hostfile (world = sum of slots)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    try:
        world = args.world if args.world is not None else hostfile_slots(args.hostfile)
        cfg, dp, accum = preflight(args.config, args.overrides, world)
        done = finished(cfg)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.USER_ERROR
    if done:
        print(done)
        return exit_codes.PREFLIGHT_FINISHED
    if isinstance(cfg, Config):
        what = f"phase={cfg.train.phase} data={cfg.data.shards or 'synthetic (written into the run directory by rank 0)'}"
    else:
        what = f"task={cfg.run.task}"
    print(f"preflight ok: world={world} sp={cfg.parallel.sp} dp={dp} micro_batch={cfg.train.micro_batch} "
          f"grad_accum={accum} global_batch={cfg.train.global_batch} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
