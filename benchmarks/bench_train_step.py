"""One-GPU training-step throughput: Phase 2 and Phase 4, bf16 vs FP8 side by side, MFU, memory.

Plain PyTorch step (no DeepSpeed): the real Diffusion Forcing objective (``DiffusionForcingObjective``)
on a random batch with the trainer's batch schema, forward, backward, AdamW. Parameters are bf16.
MFU = model FLOPs of the step (``dualforce_mega.flops``: block-causal pairs only, backward = 2x
forward, recomputation not counted) / step time / bf16 matmul peak measured in the same run. FP8
rows use the same bf16 peak, so their MFU shows the gain directly.

Then the largest number of latent frames one GPU trains with activation checkpointing: doubling
from ``--frames`` until a step runs out of memory, then bisection.

  python benchmarks/bench_train_step.py                  # lite, 33 frames 512^2 = 9 latent frames 64x64
  python benchmarks/bench_train_step.py --cpu-smoke      # tiny preset on CPU (CI)
"""
from __future__ import annotations

import argparse
import gc
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from common import (allow_recompiles, bench_device, csv_list, device_name, dump_json, fmt,  # noqa: I100
                    is_oom, markdown_table, release, time_fn)
from dualforce_mega.config import Config, model_preset
from dualforce_mega.diffusion.objective import DiffusionForcingObjective
from dualforce_mega.flops import forward_flops
from dualforce_mega.models import DualForceModel
from dualforce_mega.models.fp8 import FP8State, apply_fp8, fp8_autocast
from dualforce_mega.models.layout import num_video_frames
from dualforce_mega.training.monitor import measure_peak_flops
from dualforce_mega.training.phase import apply_phase

log = logging.getLogger("bench_train_step")

DTYPE_LABEL = {torch.bfloat16: "bf16", torch.float32: "fp32"}
# max-frames search by extrapolation: sizes probed (frames, 2x, 4x), share of memory left to the
# allocator's fragmentation, verification attempts and the step down after a failed one
FIT_POINTS = 3
ALLOCATOR_MARGIN = 0.05
FIT_VERIFY_TRIES = 3
FIT_BACKOFF = 0.9


@dataclass
class StepRow:
    phase: int
    precision: str
    frames: int
    tokens: int                    # video + struct tokens per step
    ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_gib: Optional[float] = None
    tflops: Optional[float] = None  # achieved model TFLOP/s
    mfu: Optional[float] = None
    speedup: Optional[float] = None  # vs the bf16 row of the same phase
    loss: Optional[float] = None
    note: str = ""


def phase_config(args: argparse.Namespace, phase: int, fp8: bool, frames: int, checkpointing: bool,
                 backend: str = "") -> Config:
    """The trainer's config for this run, built from the dataclasses (no YAML: only torch needed)."""
    cfg = Config()
    cfg.model = model_preset(args.preset, **({"attn_backend": backend} if backend else {}))
    t = cfg.train
    t.phase, t.fp8, t.fp8_recipe = phase, fp8, args.fp8_recipe
    t.micro_batch = t.global_batch = args.batch
    t.activation_checkpointing = checkpointing
    cfg.data.window = cfg.data.synthetic_frames = frames
    return apply_phase(cfg)  # validates


