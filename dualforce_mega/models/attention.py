"""Block-causal attention behind one interface.

Every token carries a block id; a query sees a key iff ``key_block <= query_block`` (and, with a
rolling window of W blocks, ``key_block > query_block - W`` unless the key is in a sink block).
Tokens are sorted by block id in every stream, which the fused backend relies on.

With a window, the sink keys (already rotated by RoPE at their own positions) are rotated further so
that, for a query in block i, the sink sits right before the query's window (``sink_step`` per block,
``timeline.sink_offset_blocks``): no query sees a larger RoPE distance than a training window holds.
Queries are then attended in groups that share the sink's position (``_moved_sink_attention``).

Backends
  sdpa   dense boolean mask through ``F.scaled_dot_product_attention`` — the reference.
  flex   FlexAttention with a ``BlockMask`` built once per mask layout (cached).
  flash  per-query-block prefix attention: each query block attends, unmasked, to the contiguous
         key range it may see, through flash-attn when installed, else torch's fused SDPA kernels.
  merged the allowed block pairs as a few batched unmasked calls (diagonal blocks, then each level
         of a binary split), merged by log-sum-exp; exact, no masked work (``merged_attention``).

``auto`` is chosen once per device: sdpa on CPU (fastest at test sizes), merged on CUDA (flex when no
fused kernel that returns the log-sum-exp works there); a log line says which runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..timeline import sink_offset_blocks
from .rope import apply_rope

log = logging.getLogger(__name__)

# Block id given to padding tokens: larger than any real block, so no real query ever sees them.
PAD_BLOCK = 1 << 30
BACKENDS = ("sdpa", "flex", "flash", "merged")


@dataclass
class MaskSpec:
    """Which keys each query may see. ``q_blocks`` [Lq] and ``k_blocks`` [Lk] are sorted int64."""
    q_blocks: torch.Tensor
    k_blocks: torch.Tensor
    window: int = 0          # 0 = unbounded history
    sink: int = 1            # blocks [0, sink) stay visible under a window
    key: tuple = field(default=())  # hashable description of the layout, for mask caches
    # [D/2] RoPE angles that move a key one block later in time; with a window, the sink keys seen by
    # a query in block i are moved by timeline.sink_offset_blocks(i) blocks (None: sink stays put)
    sink_step: Optional[torch.Tensor] = None

    def allowed(self) -> torch.Tensor:
        """Dense boolean [Lq, Lk] mask (the reference definition)."""
        q = self.q_blocks[:, None]
        k = self.k_blocks[None, :]
        ok = k <= q
        if self.window > 0:
            ok = ok & ((k > q - self.window) | (k < self.sink))
        return ok

    def with_prefix_keys(self, prefix_blocks: torch.Tensor, tag: tuple) -> "MaskSpec":
        """The same queries over ``[cached keys, current keys]`` (KV-cache inference)."""
        return MaskSpec(self.q_blocks, torch.cat([prefix_blocks, self.k_blocks]), self.window,
                        self.sink, self.key + tag, self.sink_step)

    def moves_sink(self) -> bool:
        return self.window > 0 and self.sink_step is not None


# --------------------------------------------------------------------------------------
# optional kernels
# --------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result   # a build-time choice: compiled blocks bake it in, no traced import
@lru_cache(maxsize=1)
def _flash_attn_func() -> Optional[Callable]:
    try:
        from flash_attn import flash_attn_func  # type: ignore
        return flash_attn_func
    except Exception:  # not installed, or built for another CUDA
        return None


@lru_cache(maxsize=1)
def _flex() -> Optional[tuple]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None
    compiled = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return compiled, create_block_mask


def resolve_backend(requested: str, q: torch.Tensor) -> str:
    """``requested`` unless ``auto``: sdpa on CPU (FlexAttention has no CPU backward; the dense mask is
    cheapest at test sizes), merged on CUDA, flex there if no merged piece kernel works."""
    if requested != "auto":
        if requested == "flex" and _flex() is None:
            raise RuntimeError("model.attn_backend=flex: torch.nn.attention.flex_attention is unavailable")
        return requested
    return _auto_backend(q.device, q.dtype, q.shape[-1])


@lru_cache(maxsize=None)
def _auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    from .merged_attention import choose_kernel  # imports this module

    if device.type != "cuda":
        choice = "sdpa"
    else:
        try:
            choose_kernel(device, dtype, head_dim)
            choice = "merged"
        except RuntimeError as e:
            log.warning("%s", e)
            choice = "flex" if _flex() is not None else "flash"
    log.info("attention backend: %s (auto on %s, %s)", choice, device.type, str(dtype).replace("torch.", ""))
    return choice


# --------------------------------------------------------------------------------------
# backends; all take q/k/v as [B, L, H, D] and return [B, Lq, H, D]
# --------------------------------------------------------------------------------------
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None
          ) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention through the fastest available fused kernel."""
    fa = _flash_attn_func()
    if fa is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return fa(q, k, v, causal=False)
    return _sdpa(q, k, v)


