"""GPU correctness checks behind the benchmarks; runnable without pytest (bare GPU machines).

  attention   every block-causal backend vs the dense-mask reference at the benchmark shapes
              (12 heads/P x 128, 1024 tokens per latent frame), forward and backward. Tolerance:
              a bf16 backend may be off the high-precision reference by at most ``SLACK`` times
              the bf16 reference's own error (the rounding any bf16 kernel makes), plus a floor.
              Where the L^2 reference does not fit, the reference is computed for sample query
              blocks (first, middle, last) against all keys.
  fp8_linear  each FP8 backend's linear (lite FFN dims) vs bf16: output and gradients.
  fp8_loss    FP8 vs bf16 training losses over 50 steps on learnable synthetic clips (lite, Phase 4):
              mean of the last ``LOSS_WINDOW`` losses within 2%.

``tests/test_gpu_kernels.py`` runs the same functions under pytest (marked gpu).

  python benchmarks/gpu_checks.py [--json out.json]
  python benchmarks/gpu_checks.py --cpu-smoke         # tiny shapes on CPU: exercises the checks
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from common import allow_recompiles, csv_list, dump_json, free_memory, markdown_table, release  # noqa: I100
from dualforce_mega.data.synthetic import make_synthetic_clip
from dualforce_mega.models.attention import MaskSpec, _flex, _sdpa, block_attention
from dualforce_mega.models.fp8 import FP8_DIM_MULTIPLE, _torchao_available, _te_available, convert_linears, \
    fp8_targets

log = logging.getLogger("gpu_checks")

# a backend may be this many times further from the reference than the same-precision reference
SLACK = 2.0
# ... plus this fraction of the reference's largest magnitude (errors far below rounding noise)
FLOOR = 1e-3
# FP8 relative L2 error bounds of one FFN (two GEMMs) vs high precision, output and input gradient
# (E4M3 forward, E5M2 gradients). Observed with the torch backend on the CPU smoke (32->64->32):
# 5.2 % and 7.1 %; the bounds leave ~2x margin and still catch a wrong scale (errors ~100 %).
FP8_LINEAR_REL = 0.10
FP8_GRAD_REL = 0.15
LOSS_STEPS = 50
LOSS_WINDOW = 10
LOSS_REL = 0.02
MASK_BYTES_PER_PAIR = 1 + 4  # bool mask + fp32 bias of the fp32 reference


@dataclass
class Check:
    name: str
    passed: bool
    value: Optional[float] = None   # the measured quantity (error ratio, relative loss gap, ...)
    bound: Optional[float] = None
    detail: str = ""


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype        # kernel dtype (bf16 on GPU)
    ref_dtype: torch.dtype    # reference dtype
    heads: int = 12
    head_dim: int = 128
    tokens_per_frame: int = 1024

    @staticmethod
    def detect(cpu_smoke: bool) -> "Setup":
        if cpu_smoke or not torch.cuda.is_available():
            return Setup(torch.device("cpu"), torch.float32, torch.float64, heads=2, head_dim=16, tokens_per_frame=16)
        return Setup(torch.device("cuda"), torch.bfloat16, torch.float32)


def _backends(setup: Setup, backward: bool, only: Optional[list[str]] = None) -> list[str]:
    if only:
        return list(only)
    names = ["flash", "merged"]
    if _flex() is not None and (setup.device.type == "cuda" or not backward):
        names.append("flex")  # FlexAttention has no CPU backward
    return names


def _rel(err: float, scale: float) -> float:
    return err / max(scale, 1e-30)


def attention_check(setup: Setup, frames: int, sp: int, backward: bool, only: Optional[list[str]] = None
                    ) -> list[Check]:
    """Backends (all that run here, or ``only``) vs the dense reference on [1, F*T, heads/sp, D] q/k/v."""
    heads = setup.heads // sp
    n = frames * setup.tokens_per_frame
    ids = torch.arange(frames).repeat_interleave(setup.tokens_per_frame)
    spec = MaskSpec(ids, ids, key=("check", frames, setup.tokens_per_frame))
    gen = torch.Generator(device=setup.device).manual_seed(1000 * frames + sp)
    shape = (1, n, heads, setup.head_dim)
    q, k, v = (torch.randn(shape, device=setup.device, generator=gen, dtype=setup.ref_dtype) for _ in range(3))
    dy = torch.randn(shape, device=setup.device, generator=gen, dtype=setup.ref_dtype)
    fits = n * n * MASK_BYTES_PER_PAIR * 3 < free_memory(setup.device)
    tag = f"attention F={frames} P={sp} {'fwd+bwd' if backward else 'fwd'}"
    if not fits:
        if backward:
            return [Check(tag, True, detail="skipped: dense reference does not fit (backward needs all rows)")]
        return _sampled_rows_check(setup, spec, q, k, v, tag)

    def run(fn: Callable, dtype: torch.dtype) -> list[torch.Tensor]:
        args = [t.detach().to(dtype, copy=True).requires_grad_(backward) for t in (q, k, v)]
        out = fn(*args)
        if not backward:
            return [out.detach().to(setup.ref_dtype)]
        out.backward(dy.to(dtype))
        return [out.detach().to(setup.ref_dtype)] + [a.grad.to(setup.ref_dtype) for a in args]

    mask = spec.allowed().to(setup.device)
    reference = run(lambda a, b, c: _sdpa(a, b, c, mask), setup.ref_dtype)
    low = run(lambda a, b, c: _sdpa(a, b, c, mask), setup.dtype)
    del mask
    checks = []
    for name in _backends(setup, backward, only):
        got = run(lambda a, b, c, name=name: block_attention(a, b, c, spec, name), setup.dtype)
        worst, detail = 0.0, []
        for label, r, lo, g in zip(("out", "dq", "dk", "dv"), reference, low, got):
            scale = float(r.abs().max())
            bound = SLACK * float((lo - r).abs().max()) + FLOOR * scale
            err = float((g - r).abs().max())
            worst = max(worst, err / bound)
            detail.append(f"{label} {err:.2e}/{bound:.2e}")
        checks.append(Check(f"{tag} {name}", worst <= 1.0, worst, 1.0, ", ".join(detail)))
    release(setup.device)
    return checks


def _sampled_rows_check(setup: Setup, spec: MaskSpec, q, k, v, tag: str) -> list[Check]:
    """Forward only: reference rows of the first, middle and last query block against all keys."""
    frames = int(spec.q_blocks.max()) + 1
    t = setup.tokens_per_frame
    rows = torch.cat([torch.arange(b * t, (b + 1) * t) for b in sorted({0, frames // 2, frames - 1})])
    rows_dev = rows.to(setup.device)
    mask = MaskSpec(spec.q_blocks[rows], spec.k_blocks, spec.window, spec.sink).allowed().to(setup.device)
    qr = q[:, rows_dev]
    reference = _sdpa(qr, k, v, mask)
    low = _sdpa(qr.to(setup.dtype), k.to(setup.dtype), v.to(setup.dtype), mask).to(setup.ref_dtype)
    del mask
    scale = float(reference.abs().max())
    bound = SLACK * float((low - reference).abs().max()) + FLOOR * scale
    checks = []
    for name in _backends(setup, backward=False):
        with torch.no_grad():
            out = block_attention(q.to(setup.dtype), k.to(setup.dtype), v.to(setup.dtype), spec, name)
        err = float((out[:, rows_dev].to(setup.ref_dtype) - reference).abs().max())
        checks.append(Check(f"{tag} {name} (rows of blocks 0, F/2, F-1)", err <= bound, err / bound, 1.0,
                            f"out {err:.2e}/{bound:.2e}"))
        del out
        release(setup.device)
    return checks


# --------------------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------------------
def fp8_backends_here(setup: Setup) -> list[str]:
    """FP8 backends that can run on this device (all need sm >= 8.9 on CUDA; torch also runs on CPU)."""
    if setup.device.type == "cuda":
        if torch.cuda.get_device_capability(setup.device) < (8, 9):
            return []
        names = ["te"] if _te_available() else []
        return names + (["torchao"] if _torchao_available() else []) + ["torch"]
    return ["torch"] if hasattr(torch, "_scaled_mm") else []


class _FFN(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        from dualforce_mega.models.layers import FeedForward

        self.ffn = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


def fp8_linear_check(setup: Setup, backend: str, dim: int, hidden: int, tokens: int) -> Check:
    """One FFN (dim -> hidden -> dim) in FP8 vs bf16: relative L2 error of output and input grad."""
    from dualforce_mega.models.fp8 import FP8State, _te_recipe, fp8_autocast

    torch.manual_seed(0)
    dtype = torch.bfloat16 if setup.device.type == "cuda" else torch.float32
    ref = _FFN(dim, hidden).to(setup.device, dtype)
    fp8 = _FFN(dim, hidden).to(setup.device, dtype)
    fp8.load_state_dict(ref.state_dict())
    names, skipped = fp8_targets(fp8)
    convert_linears(fp8, backend, names)
    state = FP8State(backend=backend, te_recipe=_te_recipe("current") if backend == "te" else None)
    # tokens not a multiple of 16 on purpose: the struct stream's N = 1 + 4(F-1)
    x = torch.randn(2, tokens, dim, device=setup.device, dtype=dtype)
    outs, grads = [], []
    for model, ctx in ((ref, None), (fp8, state)):
        xi = x.clone().requires_grad_()
        if ctx is None:
            y = model(xi)
        else:
            with fp8_autocast(ctx):
                y = model(xi)
        y.float().square().mean().backward()
        outs.append(y.detach().float())
        grads.append(xi.grad.float())
    rel_out = float((outs[1] - outs[0]).norm() / outs[0].norm())
    rel_grad = float((grads[1] - grads[0]).norm() / grads[0].norm())
    exact = rel_out == 0.0  # an unconverted model would match bit for bit
    ok = not exact and not skipped and rel_out <= FP8_LINEAR_REL and rel_grad <= FP8_GRAD_REL
    return Check(f"fp8 linear {backend} ({dim}->{hidden}->{dim}, {tokens} tokens)", ok, rel_out, FP8_LINEAR_REL,
                 f"rel err out {rel_out:.3f}, dx {rel_grad:.3f}{' (identical: not converted?)' if exact else ''}")


def synthetic_batch(cfg, batch: int, frames: int, hw: int, step: int, device: torch.device) -> dict:
    clips = [make_synthetic_clip(step * batch + i, frames, (hw, hw), cfg.model, seed=cfg.data.seed)[0]
             for i in range(batch)]
    out = {k: torch.stack([c[k] for c in clips]).to(device) for k in clips[0] if k != "text_emb"}
    out["__index__"] = torch.arange(step * batch, (step + 1) * batch)   # host side, as the loader delivers it
    return out


def fp8_loss_check(setup: Setup, args: argparse.Namespace, backend: str, steps: int = LOSS_STEPS) -> Check:
    """Train twice from the same init on the same batches and noise: bf16, then FP8 (``backend``)."""
    import bench_train_step as bts

    losses: dict[str, list[float]] = {}
    dtype = torch.bfloat16 if setup.device.type == "cuda" else torch.float32
    for label in ("bf16", "fp8"):
        variant = bts.Variant.parse("eager" if label == "bf16" else f"eager+fp8={backend}+fp8all")
        cfg = bts.phase_config(args, 4, variant, args.train_frames)
        cfg.train.fp8_recipe = args.fp8_recipe
        stepper = bts.Stepper(cfg, setup.device, dtype, fp8_all=True)   # same seed -> same init
        run = []
        for step in range(steps):
            batch = synthetic_batch(cfg, args.batch, args.train_frames, args.latent, step, setup.device)
            stepper.step(batch)
            run.append(stepper.last_loss)
        losses[label] = run
        stepper.close()
        release(setup.device)
    window = min(LOSS_WINDOW, steps)
    a = sum(losses["bf16"][-window:]) / window
    b = sum(losses["fp8"][-window:]) / window
    rel = abs(b - a) / abs(a)
    first = losses["bf16"][0]
    return Check(f"fp8 loss {backend} vs bf16 ({steps} steps, mean of last {window})", rel <= LOSS_REL, rel, LOSS_REL,
                 f"bf16 {first:.4f} -> {a:.4f}, fp8 {losses['fp8'][0]:.4f} -> {b:.4f}")


# --------------------------------------------------------------------------------------
def run_checks(args: argparse.Namespace) -> list[Check]:
    setup = Setup.detect(args.cpu_smoke)
    if setup.device.type == "cuda":
        allow_recompiles(2 * len(args.frames) * len(args.sp) + 8)  # attention shapes + the model's
    checks: list[Check] = []
    for frames in args.frames:
        for sp in args.sp:
            checks += attention_check(setup, frames, sp, backward=False)
            if frames <= args.backward_max_frames:
                checks += attention_check(setup, frames, sp, backward=True)
    here = fp8_backends_here(setup)
    for backend in here:
        checks.append(fp8_linear_check(setup, backend, args.fp8_dim, args.fp8_hidden, args.fp8_tokens))
    if here and args.loss_steps:
        checks.append(fp8_loss_check(setup, args, here[0], args.loss_steps))  # the backend auto picks
    if not here:
        checks.append(Check("fp8", True, detail="skipped: no FP8 on this device (needs CUDA sm >= 8.9)"))
    return checks


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="8,32,128", help="latent frames of the attention checks")
    p.add_argument("--sp", default="1,2,4", help="Ulysses degrees (heads/P per rank)")
    p.add_argument("--backward-max-frames", type=int, default=32)
    p.add_argument("--preset", default="lite", help="model of the FP8 loss check")
    p.add_argument("--train-frames", type=int, default=9, help="latent frames of the FP8 loss check")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fp8-recipe", default="delayed", choices=("delayed", "current"))
    p.add_argument("--fp8-dim", type=int, default=1536)
    p.add_argument("--fp8-hidden", type=int, default=8960)
    p.add_argument("--fp8-tokens", type=int, default=4097, help="tokens per sample (not a multiple of 16)")
    p.add_argument("--loss-steps", type=int, default=LOSS_STEPS)
    p.add_argument("--json", default="")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.frames, args.sp, args.backward_max_frames = "2,3", "1,2", 3
        args.preset, args.train_frames, args.latent = "tiny", 3, 8
        args.fp8_dim, args.fp8_hidden, args.fp8_tokens, args.loss_steps = 32, 64, 33, 4
    args.frames, args.sp = csv_list(args.frames, int), csv_list(args.sp, int)
    if args.fp8_dim % FP8_DIM_MULTIPLE or args.fp8_hidden % FP8_DIM_MULTIPLE:
        raise SystemExit(f"--fp8-dim/--fp8-hidden must be multiples of {FP8_DIM_MULTIPLE}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    checks = run_checks(args)
    print(markdown_table(["check", "result", "value", "bound", "detail"],
                         [[c.name, "PASS" if c.passed else "FAIL", "-" if c.value is None else f"{c.value:.3g}",
                           "-" if c.bound is None else f"{c.bound:.3g}", c.detail] for c in checks]))
    dump_json(args.json, {"checks": checks})
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
