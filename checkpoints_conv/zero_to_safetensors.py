"""DeepSpeed ZeRO checkpoint (stage 1-3, any world size) -> consolidated safetensors + config.json.

    python -m checkpoints_conv.zero_to_safetensors RUN_OR_CHECKPOINT_DIR OUT_DIR \\
        [--dtype fp32|bf16] [--tag TAG] [--max-shard-size 5GB] [--config CONFIG.yaml]

RUN_OR_CHECKPOINT_DIR is a run directory (``config.yaml`` + ``checkpoints/``), its ``checkpoints/``
directory, or one tag directory. Without ``--tag`` the tag named by ``checkpoints/latest`` is used.
The fp32 master weights are read from the per-rank optimizer files and written shard by shard:
peak memory is about one output shard plus one tensor. Tensor names are the model's state_dict keys.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dualforce_mega.bundle import CONFIG_NAME
from dualforce_mega.config import Config, load_config
from dualforce_mega.cli import run_main
from dualforce_mega.fsutil import atomic_write, refuse_overlap

from .safetensors_io import DTYPES, ShardedWriter, TensorSpec, output_dtype, parse_size
from dualforce_mega.training.zero_reader import ZeroCheckpoint, ZeroCheckpointError, locate

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD = "5GB"


@dataclass
class ConversionResult:
    out_dir: Path
    files: list[Path]
    tag: str
    step: Optional[int]
    stage: int
    world_size: int
    num_tensors: int
    num_elements: int
    config: Optional[Config]


def write_config_json(cfg: Config, out_dir: Path) -> Path:
    path = Path(out_dir) / CONFIG_NAME
    atomic_write(path, json.dumps(cfg.to_dict(), indent=1), path.with_name(f".{CONFIG_NAME}.partial"))
    return path


def resolve_config(run_dir: Optional[Path], config: Optional[Path], source: Path) -> Config:
    path = Path(config) if config else (run_dir / "config.yaml" if run_dir else None)
    if path is None:
        raise ZeroCheckpointError(f"{source}: no config.yaml found in the run directory (looked next to "
                                  f"checkpoints/ and above the tag); pass --config FILE")
    return load_config(str(path))


def convert(src: Path, out_dir: Path, dtype: str = "fp32", tag: Optional[str] = None,
            max_shard_size: str = DEFAULT_MAX_SHARD, config: Optional[Path] = None,
            require_config: bool = True) -> ConversionResult:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    loc = locate(Path(src), tag)
    cfg = None
    if require_config or config or loc.run_dir:
        cfg = resolve_config(loc.run_dir, config, Path(src))
    ckpt = ZeroCheckpoint(loc.tag_dir)
    ckpt.remap_bytes = parse_size(max_shard_size)
    target = DTYPES[dtype]
    specs = [TensorSpec(n, shape, output_dtype(dt, target)) for n, shape, dt in ckpt.specs()]
    meta = {"source": str(loc.tag_dir), "tag": loc.tag, "zero_stage": str(ckpt.stage),
            "world_size": str(ckpt.world)}
    if ckpt.global_steps is not None:
        meta["global_steps"] = str(ckpt.global_steps)
    writer = ShardedWriter(Path(out_dir), specs, parse_size(max_shard_size), meta)
    log.info("%s: ZeRO-%d, %d ranks, %d tensors -> %s (%d file(s), %s)", loc.tag_dir, ckpt.stage, ckpt.world,
             len(specs), out_dir, len(writer.names), dtype)
    for name, t in ckpt.tensors():
        writer.add(name, t)
    files = writer.close()
    if cfg is not None:
        write_config_json(cfg, Path(out_dir))
    return ConversionResult(Path(out_dir), files, loc.tag, ckpt.global_steps, ckpt.stage, ckpt.world, len(specs),
                            sum(torch.Size(s.shape).numel() for s in specs), cfg)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints_conv.zero_to_safetensors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="run directory, its checkpoints/ directory, or a tag directory")
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the one in checkpoints/latest)")
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD)
    ap.add_argument("--config", type=Path, default=None, help="config.yaml when SRC is not inside a run directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_overlap({"OUT_DIR": args.out}, {"SRC": args.src, "--config": args.config})
    loc = locate(args.src, args.tag)
    refuse_overlap({"OUT_DIR": args.out}, {"checkpoint": loc.tag_dir,
                                          "config": loc.run_dir / "config.yaml" if loc.run_dir else None})
    res = convert(args.src, args.out, args.dtype, args.tag, args.max_shard_size, args.config)
    print(json.dumps({"out": str(res.out_dir), "files": [p.name for p in res.files], "tag": res.tag,
                      "step": res.step, "zero_stage": res.stage, "world_size": res.world_size,
                      "tensors": res.num_tensors, "elements": res.num_elements}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
