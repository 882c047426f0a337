"""Training run -> inference bundle for eval/ and the sampler (read with ``dualforce_mega.bundle.load_bundle``).

    python -m checkpoints_conv.export_bundle RUN_DIR OUT_DIR [--tag TAG] [--dtype fp32|bf16]
        [--max-shard-size 5GB] [--config FILE] [--overwrite]

Writes consolidated weights (from the ZeRO checkpoint), ``config.json`` (the run's full resolved
Config), ``stats.json`` (the ``stats`` of the training shards' ``index.json``, when found),
``ema/`` (only when the run kept EMA weights, see below) and ``bundle.json`` (manifest). The bundle
is assembled in a temporary sibling directory and renamed into place, so an interrupted export never
leaves a half-written bundle, and an existing OUT_DIR is only replaced with ``--overwrite``.

EMA: a run with ``train.ema_decay > 0`` saves, per tag, each rank's ZeRO-3-style piece of the EMA under
``checkpoints/<tag>/ema/rank_*.safetensors`` (``dualforce_mega/training/ema.py``); the export reassembles
them one tensor at a time into the bundle's ``ema/`` (same layout as the main weights), which
``load_bundle`` / ``eval.generate`` use by default (``--weights model`` picks the raw weights).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from dualforce_mega.bundle import EMA_DIR, MANIFEST_NAME, STATS_NAME, has_ema
from dualforce_mega.cli import run_main
from dualforce_mega.config import Config
from dualforce_mega.fsutil import refuse_overlap
from dualforce_mega.training.ema import ema_shapes, has_ema_shards, iter_ema_tensors
from dualforce_mega.training.zero_reader import locate

from .safetensors_io import DTYPES, ShardedWriter, TensorSpec, output_dtype, parse_size
from .zero_to_safetensors import DEFAULT_MAX_SHARD, convert, resolve_config

log = logging.getLogger(__name__)

SHARD_INDEX = "index.json"   # written next to the tar shards by dualforce_mega.data.shard_writer
BUNDLE_FORMAT = 1


def find_shard_index(cfg: Config) -> Optional[Path]:
    """The ``index.json`` of the training shards: ``data.shards`` is a directory, a glob or a comma list."""
    spec = cfg.data.shards.strip()
    if not spec:
        return None
    found: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        p = Path(part)
        dirs = [p] if p.is_dir() else sorted({Path(f).parent for f in glob.glob(part)})
        for d in dirs:
            if (d / SHARD_INDEX).is_file() and (d / SHARD_INDEX) not in found:
                found.append(d / SHARD_INDEX)
    if len(found) > 1:
        log.warning("data.shards spans %d shard indexes; using the statistics of %s", len(found), found[0])
    return found[0] if found else None


def read_shard_stats(cfg: Config) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    index = find_shard_index(cfg)
    if index is None:
        return None, None
    try:
        stats = json.loads(index.read_text()).get("stats")
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: invalid JSON: {e}") from e
    return (stats or None), index


def check_output(run_dir: Path, out_dir: Path, tag: Optional[str], config: Optional[Path]) -> None:
    """OUT_DIR (replaced with --overwrite) must not be, contain or lie inside anything the export reads:
    the run / checkpoint directory, the config, the training shards (their stats go into the bundle)."""
    loc = locate(run_dir, tag)
    inputs: dict[str, Optional[Path]] = {"RUN_DIR": run_dir, "checkpoint": loc.tag_dir, "--config": config,
                                         "config": loc.run_dir / "config.yaml" if loc.run_dir else None}
    if config or loc.run_dir:
        index = find_shard_index(resolve_config(loc.run_dir, config, run_dir))
        inputs["data.shards"] = index.parent if index is not None else None
    refuse_overlap({"OUT_DIR": out_dir}, inputs, replaced=True)
def export_ema(tag_dir: Path, out_dir: Path, dtype: str, max_shard_size: str) -> int:
    """The EMA of a checkpoint tag as safetensors in ``out_dir`` (streamed: one tensor at a time)."""
    specs = [TensorSpec(name, shape, output_dtype(torch.float32, DTYPES[dtype]))
             for name, shape in ema_shapes(tag_dir).items()]
    writer = ShardedWriter(Path(out_dir), specs, parse_size(max_shard_size), {"source": str(Path(tag_dir) / EMA_DIR)})
    for name, t in iter_ema_tensors(tag_dir):
        writer.add(name, t)
    writer.close()
    return len(specs)


def export_bundle(run_dir: Path, out_dir: Path, tag: Optional[str] = None, dtype: str = "fp32",
                  max_shard_size: str = DEFAULT_MAX_SHARD, config: Optional[Path] = None,
                  overwrite: bool = False) -> Path:
    out_dir = Path(out_dir)
    check_output(Path(run_dir), out_dir, tag, config)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    tmp = out_dir.with_name(f".partial-{out_dir.name}.{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        res = convert(Path(run_dir), tmp, dtype, tag, max_shard_size, config, require_config=True)
        cfg = res.config
        stats, stats_src = read_shard_stats(cfg)
        if stats is not None:
            (tmp / STATS_NAME).write_text(json.dumps(stats, indent=1))
        else:
            log.warning("no normalisation statistics: no index.json with 'stats' for data.shards=%r",
                        cfg.data.shards)
        loc = locate(Path(run_dir), tag)
        ema_src = loc.tag_dir / EMA_DIR
        if has_ema_shards(loc.tag_dir):
            n = export_ema(loc.tag_dir, tmp / EMA_DIR, dtype, max_shard_size)
            ema_note = f"reassembled from {ema_src} ({n} tensors, decay {cfg.train.ema_decay})"
        elif cfg.train.ema_decay > 0:
            ema_note = f"train.ema_decay={cfg.train.ema_decay} but {ema_src} holds no EMA rank files"
            log.warning("%s", ema_note)
        else:
            ema_note = "none: the run kept no EMA (train.ema_decay=0)"
        manifest = {"format": BUNDLE_FORMAT, "source": str(loc.tag_dir), "tag": res.tag, "step": res.step,
                    "zero_stage": res.stage, "world_size": res.world_size, "dtype": dtype,
                    "weights": [p.name for p in res.files], "tensors": res.num_tensors,
                    "parameters": res.num_elements,
                    "stats": str(stats_src) if stats is not None else None, "ema": has_ema(tmp), "ema_note": ema_note}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # never leave a half-built bundle behind
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".old-{out_dir.name}.{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    log.info("bundle %s: step %s, %d tensors, stats=%s, ema=%s", out_dir, res.step, res.num_tensors,
             stats is not None, manifest["ema"])
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints_conv.export_bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="run directory (config.yaml + checkpoints/) or a checkpoint tag dir")
    ap.add_argument("out", type=Path, help="bundle directory (not inside, and not containing, the run)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = export_bundle(args.run_dir, args.out, args.tag, args.dtype, args.max_shard_size, args.config,
                        args.overwrite)
    print((out / MANIFEST_NAME).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
