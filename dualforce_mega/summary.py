"""Parameter counts of a DualForce model, split into components that partition the total.

    python -m dualforce_mega.summary --preset lite [--json] [--set model.key=value ...]

The model is built on the meta device, so ``lite`` / ``wan1.3b`` cost no memory. Other code
(the memory planner, the trainer's start-up log) imports ``classify_parameter`` /
``count_parameters`` so that every place reports the same split.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .config import Config, ConfigError, add_config_arguments, config_from_args

# Order of the report; every trainable parameter falls into exactly one of these.
COMPONENTS: tuple[str, ...] = ("video_tower", "struct_tower", "bridge", "audio", "adaln", "aux_heads", "text")

COMPONENT_HELP: dict[str, str] = {
    "video_tower": "patch embedding, self-attention, FFN, output head (video DiT)",
    "struct_tower": "motion tokenizer, self-attention, FFN, output head (struct DiT)",
    "bridge": "video<->struct cross-attention in the first fusion_depth layers",
    "audio": "audio projectors + gated audio cross-attention in both towers",
    "adaln": "sigma embedding MLPs, per-block and head modulation tables, keypoint embedding",
    "aux_heads": "FLAME regression and lip-sync embedding heads",
    "text": "text embedding MLP + text cross-attention (video tower)",
}

_TOWERS = {"video": "video_tower", "struct": "struct_tower"}
# Sub-module names inside a tower (first name after the tower, or after ``blocks.<i>.``).
_TOWER_AUDIO = {"audio_projector", "audio_attn"}
_TOWER_ADALN = {"time_embedding", "time_projection", "kp_embedding", "modulation"}
_TOWER_TEXT = {"text_embedding", "cross_attn", "norm3"}
# Wrappers (DeepSpeed engine, DDP, torch.compile) prefix the model's own names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def classify_parameter(name: str) -> str:
    """Component of a parameter given its ``named_parameters()`` name.

    Raises ``ValueError`` for a name outside the known layout, so a new module has to be
    classified here rather than silently counted somewhere.
    """
    stripped = name
    while stripped.startswith(_WRAPPER_PREFIXES):
        stripped = stripped.split(".", 1)[1]
    parts = stripped.split(".")
    top = parts[0]
    if top == "bridge":
        return "bridge"
    if top == "aux":
        return "aux_heads"
    if top not in _TOWERS or len(parts) < 2:
        raise ValueError(f"parameter {name!r}: not part of a known DualForce component "
                         f"(top-level modules: {sorted(_TOWERS) + ['aux', 'bridge']})")
    rest = parts[1:]
    if rest[0] == "blocks":
        if len(rest) < 3:
            raise ValueError(f"parameter {name!r}: expected blocks.<index>.<module>")
        sub = rest[2]
    elif rest[0] == "head":
        # the head's linear is the tower's output layer; its (1, 2, dim) table is AdaLN
        sub = rest[1]
    else:
        sub = rest[0]
    if sub in _TOWER_AUDIO:
        return "audio"
    if sub in _TOWER_ADALN:
        return "adaln"
    if sub in _TOWER_TEXT:
        return "text"
    return _TOWERS[top]


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 replaces partitioned parameters by empty tensors and keeps the true size in ds_numel
    return int(getattr(p, "ds_numel", p.numel()))


def count_parameters(named_parameters: Iterable[tuple[str, nn.Parameter]], trainable_only: bool = True
                     ) -> dict[str, int]:
    """Per-component parameter counts plus ``total_trainable`` (or ``total`` if not trainable_only).

    Asserts that the components partition the total (each parameter counted exactly once).
    """
    counts = {c: 0 for c in COMPONENTS}
    total = 0
    seen: set[int] = set()
    for name, p in named_parameters:
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:  # tied / shared parameters count once
            continue
        seen.add(id(p))
        n = _numel(p)
        counts[classify_parameter(name)] += n
        total += n
    if sum(counts.values()) != total:
        raise AssertionError(f"components sum to {sum(counts.values())}, total is {total}")
    counts["total_trainable" if trainable_only else "total"] = total
    return counts


def build_meta_model(cfg: Config) -> nn.Module:
    """The full model with meta tensors: shapes and names without memory or initialisation cost."""
    from .models import DualForceModel

    with torch.device("meta"):
        return DualForceModel(cfg.model)


def summarize(cfg: Config) -> dict:
    model = build_meta_model(cfg)
    counts = count_parameters(model.named_parameters())
    m = cfg.model
    return {
        "preset": m.preset,
        "model": {k: getattr(m, k) for k in ("dim", "heads", "ffn_dim", "layers", "fusion_depth", "audio_layers",
                                             "struct_tower", "audio", "bridge", "audio_dim", "text_dim")},
        **counts,
    }


def format_table(summary: dict) -> str:
    total = summary["total_trainable"]
    width = max(len(c) for c in COMPONENTS + ("total_trainable",))
    m = summary["model"]
    lines = [f"preset {summary['preset']}: dim={m['dim']} heads={m['heads']} ffn={m['ffn_dim']} "
             f"layers/tower={m['layers']} fusion={m['fusion_depth']} audio_layers={m['audio_layers']} "
             f"struct_tower={m['struct_tower']} audio={m['audio']} text_dim={m['text_dim']}",
             f"{'component':<{width}}  {'params':>15}  {'share':>6}  what"]
    for c in COMPONENTS:
        n = summary[c]
        share = 100.0 * n / total if total else 0.0
        lines.append(f"{c:<{width}}  {n:>15,}  {share:>5.1f}%  {COMPONENT_HELP[c]}")
    lines.append(f"{'total_trainable':<{width}}  {total:>15,}  {100.0:>5.1f}%")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dualforce_mega.summary", description=__doc__.split("\n")[0])
    add_config_arguments(parser, preset=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(cfg)
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