def sdpa_block_attention(q, k, v, spec: MaskSpec) -> torch.Tensor:
    return _sdpa(q, k, v, spec.allowed().to(q.device))


_FLEX_MASKS: dict = {}


def _mask_mod(spec: MaskSpec, device: torch.device) -> Callable:
    qb = spec.q_blocks.to(device)
    kb = spec.k_blocks.to(device)
    window, sink = spec.window, spec.sink

    def mask_mod(b, h, qi, ki):
        ok = kb[ki] <= qb[qi]
        if window > 0:
            ok = ok & ((kb[ki] > qb[qi] - window) | (kb[ki] < sink))
        return ok

    return mask_mod


def _tile_membership(ids: torch.Tensor, uniq: torch.Tensor, tile: int) -> torch.Tensor:
    """[tiles, len(uniq)] float: 1 where the tile of ``tile`` tokens holds a token of that block id."""
    n_tiles = -(-ids.numel() // tile)
    col = torch.searchsorted(uniq, ids)
    row = torch.arange(ids.numel()) // tile
    member = torch.zeros(n_tiles, uniq.numel(), dtype=torch.float64)
    member[row, col] = 1.0
    return member


def flex_block_mask_from_blocks(spec: MaskSpec, device: torch.device, tile: int = 0):
    """The FlexAttention ``BlockMask`` of ``spec`` built from block ids, without evaluating the mask
    per token pair.

    ``create_block_mask`` evaluates ``mask_mod`` on all Lq x Lk pairs (17 G at 128 latent frames).
    Here the mask is evaluated once per pair of distinct block ids; a (q tile, k tile) pair is then
    empty / partial / full by counting allowed and forbidden block pairs it covers. Tiles running
    past the sequence end are never full (their padded slots are masked), as in ``create_block_mask``.
    """
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask

    tile = tile or _DEFAULT_SPARSE_BLOCK_SIZE
    qb, kb = spec.q_blocks.cpu(), spec.k_blocks.cpu()
    uq, uk = torch.unique(qb), torch.unique(kb)
    allowed = MaskSpec(uq, uk, spec.window, spec.sink).allowed().to(torch.float64)
    mq, mk = _tile_membership(qb, uq, tile), _tile_membership(kb, uk, tile)
    n_allowed = mq @ allowed @ mk.T            # block pairs of each tile pair that are allowed
    n_denied = mq @ (1.0 - allowed) @ mk.T
    ragged_q = torch.zeros(mq.shape[0], dtype=torch.bool)
    ragged_k = torch.zeros(mk.shape[0], dtype=torch.bool)
    ragged_q[-1] = qb.numel() % tile != 0
    ragged_k[-1] = kb.numel() % tile != 0
    full = (n_allowed > 0) & (n_denied == 0) & ~ragged_q[:, None] & ~ragged_k[None, :]
    partial = (n_allowed > 0) & ~full

    def as_blocks(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = sel.sum(-1).to(torch.int32)
        # selected tile indices first (stable sort keeps them ascending), the rest after
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None].to(device), order[None, None].contiguous().to(device)

    kv_num, kv_idx = as_blocks(partial)
    full_num, full_idx = as_blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=_mask_mod(spec, device),
                                    seq_lengths=(qb.numel(), kb.numel()))


def flex_block_attention(q, k, v, spec: MaskSpec) -> torch.Tensor:
    flex_attention, _ = _flex()
    cache_key = (spec.key, q.shape[1], k.shape[1], spec.window, spec.sink, str(q.device)) if spec.key else None
    block_mask = _FLEX_MASKS.get(cache_key) if cache_key else None
    if block_mask is None:
        block_mask = flex_block_mask_from_blocks(spec, q.device)
        if cache_key:
            if len(_FLEX_MASKS) > 64:
                _FLEX_MASKS.clear()
            _FLEX_MASKS[cache_key] = block_mask
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


_PREFIX_PLANS: dict = {}


