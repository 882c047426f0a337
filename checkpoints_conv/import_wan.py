"""Import Wan2.1-T2V weights (original or diffusers layout) into DualForce's video tower.

    python -m checkpoints_conv.import_wan SRC OUT [--layers 0-19] [--preset lite]
        [--format auto|original|diffusers] [--init-struct-from-video] [--config FILE] [--set k=v ...]
        [--seed 0] [--dtype fp32|bf16] [--max-shard-size 5GB]

SRC: a ``.safetensors`` file, a directory with one, or a diffusers directory with a sharded
``*.safetensors.index.json``. OUT receives a full DualForce checkpoint (``model.safetensors`` +
``config.json``, loadable by ``dualforce_mega.bundle.load_bundle`` and usable to initialise
training): the video tower from Wan, everything else (struct tower, bridge, audio, aux heads) at
the model's own initialisation for ``--seed``, plus ``import_report.json`` listing every mapped,
skipped, unmapped and reshaped key. The key map is in docs/WAN_IMPORT.md.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dualforce_mega.bundle import iter_tensors, weight_files
from dualforce_mega.cli import run_main
from dualforce_mega.config import Config, load_config
from dualforce_mega.fsutil import refuse_overlap
from dualforce_mega.models import DualForceModel

from . import wan_keys as wk
from .safetensors_io import DTYPES, parse_size, write_state_dict
from .zero_to_safetensors import DEFAULT_MAX_SHARD, write_config_json

log = logging.getLogger(__name__)

REPORT_NAME = "import_report.json"
PATCH_KEY = "patch_embedding.weight"
STRUCT_INIT_PARTS = ("self_attn.", "ffn.", "modulation")  # block parts whose video weights seed the struct tower


class WanImportError(ValueError):
    """A source tensor cannot be placed; the message names the key and both shapes."""


@dataclass
class ImportReport:
    source: str
    format: str
    prefix: str
    source_layers: int
    layers: list[int]
    mapped: dict[str, str] = field(default_factory=dict)            # source key -> our key
    reshaped: dict[str, dict] = field(default_factory=dict)         # our key -> {source, from, to, how}
    skipped: dict[str, str] = field(default_factory=dict)           # source key -> reason
    unmapped: list[str] = field(default_factory=list)               # source keys with no counterpart
    not_imported: list[str] = field(default_factory=list)           # our video.* keys left at initialisation
    struct_from_video: dict[str, str] = field(default_factory=dict)  # struct key -> video key copied

    def summary(self) -> dict:
        return {"source": self.source, "format": self.format, "layers": self.layers, "mapped": len(self.mapped),
                "reshaped": len(self.reshaped), "skipped": len(self.skipped), "unmapped": len(self.unmapped),
                "not_imported": len(self.not_imported), "struct_from_video": len(self.struct_from_video)}


def _source_keys(src: Path) -> list[str]:
    return sorted(weight_files(src))


def import_wan_state(src: Path, cfg: Config, layers: Optional[str] = None, fmt: str = "auto",
                     init_struct_from_video: bool = False, seed: int = 0
                     ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Build ``DualForceModel(cfg.model)`` (initialised with ``seed``) and fill its video tower from SRC."""
    keys = _source_keys(src)
    prefix = wk.strip_known_prefix(keys)
    stripped = [k[len(prefix):] for k in keys]
    if fmt == "auto":
        fmt = wk.detect_format(stripped)
    if fmt not in wk.FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of auto, {', '.join(wk.FORMATS)}")
    available = wk.num_blocks(stripped)
    sel = wk.parse_layers(layers, available, cfg.model.layers)
    if len(sel) != cfg.model.layers:
        raise WanImportError(f"--layers selects {len(sel)} layers but model.layers={cfg.model.layers}")
    renumber = {s: i for i, s in enumerate(sel)}
    report = ImportReport(str(src), fmt, prefix, available, sel)

    torch.manual_seed(seed)
    model = DualForceModel(cfg.model)
    target = model.state_dict()
    filled: set[str] = set()
    with torch.no_grad():
        for key, tensor in iter_tensors(src):
            k = key[len(prefix):]
            if wk.is_i2v(k, fmt):
                report.skipped[key] = "image-to-video branch (CLIP image context); DualForce has no such input"
                continue
            orig = wk.to_original(k, fmt)
            if orig is None:
                report.unmapped.append(key)
                continue
            blk = wk.split_block(orig)
            if blk is not None:
                if blk[0] not in renumber:
                    report.skipped[key] = f"layer {blk[0]} not selected by --layers"
                    continue
                orig = f"blocks.{renumber[blk[0]]}.{blk[1]}"
            ours = wk.VIDEO_PREFIX + orig
            if ours not in target:
                report.skipped[key] = f"the target model has no {ours} (model.text_dim=0 or model.qk_norm off?)"
                continue
            _place(key, tensor, ours, target[ours], report)
            report.mapped[key] = ours
            filled.add(ours)
        _require_complete(src, target, filled, fmt, prefix, sel)
        report.not_imported = sorted(k for k in target if k.startswith(wk.VIDEO_PREFIX) and k not in filled)
        if init_struct_from_video:
            _init_struct(target, report)
    return target, report


