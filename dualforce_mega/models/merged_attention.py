"""Exact block-causal attention as a log-sum-exp merge of dense, unmasked attention calls.

The allowed (query block, key block) pairs of a ``MaskSpec`` are split into rectangles that are
allowed entirely (``merge_plan``). For F equal blocks and no window this is the binary split: the F
diagonal blocks, then at each level of the split every "later half attends to the whole earlier
half" rectangle -- ceil(log2 F) + 1 shapes. Rectangles of one shape whose token ranges form
arithmetic progressions run as ONE batched call on strided views of q/k/v (no copy where the batch
flattens, else one gather), so no call does masked work and each runs at full-kernel speed.

Every piece returns its output and log-sum-exp (LSE); a query's output is the LSE-weighted sum of
its pieces. The backward runs each piece's kernel backward with the MERGED output and LSE, which
gives exactly that piece's share of dq/dk/dv (as ring attention does); shares are summed in fp32.

Piece kernels are torch's fused attention ops that return the LSE: on CUDA cuDNN, then FlashAttention-2,
then memory-efficient -- the first that passes a fwd+bwd check against the dense reference on first
use (logged); on CPU torch's flash kernel (so exactness is tested on CPU).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .attention import MaskSpec

log = logging.getLogger(__name__)
aten = torch.ops.aten


# --------------------------------------------------------------------------------------
# token segments: n equal-length token ranges, gathered / scattered along dim 1 of [B, L, ...]
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segments:
    starts: tuple[int, ...]
    length: int

    @property
    def n(self) -> int:
        return len(self.starts)

    @property
    def step(self) -> Optional[int]:
        """Token distance between consecutive segments when they form a non-overlapping arithmetic
        progression (then every access is a strided view), else None."""
        if self.n == 1:
            return self.length
        d = self.starts[1] - self.starts[0]
        if d < self.length or any(b - a != d for a, b in zip(self.starts, self.starts[1:])):
            return None
        return d

    def covers(self, total: int) -> bool:
        """The segments tile [0, total) in order, each token once."""
        return self.step == self.length and self.starts[0] == 0 and self.n * self.length == total

    def view(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, n, length, ...] strided view of ``x`` [B, L, ...], or None (not arithmetic)."""
        step = self.step
        if step is None:
            return None
        s = x.stride()
        return x.as_strided((x.shape[0], self.n, self.length) + tuple(x.shape[2:]),
                            (s[0], step * s[1], s[1]) + tuple(s[2:]),
                            x.storage_offset() + self.starts[0] * s[1])

    def index(self, device: torch.device) -> torch.Tensor:
        return _token_index(self.starts, self.length, device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, length, ...]: a view where possible, else a copy."""
        v = self.view(x)
        if v is not None:
            return v
        return x.index_select(1, self.index(x.device)).unflatten(1, (self.n, self.length))

    def write(self, x: torch.Tensor, val: torch.Tensor) -> None:
        """x[segments] = val ([B, n, length, ...]); the segments of one group never overlap."""
        v = self.view(x)
        if v is not None:
            v.copy_(val)
        else:
            x.index_copy_(1, self.index(x.device), val.flatten(1, 2).to(x.dtype))

    def add(self, x: torch.Tensor, val: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """x[segments] += val (* weight); overlapping segments accumulate (index_add)."""
        v = self.view(x)
        if v is not None:
            if weight is None:
                v.add_(val)
            else:
                v.addcmul_(val, weight)
        else:
            if weight is not None:
                val = val * weight
            x.index_add_(1, self.index(x.device), val.flatten(1, 2).to(x.dtype))


@lru_cache(maxsize=512)
def _token_index(starts: tuple[int, ...], length: int, device: torch.device) -> torch.Tensor:
    base = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(length)[None, :]
    return base.flatten().to(device)


@dataclass(frozen=True)
class PieceGroup:
    """Rectangles of one shape: queries ``q.starts[i]..+q.length`` attend to keys ``k.starts[i]..``."""
    q: Segments
    k: Segments


@dataclass(frozen=True)
class MergePlan:
    groups: tuple[PieceGroup, ...]
    lq: int
    lk: int

    @property
    def q_covered_by_first(self) -> bool:
        return bool(self.groups) and self.groups[0].q.covers(self.lq)

    @property
    def k_covered_by_first(self) -> bool:
        return bool(self.groups) and self.groups[0].k.covers(self.lk)

    def pairs(self) -> int:
        return sum(g.q.n * g.q.length * g.k.length for g in self.groups)


# --------------------------------------------------------------------------------------
# the plan: allowed block pairs -> rectangles -> batched groups
# --------------------------------------------------------------------------------------
def _split_point(size: int) -> int:
    """Largest power of two below ``size``: the earlier part of a split is a power of two, so the
    rectangles of unequal-length sequences line up with the same binary tree (and batch together)."""
    return 1 << ((size - 1).bit_length() - 1)


def block_rectangles(allowed: torch.Tensor, q_ids: torch.Tensor, k_ids: torch.Tensor
                     ) -> list[tuple[int, int, int, int]]:
    """Disjoint rectangles (q0, q1, k0, k1) of block indices that exactly cover ``allowed`` [Uq, Uk].

    Recursive split of the query range at a power of two and of the key range at the same block id:
    a block-causal square gives the diagonal blocks plus, per level, the "later half x earlier half"
    rectangles. A single query block that is not entirely allowed gives its runs of allowed keys.
    """
    uq, uk = allowed.shape
    csum = torch.zeros(uq + 1, uk + 1, dtype=torch.long)
    csum[1:, 1:] = allowed.long().cumsum(0).cumsum(1)
    q_list, k_list = q_ids.tolist(), k_ids.tolist()

    def count(q0: int, q1: int, k0: int, k1: int) -> int:
        return int(csum[q1, k1] - csum[q0, k1] - csum[q1, k0] + csum[q0, k0])

    rects: list[tuple[int, int, int, int]] = []
    stack = [(0, uq, 0, uk)]
    while stack:
        q0, q1, k0, k1 = stack.pop()
        c = count(q0, q1, k0, k1)
        if c == 0:
            continue
        if c == (q1 - q0) * (k1 - k0):
            rects.append((q0, q1, k0, k1))
            continue
        if q1 - q0 == 1:
            row = allowed[q0, k0:k1].tolist()
            start = None
            for j, ok in enumerate(row + [False]):
                if ok and start is None:
                    start = j
                elif not ok and start is not None:
                    rects.append((q0, q1, k0 + start, k0 + j))
                    start = None
            continue
        qm = q0 + _split_point(q1 - q0)
        t = q_list[qm]
        km = k0
        while km < k1 and k_list[km] < t:  # ids sorted: first key block with id >= t
            km += 1
        if k0 < km < k1:
            stack += [(q0, qm, k0, km), (q0, qm, km, k1), (qm, q1, k0, km), (qm, q1, km, k1)]
        else:
            stack += [(q0, qm, k0, k1), (qm, q1, k0, k1)]
    return rects


def _group(rects: list[tuple[int, int, int, int, int]]) -> list[PieceGroup]:
    """Token rectangles (q_start, q_len, k_start, k_len, block-id offset q - k) -> batched groups.

    Rectangles of one shape and one block offset (the diagonal blocks; one level of the binary
    split) are chained, sorted by query start, while both starts advance by one constant step at
    least the length: strided views, disjoint queries and keys. Leftover single rectangles of one
    shape are batched by gathering, with disjoint queries (keys may repeat).
    """
    classes: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for qs, ql, ks, kl, offset in rects:
        classes.setdefault((ql, kl, offset), []).append((qs, ks))
    groups: list[PieceGroup] = []
    singles: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (ql, kl, _), items in classes.items():
        chains: list[list[tuple[int, int]]] = []
        for qs, ks in sorted(items):
            for ch in chains:
                if len(ch) == 1:
                    dq, dk = qs - ch[0][0], ks - ch[0][1]
                else:
                    dq, dk = ch[1][0] - ch[0][0], ch[1][1] - ch[0][1]
                if dq >= ql and dk >= kl and qs - ch[-1][0] == dq and ks - ch[-1][1] == dk:
                    ch.append((qs, ks))
                    break
            else:
                chains.append([(qs, ks)])
        for ch in chains:
            if len(ch) > 1:
                groups.append(PieceGroup(Segments(tuple(a for a, _ in ch), ql), Segments(tuple(b for _, b in ch), kl)))
            else:
                singles.setdefault((ql, kl), []).append(ch[0])
    for (ql, kl), items in singles.items():
        items.sort()
        while items:  # greedy: rectangles with disjoint queries share a gathered call
            batch, rest, q_end = [], [], -1
            for qs, ks in items:
                if qs >= q_end:
                    batch.append((qs, ks))
                    q_end = qs + ql
                else:
                    rest.append((qs, ks))
            groups.append(PieceGroup(Segments(tuple(a for a, _ in batch), ql), Segments(tuple(b for _, b in batch), kl)))
            items = rest
    return groups


_PLANS: dict = {}


def merge_plan(spec: MaskSpec) -> MergePlan:
    """The grouped rectangles of ``spec`` (cached by ``spec.key``: built on the host once per layout)."""
    cache_key = (spec.key, spec.q_blocks.numel(), spec.k_blocks.numel(), spec.window, spec.sink) \
        if spec.key else None
    if cache_key is not None and cache_key in _PLANS:
        return _PLANS[cache_key]
    qb, kb = spec.q_blocks.cpu(), spec.k_blocks.cpu()
    for name, ids in (("q_blocks", qb), ("k_blocks", kb)):
        if ids.numel() > 1 and bool((ids[1:] < ids[:-1]).any()):
            raise ValueError(f"merged attention: {name} must be sorted (non-decreasing)")
    uq, cq = torch.unique_consecutive(qb, return_counts=True)
    uk, ck = torch.unique_consecutive(kb, return_counts=True)
    q_off = [0] + torch.cumsum(cq, 0).tolist()
    k_off = [0] + torch.cumsum(ck, 0).tolist()
    allowed = MaskSpec(uq, uk, spec.window, spec.sink).allowed()
    rects = [(q_off[q0], q_off[q1] - q_off[q0], k_off[k0], k_off[k1] - k_off[k0], int(uq[q0] - uk[k0]))
             for q0, q1, k0, k1 in block_rectangles(allowed, uq, uk)]
    groups = _group(rects)
    # a group covering every query (and key) once goes first: it initialises the accumulators
    groups.sort(key=lambda g: not (g.q.covers(qb.numel()) and g.k.covers(kb.numel())))
    plan = MergePlan(tuple(groups), qb.numel(), kb.numel())
    if cache_key is not None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[cache_key] = plan
    return plan


# --------------------------------------------------------------------------------------
# piece kernels: q/k/v [N, L, H, D] (strided) -> out [N, Lq, H, D], LSE [N, Lq, H] fp32
# --------------------------------------------------------------------------------------
def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


class PieceKernel:
    """One of torch's fused attention ops that returns the LSE, and its backward."""
    name = ""

    def forward(self, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse: torch.Tensor, aux: tuple, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lse`` [N, H, Lq] contiguous fp32 (the merged one); returns dq, dk, dv as [N, L, H, D]."""
        raise NotImplementedError


class CpuFlashKernel(PieceKernel):
    name = "cpu_flash"

    def forward(self, q, k, v, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(_t(q), _t(k), _t(v), 0.0, False, scale=scale)
        return _t(out), _t(lse), ()

    def backward(self, dout, q, k, v, out, lse, aux, scale):
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _t(dout), _t(q), _t(k), _t(v), _t(out), lse, 0.0, False, scale=scale)
        return tuple(_t(g) for g in grads)


class CudaFlashKernel(PieceKernel):
    name = "flash"

    def forward(self, q, k, v, scale):
        out, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = aten._scaled_dot_product_flash_attention(
            _t(q), _t(k), _t(v), 0.0, False, False, scale=scale)
        return _t(out), _t(lse), (cum_q, cum_k, max_q, max_k, rng, unused)

    def backward(self, dout, q, k, v, out, lse, aux, scale):
        cum_q, cum_k, max_q, max_k, rng, unused = aux
        grads = aten._scaled_dot_product_flash_attention_backward(
            _t(dout), _t(q), _t(k), _t(v), _t(out), lse, cum_q, cum_k, max_q, max_k, 0.0, False, rng, unused,
            scale=scale)
        return tuple(_t(g) for g in grads)


class CudnnKernel(PieceKernel):
    name = "cudnn"

    def forward(self, q, k, v, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            _t(q), _t(k), _t(v), None, True, 0.0, False, False, scale=scale)
        n, h, lq = out.shape[:3]
        return _t(out), _t(lse.reshape(n, h, lq)), (tuple(lse.shape), cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, scale):
        lse_shape, cum_q, cum_k, max_q, max_k, seed, offset = aux
        grads = aten._scaled_dot_product_cudnn_attention_backward(
            _t(dout), _t(q), _t(k), _t(v), _t(out), lse.reshape(lse_shape), seed, offset, None, cum_q, cum_k,
            max_q, max_k, 0.0, False, scale=scale)
        return tuple(_t(g) for g in grads)


class EfficientKernel(PieceKernel):
    name = "efficient"

    def forward(self, q, k, v, scale):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            _t(q), _t(k), _t(v), None, True, 0.0, False, scale=scale)
        lq = q.shape[1]
        return _t(out), _t(lse[:, :, :lq]), (lse.shape[-1], seed, offset)  # LSE rows padded (to 32)

    def backward(self, dout, q, k, v, out, lse, aux, scale):
        padded, seed, offset = aux
        lse = torch.nn.functional.pad(lse, (0, padded - lse.shape[-1]))
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            _t(dout), _t(q), _t(k), _t(v), None, _t(out), lse, seed, offset, 0.0, [True, True, True, False], False,
            scale=scale)
        return _t(dq), _t(dk), _t(dv)


KERNELS = {k.name: k for k in (CpuFlashKernel(), CudaFlashKernel(), CudnnKernel(), EfficientKernel())}
_HALF = (torch.float16, torch.bfloat16)


def candidate_kernels(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Piece kernels to try, fastest first. cuDNN (the fastest full kernel on H100) is not tried: its
    frontend rejects 1-token pieces (s_q = s_kv = 1: the struct tower has one token per frame) and on
    torch 2.11 cu130 the process then crashed (segfault / misaligned address, H100, 2026-11-26); it stays
    available by name (``kernel="cudnn"``) for video-only pieces."""
    if device.type != "cuda":
        return ["cpu_flash"]
    return (["flash"] if dtype in _HALF else []) + ["efficient"]


# --------------------------------------------------------------------------------------
# forward / backward of the merge
# --------------------------------------------------------------------------------------
def merged_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: MergePlan, kernel: PieceKernel
                   ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """out [B, Lq, H, D] (q's dtype), LSE [B, Lq, H] fp32, per-group kernel aux (for the backward)."""
    b, lq, h, d = q.shape
    scale = d ** -0.5
    pieces, auxes = [], []
    for g in plan.groups:
        o, l, aux = kernel.forward(g.q.gather(q).flatten(0, 1), g.k.gather(k).flatten(0, 1),
                                   g.k.gather(v).flatten(0, 1), scale)
        pieces.append((o.unflatten(0, (b, g.q.n)), l.unflatten(0, (b, g.q.n)).float()))
        auxes.append(aux)
    if len(plan.groups) == 1 and plan.q_covered_by_first:  # one dense call covers everything
        o, l = pieces[0]
        return o.reshape(b, lq, h, -1), l.reshape(b, lq, h), auxes
    # merged LSE first (small tensors), then each output added once with its weight exp(lse_i - lse)
    lse = torch.full((b, lq, h), -math.inf, device=q.device, dtype=torch.float32)
    start = 0
    if plan.q_covered_by_first:
        plan.groups[0].q.write(lse, pieces[0][1])
        start = 1
    for g, (_, l) in zip(plan.groups[start:], pieces[start:]):
        g.q.write(lse, torch.logaddexp(g.q.gather(lse), l))
    acc = (torch.empty if plan.q_covered_by_first else torch.zeros)((b, lq, h, d), device=q.device,
                                                                    dtype=torch.float32)
    for i, (g, (o, l)) in enumerate(zip(plan.groups, pieces)):
        w = torch.exp(l - g.q.gather(lse)).unsqueeze(-1)
        if i == 0 and plan.q_covered_by_first:
            g.q.write(acc, o * w)
        else:
            g.q.add(acc, o, w)
    return acc.to(q.dtype), lse, auxes


def merged_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, auxes: list, plan: MergePlan, kernel: PieceKernel
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each piece's kernel backward with the merged output and LSE; shares summed in fp32."""
    b, lq, h, d = q.shape
    scale = d ** -0.5
    dout = dout.contiguous()
    acc = {}
    for i, (g, aux) in enumerate(zip(plan.groups, auxes)):
        lse_g = g.q.gather(lse).flatten(0, 1).transpose(1, 2).contiguous()  # [N, H, len]
        grads = kernel.backward(g.q.gather(dout).flatten(0, 1), g.q.gather(q).flatten(0, 1),
                                g.k.gather(k).flatten(0, 1), g.k.gather(v).flatten(0, 1),
                                g.q.gather(out).flatten(0, 1), lse_g, aux, scale)
        for name, grad, seg, like, covered in (("q", grads[0], g.q, q, plan.q_covered_by_first),
                                               ("k", grads[1], g.k, k, plan.k_covered_by_first),
                                               ("v", grads[2], g.k, v, plan.k_covered_by_first)):
            grad = grad.unflatten(0, (b, seg.n))
            if name not in acc:
                acc[name] = (torch.empty if i == 0 and covered else torch.zeros)(
                    like.shape, device=like.device, dtype=torch.float32)
                if i == 0 and covered:
                    seg.write(acc[name], grad)
                    continue
            seg.add(acc[name], grad)
    return tuple(acc[n].to(t.dtype) if n in acc else torch.zeros_like(t) for n, t in (("q", q), ("k", k), ("v", v)))


class _MergedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: MergePlan, kernel: PieceKernel):
        out, lse, auxes = merged_forward(q, k, v, plan, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.kernel, ctx.auxes = plan, kernel, auxes
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = merged_backward(dout, q, k, v, out, lse, ctx.auxes, ctx.plan, ctx.kernel)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------
# kernel choice (once per device, dtype and head size) and the public entry point
# --------------------------------------------------------------------------------------
def _check_kernel(kernel: PieceKernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> float:
    """Worst relative error (output and the three gradients) of the merged path through ``kernel``
    against dense-mask attention in fp32 on a small problem with uneven blocks and a 1-token block."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.tensor([0] + [1] * 5 + [2] * 77 + [3] * 64 + [4] * 128)
    spec = MaskSpec(blocks, blocks, window=3, sink=1)
    shape = (2, blocks.numel(), 2, head_dim)
    q, k, v, grad = (torch.randn(shape, generator=g).to(device) for _ in range(4))
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(_t(t) for t in ref_in), attn_mask=spec.allowed().to(device)).transpose(1, 2)
    ref.backward(grad.double())
    test_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = _MergedAttention.apply(*test_in, merge_plan(spec), kernel)
    out.backward(grad.to(dtype))
    pairs = [(out.detach(), ref.detach())] + [(a.grad, b.grad) for a, b in zip(test_in, ref_in)]
    return max(float((a.double() - b).norm() / b.norm()) for a, b in pairs)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def verify_kernel(kernel: PieceKernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> float:
    """``_check_kernel`` isolated from the caller's autograd state: the first attention call may come
    from a sampler under inference mode (no backward possible) or from a checkpointed block's forward
    (whose saved-tensor hooks would count the probe's tensors in the forward but not in the recompute:
    "a different number of tensors was saved", seen on the H100)."""
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        return _check_kernel(kernel, device, dtype, head_dim)


@lru_cache(maxsize=None)
def choose_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> PieceKernel:
    """The first candidate kernel that runs and matches the dense reference (checked once on CUDA)."""
    candidates = candidate_kernels(device, dtype)
    if device.type != "cuda":
        return KERNELS[candidates[0]]
    tol = max(8 * torch.finfo(dtype).eps, 1e-5)  # a few units of rounding of the piece dtype
    for name in candidates:
        try:
            err = verify_kernel(KERNELS[name], device, dtype, head_dim)
        except RuntimeError as e:
            log.warning("merged attention: %s kernel unusable (%s)", name, str(e).splitlines()[0][:120])
            continue
        if err <= tol:
            log.info("merged attention: pieces through torch's %s kernel (%s, head_dim %d; rel. error %.1e vs "
                     "dense reference)", name, str(dtype).replace("torch.", ""), head_dim, err)
            return KERNELS[name]
        log.warning("merged attention: %s kernel disagrees with the dense reference (rel. error %.2e > %.1e)",
                    name, err, tol)
    raise RuntimeError(f"merged attention: no piece kernel among {candidates} works on {device} in {dtype}")


def merged_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec,
                           kernel: Optional[str] = None) -> torch.Tensor:
    """Block-causal attention, q/k/v [B, L, H, D] -> [B, Lq, H, D], as a merge of dense pieces."""
    pk = KERNELS[kernel] if kernel else choose_kernel(q.device, q.dtype, q.shape[-1])
    return _MergedAttention.apply(q, k, v, merge_plan(spec), pk)
