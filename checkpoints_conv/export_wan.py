"""Export DualForce's video tower back to Wan2.1's layout (original or diffusers) — the inverse of import_wan.

    python -m checkpoints_conv.export_wan SRC OUT [--format original|diffusers] [--dtype fp32|bf16]
        [--max-shard-size 5GB]

SRC: any DualForce weights (bundle, converted checkpoint, import output, or one ``.safetensors``).
OUT receives ``diffusion_pytorch_model.safetensors`` (sharded with an index above the size limit);
for ``--format diffusers`` also a ``config.json`` for ``WanTransformer3DModel.from_pretrained`` when
SRC has our ``config.json``. ``export_report.json`` lists the video-tower tensors Wan has no slot for
(audio conditioning) and counts the dropped non-video tensors.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from dualforce_mega.bundle import CONFIG_NAME, iter_tensors, read_config
from dualforce_mega.cli import run_main
from dualforce_mega.config import ModelConfig
from dualforce_mega.fsutil import refuse_overlap

from . import wan_keys as wk
from .safetensors_io import DTYPES, parse_size, write_state_dict
from .zero_to_safetensors import DEFAULT_MAX_SHARD

log = logging.getLogger(__name__)

WAN_BASENAME = "diffusion_pytorch_model"
REPORT_NAME = "export_report.json"


def export_wan_state(src: Path, fmt: str = "original") -> tuple[dict[str, torch.Tensor], dict]:
    if fmt not in wk.FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(wk.FORMATS)}")
    out: dict[str, torch.Tensor] = {}
    not_exported: list[str] = []
    dropped = 0
    for key, t in iter_tensors(src):
        if not key.startswith(wk.VIDEO_PREFIX):
            dropped += 1
            continue
        inner = key[len(wk.VIDEO_PREFIX):]
        if wk.to_original(inner, "original") is None:
            not_exported.append(key)
            continue
        out[wk.from_original(inner, fmt)] = t
    if not out:
        raise ValueError(f"{src}: no video-tower tensors ('{wk.VIDEO_PREFIX}*') to export")
    return out, {"source": str(src), "format": fmt, "exported": len(out), "not_exported": not_exported,
                 "dropped_non_video": dropped}


def diffusers_config(m: ModelConfig) -> dict:
    """``WanTransformer3DModel`` constructor arguments for our video tower's shapes."""
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(m.patch_size),
            "num_attention_heads": m.heads, "attention_head_dim": m.head_dim, "in_channels": m.in_channels,
            "out_channels": m.out_channels, "text_dim": m.text_dim, "freq_dim": m.freq_dim, "ffn_dim": m.ffn_dim,
            "num_layers": m.layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads" if m.qk_norm else None, "eps": m.eps}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints_conv.export_wan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--format", default="original", choices=wk.FORMATS)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_overlap({"OUT": args.out}, {"SRC": args.src})
    state, report = export_wan_state(args.src, args.format)
    args.out.mkdir(parents=True, exist_ok=True)
    write_state_dict(args.out, state, parse_size(args.max_shard_size), DTYPES[args.dtype],
                     {"source": str(args.src)}, base=WAN_BASENAME)
    if args.format == "diffusers" and args.src.is_dir() and (args.src / CONFIG_NAME).is_file():
        (args.out / CONFIG_NAME).write_text(json.dumps(diffusers_config(read_config(args.src).model), indent=1))
    (args.out / REPORT_NAME).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in report.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