def _place(src_key: str, tensor: torch.Tensor, ours: str, dst: torch.Tensor, report: ImportReport) -> None:
    src_shape, dst_shape = tuple(tensor.shape), tuple(dst.shape)
    if src_shape == dst_shape:
        dst.copy_(tensor)
        return
    grows_inputs = (ours.endswith(PATCH_KEY) and len(src_shape) == len(dst_shape) and dst_shape[1] > src_shape[1]
                    and src_shape[:1] + src_shape[2:] == dst_shape[:1] + dst_shape[2:])
    if not grows_inputs:
        raise WanImportError(f"{src_key} -> {ours}: source shape {src_shape} does not match the model's {dst_shape}")
    dst.zero_()
    dst[:, :src_shape[1]].copy_(tensor)
    report.reshaped[ours] = {"source": src_key, "from": list(src_shape), "to": list(dst_shape),
                             "how": f"input channels {src_shape[1]}..{dst_shape[1] - 1} zero-initialised"}


def _require_complete(src: Path, target: dict, filled: set, fmt: str, prefix: str, sel: list[int]) -> None:
    """Every Wan tensor our video tower has a slot for must come from the source."""
    expected = [k for k in wk.GLOBAL_MAP if wk.VIDEO_PREFIX + k in target]
    expected += [f"blocks.{i}.{inner}" for i in range(len(sel)) for inner in wk.BLOCK_MAP
                 if f"{wk.VIDEO_PREFIX}blocks.{i}.{inner}" in target]
    missing = []
    for k in expected:
        if wk.VIDEO_PREFIX + k not in filled:
            blk = wk.split_block(k)
            orig = f"blocks.{sel[blk[0]]}.{blk[1]}" if blk else k
            missing.append(prefix + wk.from_original(orig, fmt))
    if missing:
        raise WanImportError(f"{src}: lacks {len(missing)} tensor(s) the video tower needs, e.g. {missing[:6]}")


def _init_struct(target: dict[str, torch.Tensor], report: ImportReport) -> None:
    for key, dst in target.items():
        if not key.startswith("struct.blocks."):
            continue
        inner = key[len("struct."):]
        blk = wk.split_block(inner)
        if blk is None or not blk[1].startswith(STRUCT_INIT_PARTS):
            continue
        src_key = wk.VIDEO_PREFIX + inner
        if src_key in target and target[src_key].shape == dst.shape:
            dst.copy_(target[src_key])
            report.struct_from_video[key] = src_key


def build_import_config(config: Optional[Path], preset: Optional[str], overrides: list[str],
                        layers: Optional[str], src: Path) -> Config:
    """Config for the target model; ``--layers`` with a different count overrides model.layers."""
    sets = list(overrides)
    if preset:
        sets.insert(0, f"model.preset={preset}")
    elif config is None:
        sets.insert(0, "model.preset=lite")
    cfg = load_config(str(config) if config else None, sets)
    if layers is not None:
        keys = _source_keys(src)
        prefix = wk.strip_known_prefix(keys)
        n = len(wk.parse_layers(layers, wk.num_blocks([k[len(prefix):] for k in keys]), cfg.model.layers))
        if n != cfg.model.layers:
            log.info("--layers selects %d layers: setting model.layers=%d (preset had %d)", n, n, cfg.model.layers)
            cfg = load_config(str(config) if config else None, sets + [f"model.layers={n}"])
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints_conv.import_wan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", default=None,
                    help="source layers: a-b, a,b,c or N (first N); default: the first model.layers")
    ap.add_argument("--preset", default=None, help="model preset (default lite unless --config is given)")
    ap.add_argument("--config", type=Path, default=None, help="YAML config of the target model/run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--format", default="auto", choices=("auto",) + wk.FORMATS)
    ap.add_argument("--init-struct-from-video", action="store_true",
                    help="copy the imported video blocks' self-attention, FFN and modulation into the struct tower")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed of the parts Wan does not provide")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_overlap({"OUT": args.out}, {"SRC": args.src, "--config": args.config})
    cfg = build_import_config(args.config, args.preset, args.overrides, args.layers, args.src)
    state, report = import_wan_state(args.src, cfg, args.layers, args.format, args.init_struct_from_video, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_state_dict(args.out, state, parse_size(args.max_shard_size), DTYPES[args.dtype],
                     {"source": str(args.src), "imported_from": f"wan2.1/{report.format}"})
    write_config_json(cfg, args.out)
    (args.out / REPORT_NAME).write_text(json.dumps(asdict(report), indent=1))
    for key in report.unmapped:
        log.warning("unmapped source tensor (not imported): %s", key)
    for key, how in report.reshaped.items():
        log.warning("reshaped %s: %s -> %s, %s", key, how["from"], how["to"], how["how"])
    log.info("%d source tensors skipped, %d video-tower tensors left at initialisation; details in %s",
             len(report.skipped), len(report.not_imported), args.out / REPORT_NAME)
    print(json.dumps(report.summary(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