def prefix_plan(spec: MaskSpec) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """For each run of equal query blocks: (q_start, q_end, key ranges it sees).

    Valid because both id sequences are sorted: the keys a block sees form at most two
    contiguous ranges (the sink and the window).
    """
    cache_key = (spec.key, spec.q_blocks.numel(), spec.k_blocks.numel(), spec.window, spec.sink) \
        if spec.key else None
    if cache_key in _PREFIX_PLANS:
        return _PREFIX_PLANS[cache_key]
    qb = spec.q_blocks.cpu()
    kb = spec.k_blocks.cpu()
    if qb.numel() > 1 and bool((qb[1:] < qb[:-1]).any()) or kb.numel() > 1 and bool((kb[1:] < kb[:-1]).any()):
        raise ValueError("flash backend: block ids must be sorted (non-decreasing)")
    blocks, counts = torch.unique_consecutive(qb, return_counts=True)
    plan = []
    start = 0
    sink_end = int(torch.searchsorted(kb, torch.tensor(spec.sink), right=False)) if spec.window else 0
    for b, c in zip(blocks.tolist(), counts.tolist()):
        hi = int(torch.searchsorted(kb, torch.tensor(b), right=True))
        ranges = [(0, hi)]
        if spec.window > 0:
            lo = int(torch.searchsorted(kb, torch.tensor(b - spec.window + 1), right=False))
            if lo > sink_end:
                ranges = [(0, sink_end), (lo, hi)] if sink_end > 0 else [(lo, hi)]
        plan.append((start, start + c, [r for r in ranges if r[1] > r[0]]))
        start += c
    if cache_key:
        if len(_PREFIX_PLANS) > 256:
            _PREFIX_PLANS.clear()
        _PREFIX_PLANS[cache_key] = plan
    return plan


def flash_block_attention(q, k, v, spec: MaskSpec) -> torch.Tensor:
    outs = []
    for qs, qe, ranges in prefix_plan(spec):
        if len(ranges) == 1:
            ks, ke = ranges[0]
            kk, vv = k[:, ks:ke], v[:, ks:ke]
        else:
            kk = torch.cat([k[:, s:e] for s, e in ranges], dim=1)
            vv = torch.cat([v[:, s:e] for s, e in ranges], dim=1)
        outs.append(dense_attention(q[:, qs:qe], kk, vv))
    return torch.cat(outs, dim=1)


def merged_attention(q, k, v, spec: MaskSpec) -> torch.Tensor:
    from .merged_attention import merged_block_attention  # imports this module

    return merged_block_attention(q, k, v, spec)


_IMPL = {"sdpa": sdpa_block_attention, "flex": flex_block_attention, "flash": flash_block_attention,
         "merged": merged_attention}


def _moved_sink_attention(q, k, v, spec: MaskSpec, impl: Callable) -> torch.Tensor:
    """Attention with the sink keys moved before each query's window (see the module doc).

    Query blocks are sorted, so queries whose sink moves by the same number of blocks are contiguous;
    each such group attends to the keys with the sink part rotated by that many ``sink_step``s."""
    offsets = sink_offset_blocks(spec.q_blocks, spec.window, spec.sink)
    sink_end = int((spec.k_blocks < spec.sink).sum())
    plain = MaskSpec(spec.q_blocks, spec.k_blocks, spec.window, spec.sink, spec.key)
    if sink_end == 0 or int(offsets.max()) == 0:
        return impl(q, k, v, plain)
    values, counts = torch.unique_consecutive(offsets, return_counts=True)
    outs, start = [], 0
    for offset, count in zip(values.tolist(), counts.tolist()):
        kk = k
        if offset:
            angles = (offset * spec.sink_step).to(k.device).expand(sink_end, -1)
            kk = torch.cat([apply_rope(k[:, :sink_end], angles), k[:, sink_end:]], dim=1)
        group = MaskSpec(spec.q_blocks[start:start + count], spec.k_blocks, spec.window, spec.sink,
                         spec.key + ("sink_moved", offset, start, count) if spec.key else ())
        outs.append(impl(q[:, start:start + count], kk, v, group))
        start += count
    return torch.cat(outs, dim=1)


@torch.compiler.disable
def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
                    backend: str = "auto") -> torch.Tensor:
    """Block-causal attention, q/k/v [B, L, H, D] -> [B, Lq, H, D].

    Not traced by torch.compile (compiled transformer blocks call it across a graph break): each
    backend is its own fused kernel (flex compiles itself), and their host-side planning (mask and
    prefix-plan caches keyed on the layout) belongs outside a graph."""
    name = resolve_backend(backend, q)
    if spec.moves_sink():
        return _moved_sink_attention(q, k, v, spec, _IMPL[name])
    return _IMPL[name](q, k, v, spec)