def random_batch(cfg: Config, batch: int, frames: int, hw: int, text_tokens: int, device: torch.device
                 ) -> dict:
    """A batch in the loader's schema (docs/INTERFACES.md) with random contents."""
    m = cfg.model
    gen = torch.Generator().manual_seed(frames)
    n = num_video_frames(frames, m.vae_temporal_stride)
    out = {"video_latent": torch.randn(batch, m.in_channels, frames, hw, hw, generator=gen),
           "struct": torch.randn(batch, n, m.motion_dim, generator=gen),
           "kp_canonical": torch.randn(batch, m.kp_dim, generator=gen),
           "audio": torch.randn(batch, n * m.audio_rate // m.fps, m.audio_dim, generator=gen),
           "flame": torch.randn(batch, n, m.flame_dim, generator=gen)}
    if text_tokens and m.text_dim:
        out["text_emb"] = torch.randn(batch, text_tokens, m.text_dim, generator=gen)
    return {k: v.to(device) for k, v in out.items()}


class Stepper:
    """Model + AdamW + objective for one configuration; ``step()`` is one optimizer step."""

    def __init__(self, cfg: Config, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.model = DualForceModel(cfg.model).to(device=device, dtype=dtype).train()
        self.model.gradient_checkpointing = cfg.train.activation_checkpointing
        self.fp8: FP8State = apply_fp8(self.model, cfg, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                     eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay,
                                     fused=device.type == "cuda")
        self.objective = DiffusionForcingObjective(cfg)
        self.return_aux = cfg.train.phase == 4 and cfg.model.struct_tower
        self.n_step = 0
        self.last_loss = float("nan")

    def step(self, batch: dict) -> None:
        b = batch["video_latent"].shape[0]
        seeds = torch.arange(b) + self.n_step * b
        inputs, targets = self.objective.prepare(batch, seeds)
        with fp8_autocast(self.fp8):
            out = self.model(**inputs, return_aux=self.return_aux)
        loss, metrics = self.objective.losses(out, targets.to(batch["video_latent"].device))
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.n_step += 1
        self.last_loss = metrics["loss"]

    def close(self) -> None:
        del self.model, self.opt


def bench_step(args: argparse.Namespace, phase: int, precision: str, device: torch.device,
               dtype: torch.dtype, peak: float) -> StepRow:
    frames = args.frames
    cfg = phase_config(args, phase, precision == "fp8", frames, args.checkpointing)
    lv = frames * (args.latent // cfg.model.patch_size[1]) * (args.latent // cfg.model.patch_size[2])
    n = num_video_frames(frames, cfg.model.vae_temporal_stride) if cfg.model.struct_tower else 0
    label = precision if precision == "fp8" else DTYPE_LABEL[dtype]
    row = StepRow(phase, label, frames, args.batch * (lv + n))
    stepper: Optional[Stepper] = None
    try:
        stepper = Stepper(cfg, args, device, dtype)
        if precision == "fp8" and not stepper.fp8.enabled:
            row.note = f"fp8 off: {stepper.fp8.reason}"
            return row
        batch = random_batch(cfg, args.batch, frames, args.latent, args.text_tokens, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_fn(lambda: stepper.step(batch), device, args.warmup, args.iters, args.max_seconds)
        row.ms = timing.median_ms
        row.tokens_per_s = row.tokens / (row.ms * 1e-3)
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        flops = forward_flops(cfg.model, args.batch, frames, (args.latent, args.latent),
                              text_len=args.text_tokens, with_struct=cfg.model.struct_tower,
                              with_audio=cfg.model.audio, return_aux=stepper.return_aux).training
        row.tflops = flops / (row.ms * 1e-3) / 1e12
        row.mfu = row.tflops / peak
        row.loss = stepper.last_loss
        row.note = stepper.fp8.reason if precision == "fp8" else ""
    except RuntimeError as err:
        if not is_oom(err):
            raise
        row.note = "OOM"
    finally:
        if stepper is not None:
            stepper.close()
        gc.collect()
        release(device)
    return row


def fits(stepper: Stepper, args: argparse.Namespace, frames: int, device: torch.device) -> bool:
    """One training step at ``frames`` latent frames runs without running out of memory."""
    try:
        batch = random_batch(stepper.cfg, args.batch, frames, args.latent, args.text_tokens, device)
        stepper.step(batch)
        return True
    except RuntimeError as err:
        if not is_oom(err):
            raise
        stepper.opt.zero_grad(set_to_none=True)
        return False
    finally:
        gc.collect()
        release(device)


def _bisect(stepper: Stepper, args: argparse.Namespace, device: torch.device) -> tuple[int, Optional[int], str]:
    """Doubling from ``--frames`` until a step runs out of memory (or the cap), then bisection."""
    lo, hi = 0, None
    f = args.frames
    while hi is None and lo < args.search_max_frames:
        f = min(f, args.search_max_frames)
        if fits(stepper, args, f, device):
            lo, f = f, 2 * f
        else:
            hi = f
    if lo == 0:
        return 0, hi, f"{args.frames} latent frames already do not fit"
    if hi is None:
        return lo, None, f"no OOM up to --search-max-frames {args.search_max_frames}"
    while hi - lo > args.search_tolerance:
        mid = (lo + hi) // 2
        if fits(stepper, args, mid, device):
            lo = mid
        else:
            hi = mid
    return lo, hi, "doubling + bisection"


def _fit(stepper: Stepper, args: argparse.Namespace, device: torch.device) -> Optional[tuple[int, Optional[int], str]]:
    """Peak memory is affine in the number of frames (O(L) attention, one checkpointed layer live at a
    time): measure it at three small sizes, extrapolate to the device's memory, verify with one step
    (stepping down by ``FIT_BACKOFF`` on OOM). Probing large sizes by bisection would cost minutes per
    step. None if a small probe already fails."""
    sizes = [args.frames * 2 ** i for i in range(FIT_POINTS)]
    peaks = []
    for f in sizes:
        torch.cuda.reset_peak_memory_stats(device)
        if not fits(stepper, args, f, device):
            return None
        peaks.append(torch.cuda.max_memory_allocated(device))
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(peaks) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, peaks)) / sum((x - mx) ** 2 for x in sizes)
    intercept = my - slope * mx
    budget = torch.cuda.mem_get_info(device)[1] * (1 - ALLOCATOR_MARGIN)
    pred = min(int((budget - intercept) / slope), args.search_max_frames)
    model_note = f"linear fit {slope / 2**20:.0f} MiB/frame + {intercept / 2**30:.1f} GiB"
    first_oom = None
    for _ in range(FIT_VERIFY_TRIES):
        if pred <= sizes[-1]:
            break
        if fits(stepper, args, pred, device):
            return pred, first_oom, f"{model_note}; verified by one step at {pred}"
        first_oom, pred = pred, int(pred * FIT_BACKOFF)
    return sizes[-1], first_oom, f"{model_note}; prediction did not verify, largest measured size reported"


def max_frames(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[int, Optional[int], str]:
    """(largest frames that fit, smallest known not to or None, how it was found), Phase ``--search-phase``."""
    cfg = phase_config(args, args.search_phase, False, args.frames, True, args.search_backend)
    stepper = Stepper(cfg, args, device, dtype)
    try:
        if args.search_method == "fit" and device.type == "cuda":
            found = _fit(stepper, args, device)
            if found is not None:
                return found
        return _bisect(stepper, args, device)
    finally:
        stepper.close()
        gc.collect()
        release(device)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lite")
    p.add_argument("--frames", type=int, default=9, help="latent frames (33 video frames = 9)")
    p.add_argument("--latent", type=int, default=64, help="latent height = width (512 / VAE stride 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=0, help="text embedding tokens (0 = no text input)")
    p.add_argument("--phases", default="2,4")
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--fp8-recipe", default="delayed", choices=("delayed", "current"))
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=60.0, help="measuring time cap per row")
    p.add_argument("--peak-n", type=int, default=8192, help="matmul size for the measured bf16 peak")
    p.add_argument("--no-search", action="store_true", help="skip the max-frames search")
    p.add_argument("--search-phase", type=int, default=4, choices=(2, 4))
    p.add_argument("--search-backend", default="flash",
                   help="attention backend for the search: flash needs no recompilation per probed length "
                        "and has the same O(L) memory as flex")
    p.add_argument("--search-method", default="fit", choices=("fit", "bisect"),
                   help="fit: extrapolate measured peak memory and verify with one step (CUDA); "
                        "bisect: doubling + bisection (exact, slow at large sizes)")
    p.add_argument("--search-max-frames", type=int, default=1024)
    p.add_argument("--search-tolerance", type=int, default=4, help="stop bisecting at this frame interval")
    p.add_argument("--json", default="")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset, fp32, CPU (CI)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.preset, args.frames, args.latent = "tiny", 3, 8
        args.warmup, args.iters, args.max_seconds, args.peak_n = 0, 1, 0.0, 256
        args.search_max_frames, args.search_tolerance = 6, 1
    args.phases, args.precisions = csv_list(args.phases, int), csv_list(args.precisions)
    for prec in args.precisions:
        if prec not in ("bf16", "fp8"):
            raise SystemExit(f"--precisions: {prec!r} is not bf16 or fp8")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    device, dtype = bench_device(args.cpu_smoke)
    if device.type == "cuda":
        allow_recompiles(8)
    peak = measure_peak_flops(device, dtype, size=args.peak_n, iters=args.iters, warmup=args.warmup) / 1e12
    dt = DTYPE_LABEL[dtype]
    print(f"# training step — {device_name(device)}; preset {args.preset}, batch {args.batch}, "
          f"{args.frames} latent frames {args.latent}x{args.latent}, params {dt}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}; measured {dt} matmul peak "
          f"{fmt(peak)} TFLOP/s (n={args.peak_n})")
    rows: list[StepRow] = []
    for phase in args.phases:
        for prec in args.precisions:
            rows.append(bench_step(args, phase, prec, device, dtype, peak))
            base = next((r for r in rows if r.phase == phase and r.precision != "fp8" and r.ms), None)
            if rows[-1].ms and base is not None:
                rows[-1].speedup = base.ms / rows[-1].ms
    headers = ["phase", "precision", "frames", "tokens", "step ms", "tokens/s", "peak GiB", "TFLOP/s", "MFU",
               "speedup", "loss", "note"]
    print(markdown_table(headers, [[str(r.phase), r.precision, str(r.frames), str(r.tokens), fmt(r.ms),
                                    fmt(r.tokens_per_s), fmt(r.peak_gib), fmt(r.tflops),
                                    "-" if r.mfu is None else f"{100 * r.mfu:.1f}%", fmt(r.speedup),
                                    fmt(r.loss, 4), r.note] for r in rows]))
    search = None
    if not args.no_search:
        lo, hi, note = max_frames(args, device, dtype)
        search = {"phase": args.search_phase, "max_fit": lo, "first_oom": hi, "note": note}
        print(f"\n# max latent frames, one {device.type.upper()}, activation checkpointing, "
              f"{args.search_backend} attention, batch {args.batch}")
        print(markdown_table(["phase", "max frames that fit", "first OOM", "note"],
                             [[str(args.search_phase), str(lo), "-" if hi is None else str(hi), note]]))
    dump_json(args.json, {"device": device_name(device), "peak_tflops": peak, "rows": rows,
                          "search": search, "args": {k: v for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
