"""Block-causal attention kernels vs full attention, forward + backward, side by side in one run.

For each number of latent frames F and sequence-parallel degree P (Ulysses: every rank holds the
full sequence and heads/P heads) it times, on identical q/k/v:

  flex      FlexAttention with the cached BlockMask (the previous CUDA default)
  flex:tuned  the same with ``--flex-options`` as kernel_options (block sizes, warps, stages)
  merged    dense pieces merged by log-sum-exp (the CUDA default; ``merged:<kernel>`` forces the
            piece kernel, ``--merged-kernels``)
  flash     per-query-block prefix calls (flash_attn if installed, else torch's fused SDPA)
  sdpa      dense boolean mask through SDPA (the reference; skipped where the L^2 mask cannot fit)
  full:*    unmasked attention of the same shape through each fused kernel available

TFLOP/s count only the unmasked work (allowed query-key pairs), forward + backward = 3.5x the
forward's 4 * pairs * heads * head_dim (the backward's 2.5x is FlashAttention's convention).
``ratio`` is time / time of the fastest full kernel; the ideal for block-causal is (F+1)/2F;
``vs dense`` is time / time of the dense-mask SDPA. One summary line per shape follows the table.

A second table times building the flex BlockMask: token-level ``create_block_mask`` vs the
block-level construction the backend uses.

  python benchmarks/bench_attention.py                     # H100: 12 heads x 128, 1024 tok/frame
  python benchmarks/bench_attention.py --cpu-smoke         # tiny shapes, fp32, CI check
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from common import (allow_recompiles, bench_device, csv_list, device_name, dump_json, fmt,  # noqa: I100
                    free_memory, is_oom, markdown_table, release, time_fn)
from dualforce_mega.models.attention import (MaskSpec, _flash_attn_func, _flex, _mask_mod, _sdpa,
                                             block_attention, flex_block_mask_from_blocks, prefix_plan)
from dualforce_mega.models.merged_attention import choose_kernel, merge_plan, merged_block_attention

log = logging.getLogger("bench_attention")

# FlashAttention's convention: backward = 2.5 forward matmul FLOPs.
BWD_OVER_FWD = 2.5
# Dense-mask SDPA memory per (query, key) pair: the bool mask plus the additive bias the
# memory-efficient kernel builds from it (2 bytes in bf16/fp16, 4 in fp32).
MASK_BYTES_PER_PAIR = {torch.bfloat16: 1 + 2, torch.float16: 1 + 2, torch.float32: 1 + 4}
# create_block_mask's eager evaluation: two int64 gathers (query and key block ids) per token pair
TOKEN_MASK_BYTES_PER_PAIR = 2 * 8
# Leave this share of free memory for q/k/v, grads and the kernel's workspace.
MEMORY_HEADROOM = 0.8


@dataclass
class Row:
    frames: int
    sp: int
    heads: int
    tokens: int
    backend: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    ratio: Optional[float] = None
    ideal: Optional[float] = None
    vs_dense: Optional[float] = None
    note: str = ""


def block_ids(frames: int, tokens_per_frame: int) -> torch.Tensor:
    return torch.arange(frames).repeat_interleave(tokens_per_frame)


def allowed_pairs(spec: MaskSpec) -> int:
    """Exact number of (query, key) pairs the block-causal mask allows."""
    return sum((qe - qs) * sum(e - s for s, e in ranges) for qs, qe, ranges in prefix_plan(spec))


def fwd_bwd_flops(pairs: int, batch: int, heads: int, head_dim: int) -> float:
    return (1.0 + BWD_OVER_FWD) * 4.0 * pairs * batch * heads * head_dim


def full_kernels(device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """Every fused unmasked kernel that can run here, by name."""
    def via_sdpa(kind: Optional[object]) -> Callable:
        def run(q, k, v):
            ctx = contextlib.nullcontext() if kind is None else torch.nn.attention.sdpa_kernel([kind])
            with ctx:
                return _sdpa(q, k, v)
        return run

    if device.type != "cuda":
        return {"full:sdpa": via_sdpa(None)}
    from torch.nn.attention import SDPBackend

    kernels: dict[str, Callable] = {}
    fa = _flash_attn_func()
    half = dtype in (torch.float16, torch.bfloat16)
    if fa is not None and half:
        kernels["full:flash_attn"] = lambda q, k, v: fa(q, k, v, causal=False)
    # the memory-efficient kernel is never the fastest in half precision where flash runs
    names = ("FLASH_ATTENTION", "CUDNN_ATTENTION") if half else ("EFFICIENT_ATTENTION",)
    for name in names:
        if hasattr(SDPBackend, name):
            kernels[f"full:sdpa_{name.split('_')[0].lower()}"] = via_sdpa(getattr(SDPBackend, name))
    return kernels


def measure(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace,
            device: torch.device, backward: bool) -> float:
    grad = torch.randn_like(q)

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        if backward:
            out.backward(grad)

    return time_fn(step, device, args.warmup, args.iters, args.max_seconds).median_ms


def bench_case(frames: int, sp: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
               ) -> list[Row]:
    heads = args.heads // sp
    tokens = frames * args.tokens_per_frame
    ids = block_ids(frames, args.tokens_per_frame)
    spec = MaskSpec(ids, ids, key=("bench", frames, args.tokens_per_frame))
    pairs = allowed_pairs(spec)
    gen = torch.Generator(device=device).manual_seed(frames * 1000 + sp)
    shape = (args.batch, tokens, heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    ideal = (frames + 1) / (2 * frames)
    rows: list[Row] = []

    def run(name: str, fn: Callable, n_pairs: int, backward: bool = True, note: str = "") -> None:
        row = Row(frames, sp, heads, tokens, name, ideal=ideal if not name.startswith("full") else 1.0, note=note)
        try:
            row.ms = measure(fn, q, k, v, args, device, backward)
            row.tflops = fwd_bwd_flops(n_pairs, args.batch, heads, args.head_dim) / (row.ms * 1e-3) / 1e12
        except RuntimeError as err:  # OOM, or a kernel that rejects this shape: keep the table going
            row.note = "OOM" if is_oom(err) else f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
        release(device)
        rows.append(row)
        # progressively: a part cut short by a timeout keeps what it measured
        print(f"# F={frames} P={sp} {name}: {fmt(row.ms)} ms {fmt(row.tflops)} TFLOP/s {row.note}", flush=True)

    # ours first, then what it is compared with (a part cut short keeps the most important rows)
    if "merged" in args.backends:
        plan = merge_plan(spec)
        kernel = choose_kernel(device, dtype, args.head_dim).name
        run("merged", lambda a, b, c: block_attention(a, b, c, spec, "merged"), pairs,
            note=f"{len(plan.groups)} batched calls via {kernel}")
        for name in args.merged_kernels if frames in args.variant_frames else []:
            run(f"merged:{name}", lambda a, b, c, name=name: merged_block_attention(a, b, c, spec, kernel=name),
                pairs, note=f"{len(plan.groups)} batched calls via {name}")
    for name, fn in full_kernels(device, dtype).items():  # full attention, same shape
        run(name, fn, tokens * tokens)
    flex_here = _flex() is not None and device.type == "cuda"
    if "flex" in args.backends:
        if flex_here:
            run("flex", lambda a, b, c: block_attention(a, b, c, spec, "flex"), pairs)
        else:
            rows.append(Row(frames, sp, heads, tokens, "flex", ideal=ideal,
                            note="skipped: " + ("FlexAttention has no CPU backward" if _flex() is not None
                                                else "flex_attention unavailable")))
    if "sdpa" in args.backends:
        need = tokens * tokens * MASK_BYTES_PER_PAIR[dtype]
        budget = free_memory(device) * MEMORY_HEADROOM
        if need > budget or frames > args.dense_max_frames:
            rows.append(Row(frames, sp, heads, tokens, "sdpa", ideal=ideal,
                            note=f"skipped: dense {tokens}x{tokens} mask needs {need / 2**30:.0f} GiB "
                                 f"(free {budget / 2**30:.0f} GiB, --dense-max-frames {args.dense_max_frames})"))
        else:
            try:
                mask = spec.allowed().to(device)  # built once: time the kernel, not the mask upload
                run("sdpa", lambda a, b, c: _sdpa(a, b, c, mask), pairs, note="dense mask prebuilt on device")
                del mask
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                rows.append(Row(frames, sp, heads, tokens, "sdpa", ideal=ideal, note="OOM building the mask"))
            release(device)
    if "flash" in args.backends:
        kernel = "flash_attn" if _flash_attn_func() is not None and device.type == "cuda" else "torch fused SDPA"
        run("flash", lambda a, b, c: block_attention(a, b, c, spec, "flash"), pairs,
            note=f"{frames} prefix calls via {kernel}")
    if "flex" in args.backends and flex_here and args.flex_options and frames in args.variant_frames:
        options = json.loads(args.flex_options)
        flex_fn = _flex()[0]
        flex_mask = flex_block_mask_from_blocks(spec, device)

        def tuned(a, b, c):
            out = flex_fn(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), block_mask=flex_mask,
                          kernel_options=options)
            return out.transpose(1, 2)
        run("flex:tuned", tuned, pairs, note=args.flex_options)
    full_ms = [r.ms for r in rows if r.backend.startswith("full") and r.ms is not None]
    dense_ms = [r.ms for r in rows if r.backend == "sdpa" and r.ms is not None]
    for r in rows:
        if r.ms is not None:
            r.ratio = r.ms / min(full_ms) if full_ms else None
            r.vs_dense = r.ms / dense_ms[0] if dense_ms else None
    print("\n".join(summary_lines(rows)), flush=True)
    return rows


def summary_lines(rows: list[Row]) -> list[str]:
    """Per shape: ours (merged) / best full kernel, ours / dense mask, flex / best full kernel."""
    lines = []
    for key in sorted({(r.frames, r.sp) for r in rows}):
        case = {r.backend: r for r in rows if (r.frames, r.sp) == key}
        ours, flex = case.get("merged"), case.get("flex")
        lines.append(f"# F={key[0]} P={key[1]}: merged / best full {fmt(ours.ratio if ours else None)}, "
                     f"merged / dense mask {fmt(ours.vs_dense if ours else None)}, "
                     f"flex / best full {fmt(flex.ratio if flex else None)}, ideal {fmt(ours.ideal if ours else None)}")
    return lines


@dataclass
class MaskRow:
    frames: int
    tokens: int
    token_level_ms: Optional[float]
    block_level_ms: Optional[float]
    note: str = ""


def bench_mask_build(frames: int, args: argparse.Namespace, device: torch.device) -> MaskRow:
    from torch.nn.attention.flex_attention import create_block_mask

    ids = block_ids(frames, args.tokens_per_frame)
    spec = MaskSpec(ids, ids)
    n = ids.numel()
    block_ms = time_fn(lambda: flex_block_mask_from_blocks(spec, device), device, 1, args.iters,
                       args.max_seconds).median_ms
    # create_block_mask evaluates mask_mod on all pairs at once: int64 block ids gathered per pair
    if n * n * TOKEN_MASK_BYTES_PER_PAIR > free_memory(device) * MEMORY_HEADROOM:
        return MaskRow(frames, n, None, block_ms, f"token-level skipped: {n}^2 pairs exceed free memory")
    mod = _mask_mod(spec, device)
    try:
        token_ms = time_fn(lambda: create_block_mask(mod, None, None, n, n, device=device), device, 1,
                           args.iters, args.max_seconds).median_ms
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        release(device)
        return MaskRow(frames, n, None, block_ms, "token-level OOM")
    return MaskRow(frames, n, token_ms, block_ms)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="8,32,128", help="latent frames F, comma list")
    p.add_argument("--sp", default="1,2,4", help="Ulysses degrees P (per-rank heads = heads/P)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens-per-frame", type=int, default=1024, help="video tokens per latent frame (512^2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backends", default="flex,merged,flash,sdpa")
    p.add_argument("--dense-max-frames", type=int, default=32, help="skip the dense-mask sdpa row above this F "
                                                                      "(its L^2 mask takes long to build)")
    p.add_argument("--merged-kernels", default="", help="also time merged with these piece kernels, comma list "
                                                         "(cudnn, flash, efficient; cpu_flash on CPU)")
    p.add_argument("--flex-options", default="", help="JSON kernel_options for a flex:tuned row, e.g. "
                                                      "'{\"BLOCK_M\": 128, \"BLOCK_N\": 128}'")
    p.add_argument("--variant-frames", default="", help="F values for the merged:<kernel> / flex:tuned rows "
                                                        "(default: all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=20.0, help="measuring time cap per kernel and shape")
    p.add_argument("--no-mask-build", action="store_true", help="skip the BlockMask build table")
    p.add_argument("--mask-build-only", action="store_true", help="only the BlockMask build table")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shapes on CPU (CI)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.frames, args.sp, args.heads, args.head_dim, args.tokens_per_frame = "2,4", "1,2", 2, 16, 16
        args.warmup, args.iters, args.max_seconds = 1, 2, 0.0
    args.frames, args.sp, args.backends = csv_list(args.frames, int), csv_list(args.sp, int), csv_list(args.backends)
    args.merged_kernels = csv_list(args.merged_kernels)
    args.variant_frames = csv_list(args.variant_frames, int) or args.frames
    for p_ in args.sp:
        if args.heads % p_:
            raise SystemExit(f"--sp {p_}: must divide --heads {args.heads} (Ulysses shards heads)")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    device, dtype = bench_device(args.cpu_smoke)
    if device.type == "cuda":
        allow_recompiles(len(args.frames) * len(args.sp) * (2 if args.flex_options else 1))
    print(f"# block-causal attention, fwd+bwd — {device_name(device)}, {str(dtype).replace('torch.', '')}, "
          f"batch {args.batch}, {args.heads} heads x {args.head_dim}, {args.tokens_per_frame} tokens/frame")
    rows: list[Row] = []
    if not args.mask_build_only:
        for frames in args.frames:
            for sp in args.sp:
                rows.extend(bench_case(frames, sp, args, device, dtype))
        headers = ["F", "P", "heads", "tokens", "backend", "ms", "TFLOP/s", "ratio", "ideal", "vs dense", "note"]
        print(markdown_table(headers, [[str(r.frames), str(r.sp), str(r.heads), str(r.tokens), r.backend,
                                        fmt(r.ms), fmt(r.tflops), fmt(r.ratio), fmt(r.ideal), fmt(r.vs_dense), r.note]
                                       for r in rows]))
        print("\n".join(summary_lines(rows)))
    mask_rows: list[MaskRow] = []
    if not args.no_mask_build and _flex() is not None:
        mask_rows = [bench_mask_build(f, args, device) for f in args.frames]
        print(f"\n# flex BlockMask build (ms) — {device_name(device)}")
        print(markdown_table(["F", "tokens", "create_block_mask", "from block ids", "note"],
                             [[str(m.frames), str(m.tokens), fmt(m.token_level_ms), fmt(m.block_level_ms), m.note]
                              for m in mask_rows]))
    dump_json(args.json, {"device": device_name(device), "dtype": str(dtype), "rows": rows, "mask_build": mask_rows})


if __name__ == "__main__":
    main()
