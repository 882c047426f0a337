"""Key maps between Wan2.1's original layout, diffusers' ``WanTransformer3DModel`` and our video tower.

Our video tower uses Wan2.1's original module names, so ``<original key>`` <-> ``video.<original key>``
(with block indices renumbered by the layer selection). The diffusers layout renames modules; the
tables below are the complete list (docs/WAN_IMPORT.md prints them). Every weight keeps its shape in
all three layouts — only ``patch_embedding.weight`` may grow input channels on import.
"""
from __future__ import annotations

import re
from typing import Optional

VIDEO_PREFIX = "video."

# top-level tensors: original -> diffusers
GLOBAL_MAP: dict[str, str] = {
    "patch_embedding.weight": "patch_embedding.weight",
    "patch_embedding.bias": "patch_embedding.bias",
    "text_embedding.0.weight": "condition_embedder.text_embedder.linear_1.weight",
    "text_embedding.0.bias": "condition_embedder.text_embedder.linear_1.bias",
    "text_embedding.2.weight": "condition_embedder.text_embedder.linear_2.weight",
    "text_embedding.2.bias": "condition_embedder.text_embedder.linear_2.bias",
    "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
    "time_embedding.0.bias": "condition_embedder.time_embedder.linear_1.bias",
    "time_embedding.2.weight": "condition_embedder.time_embedder.linear_2.weight",
    "time_embedding.2.bias": "condition_embedder.time_embedder.linear_2.bias",
    "time_projection.1.weight": "condition_embedder.time_proj.weight",
    "time_projection.1.bias": "condition_embedder.time_proj.bias",
    "head.head.weight": "proj_out.weight",
    "head.head.bias": "proj_out.bias",
    "head.modulation": "scale_shift_table",          # [1, 2, dim]
}

# per-block tensors (after ``blocks.N.``): original -> diffusers
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
BLOCK_MAP: dict[str, str] = {}
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for _a, _b in _ATTN.items():
        for _p in ("weight", "bias"):
            BLOCK_MAP[f"{_ours}.{_a}.{_p}"] = f"{_theirs}.{_b}.{_p}"
    BLOCK_MAP[f"{_ours}.norm_q.weight"] = f"{_theirs}.norm_q.weight"
    BLOCK_MAP[f"{_ours}.norm_k.weight"] = f"{_theirs}.norm_k.weight"
BLOCK_MAP.update({
    "norm3.weight": "norm2.weight",                   # cross-attention LayerNorm (affine)
    "norm3.bias": "norm2.bias",
    "ffn.0.weight": "ffn.net.0.proj.weight",
    "ffn.0.bias": "ffn.net.0.proj.bias",
    "ffn.2.weight": "ffn.net.2.weight",
    "ffn.2.bias": "ffn.net.2.bias",
    "modulation": "scale_shift_table",               # [1, 6, dim]
})

# Wan2.1 image-to-video extras (CLIP image branch): recognised and skipped, our model has no such input.
I2V_PATTERNS_ORIGINAL = (r"^img_emb\.", r"^blocks\.\d+\.cross_attn\.(k_img|v_img|norm_k_img)\.")
I2V_PATTERNS_DIFFUSERS = (r"^condition_embedder\.image_embedder\.",
                          r"^blocks\.\d+\.attn2\.(add_k_proj|add_v_proj|norm_added_k)\.")

_GLOBAL_INV = {v: k for k, v in GLOBAL_MAP.items()}
_BLOCK_INV = {v: k for k, v in BLOCK_MAP.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

FORMATS = ("original", "diffusers")
# checkpoints re-saved by other tools sometimes carry a wrapper prefix
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def split_block(key: str) -> Optional[tuple[int, str]]:
    m = _BLOCK_RE.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def to_original(key: str, fmt: str) -> Optional[str]:
    """Source key in ``fmt`` -> original-layout key, or None if it is not a mapped tensor."""
    if fmt == "original":
        blk = split_block(key)
        if blk is not None:
            return key if blk[1] in BLOCK_MAP else None
        return key if key in GLOBAL_MAP else None
    blk = split_block(key)
    if blk is not None:
        inner = _BLOCK_INV.get(blk[1])
        return f"blocks.{blk[0]}.{inner}" if inner else None
    return _GLOBAL_INV.get(key)


def from_original(key: str, fmt: str) -> str:
    """Original-layout key -> key in ``fmt`` (the inverse of :func:`to_original`)."""
    if fmt == "original":
        return key
    blk = split_block(key)
    if blk is not None:
        return f"blocks.{blk[0]}.{BLOCK_MAP[blk[1]]}"
    return GLOBAL_MAP[key]


def is_i2v(key: str, fmt: str) -> bool:
    pats = I2V_PATTERNS_ORIGINAL if fmt == "original" else I2V_PATTERNS_DIFFUSERS
    return any(re.match(p, key) for p in pats)


def detect_format(keys: list[str]) -> str:
    """``diffusers`` if the keys use its module names, ``original`` if Wan's; error otherwise."""
    diff = sum(1 for k in keys if k.startswith("condition_embedder.") or ".attn1." in k or k == "proj_out.weight")
    orig = sum(1 for k in keys if k.startswith("time_embedding.") or ".self_attn." in k or k == "head.head.weight")
    if diff and not orig:
        return "diffusers"
    if orig and not diff:
        return "original"
    raise ValueError(f"cannot tell the checkpoint layout ({diff} diffusers-style keys, {orig} Wan-style keys); "
                     f"pass --format original|diffusers")


def strip_known_prefix(keys: list[str]) -> str:
    """The wrapper prefix every key shares (e.g. ``model.diffusion_model.``), or ''."""
    for p in KNOWN_PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def num_blocks(keys: list[str]) -> int:
    idx = [b[0] for b in map(split_block, keys) if b is not None]
    return max(idx) + 1 if idx else 0


def parse_layers(spec: Optional[str], available: int, default_count: int) -> list[int]:
    """``--layers``: ``a-b`` (inclusive), ``a,b,c``, a mix (``0-9,12``), or ``N`` = the first N layers.

    None selects the first ``default_count`` layers.
    """
    if spec is None or str(spec).strip() == "":
        sel = list(range(default_count))
    elif re.fullmatch(r"\s*\d+\s*", str(spec)):
        sel = list(range(int(spec)))
    else:
        sel = []
        for part in str(spec).split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise ValueError(f"--layers: range {part!r} is descending")
                sel += list(range(a, b + 1))
            elif part.isdigit():
                sel.append(int(part))
            else:
                raise ValueError(f"--layers: cannot parse {part!r} (use a-b, a,b,c or N)")
    if len(set(sel)) != len(sel):
        raise ValueError(f"--layers: {spec!r} selects a layer twice")
    bad = [i for i in sel if i >= available]
    if bad:
        raise ValueError(f"--layers: {spec!r} selects layers {bad}, the checkpoint has {available} "
                         f"(0..{available - 1})")
    if not sel:
        raise ValueError(f"--layers: {spec!r} selects no layer")
    return sel
