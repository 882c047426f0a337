"""One-GPU training-step throughput: Phase 2 and Phase 4, one change at a time, side by side.

Every row runs the trainer's own preparation and step: ``parallel.parallelize`` (FP8 conversion where
it pays, activation checkpointing, regional torch.compile) and ``training.step.TrainStep`` (the real
Diffusion Forcing objective, forward, backward, clipping, torch's fused AdamW) on a random batch in
the trainer's schema, without DeepSpeed. Parameters are bf16 on GPU.

Variants (``--variants``, comma-separated): ``eager`` or ``compile``, then modifiers joined by ``+``:
``ckpt`` (activation checkpointing on every layer), ``fp8`` (train.fp8, backend auto),
``fp8=torchao|torch|te`` (one backend), ``rowwise`` (torchao's row-wise recipe), ``fp8all`` (FP8 on
every candidate linear, not only where the size rule says it pays). The first variant of a phase is
the reference its ``speedup`` column divides by: keep ``eager`` (the previous configuration) first.

MFU = model FLOPs of the step (``dualforce_mega.flops``: block-causal pairs only, backward = 2x
forward, recomputation not counted) / step time / the bf16 matmul peak measured in the same run (and
/ the datasheet peak in ``MFU sheet``). FP8 rows use the same bf16 peaks, so their MFU shows the gain.

Then, optionally, the largest number of latent frames one GPU trains with activation checkpointing.

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
from dualforce_mega.config import Config, model_preset, validate
from dualforce_mega.models import DualForceModel
from dualforce_mega.models.fp8 import FP8_BACKENDS
from dualforce_mega.timeline import Timeline
from dualforce_mega.parallel.deepspeed_config import build_optimizer
from dualforce_mega.parallel.parallelize import TrainShape, parallelize
from dualforce_mega.training.monitor import datasheet_peak_flops, measure_peak_flops
from dualforce_mega.training.phase import apply_phase
from dualforce_mega.training.step import TorchUpdater, TrainStep, sample_training_flops

log = logging.getLogger("bench_train_step")

DTYPE_LABEL = {torch.bfloat16: "bf16", torch.float32: "fp32"}
# max-frames search by extrapolation: sizes probed (frames, 2x, 4x), share of memory left to the
# allocator's fragmentation, verification attempts and the step down after a failed one
FIT_POINTS = 3
ALLOCATOR_MARGIN = 0.05
FIT_VERIFY_TRIES = 3
FIT_BACKOFF = 0.9


@dataclass(frozen=True)
class Variant:
    label: str
    compile: bool = False
    checkpointing: bool = False
    fp8: bool = False
    fp8_backend: str = "auto"
    fp8_recipe: str = "current"
    fp8_all: bool = False

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``eager`` | ``compile``, then ``+ckpt``, ``+fp8``, ``+fp8=<backend>``, ``+rowwise``, ``+fp8all``."""
        base, *mods = text.split("+")
        if base not in ("eager", "compile"):
            raise SystemExit(f"--variants: {text!r} must start with eager or compile")
        kw: dict = {"compile": base == "compile"}
        for mod in mods:
            name, _, value = mod.partition("=")
            if name == "ckpt":
                kw["checkpointing"] = True
            elif name == "fp8":
                kw["fp8"] = True
                if value:
                    if value not in FP8_BACKENDS:
                        raise SystemExit(f"--variants: {text!r}: fp8 backend {value!r} not in {FP8_BACKENDS}")
                    kw["fp8_backend"] = value
            elif name == "rowwise":
                kw["fp8"], kw["fp8_recipe"] = True, "rowwise"
            elif name == "fp8all":
                kw["fp8"], kw["fp8_all"] = True, True
            else:
                raise SystemExit(f"--variants: {text!r}: unknown modifier {mod!r}")
        return cls(label=text, **kw)


@dataclass
class StepRow:
    phase: int
    variant: str
    frames: int
    tokens: int                    # video + struct tokens per step
    ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_gib: Optional[float] = None
    tflops: Optional[float] = None  # achieved model TFLOP/s
    mfu: Optional[float] = None     # against the measured bf16 matmul peak
    mfu_sheet: Optional[float] = None  # against the datasheet bf16 peak
    speedup: Optional[float] = None  # vs the first variant of the same phase
    loss: Optional[float] = None
    note: str = ""


def phase_config(args: argparse.Namespace, phase: int, variant: Variant, frames: int, backend: str = "") -> Config:
    """The trainer's config for this row, built from the dataclasses (no YAML: only torch needed)."""
    cfg = Config()
    cfg.model = model_preset(args.preset, **({"attn_backend": backend} if backend else {}))
    t = cfg.train
    t.phase, t.fp8, t.fp8_backend, t.fp8_recipe = phase, variant.fp8, variant.fp8_backend, variant.fp8_recipe
    t.micro_batch = t.global_batch = args.batch
    t.activation_checkpointing = "on" if variant.checkpointing else "off"
    t.compile = "on" if variant.compile else "off"
    cfg.data.window = cfg.data.synthetic_frames = frames
    cfg.data.latent_height = cfg.data.latent_width = args.latent
    validate(cfg)
    return apply_phase(cfg)


def random_batch(cfg: Config, batch: int, frames: int, hw: int, text_tokens: int, device: torch.device
                 ) -> dict:
    """A batch in the loader's schema (docs/INTERFACES.md) with random contents (host-side ``__index__``)."""
    m = cfg.model
    gen = torch.Generator().manual_seed(frames)
    n = Timeline(stride=m.vae_temporal_stride).video_frames(frames)
    out = {"video_latent": torch.randn(batch, m.in_channels, frames, hw, hw, generator=gen),
           "struct": torch.randn(batch, n, m.motion_dim, generator=gen),
           "kp_canonical": torch.randn(batch, m.kp_dim, generator=gen),
           "audio": torch.randn(batch, n * m.audio_rate // m.fps, m.audio_dim, generator=gen),
           "flame": torch.randn(batch, n, m.flame_dim, generator=gen)}
    if text_tokens and m.text_dim:
        out["text_emb"] = torch.randn(batch, text_tokens, m.text_dim, generator=gen)
    out = {k: v.to(device) for k, v in out.items()}
    out["__index__"] = torch.arange(batch)
    return out


class Stepper:
    """Model prepared by ``parallelize`` + fused AdamW + the trainer's ``TrainStep``; ``step()`` is one
    optimizer step (seeded by the step count, as in the trainer)."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, text_tokens: int = 0,
                 fp8_all: bool = False):
        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.model = DualForceModel(cfg.model)
        shape = TrainShape(cfg.train.micro_batch, cfg.data.window, (cfg.data.latent_height, cfg.data.latent_width),
                           text_tokens)
        self.prepared = parallelize(self.model, cfg, device, dtype, shape=None if fp8_all else shape)
        self.fp8 = self.prepared.fp8
        self.model.train()
        self.opt = build_optimizer(self.model, cfg.train, device)
        self.train_step = TrainStep(cfg, self.model, TorchUpdater(self.model, self.opt, cfg.train.grad_clip),
                                    device, dtype, self.fp8)
        self.n_step = 0

    def step(self, batch: dict) -> None:
        self.train_step([batch], self.n_step)
        self.n_step += 1

    @property
    def last_loss(self) -> float:
        """The last step's loss (reads the device)."""
        return float(self.train_step.last.metrics["loss"])

    def close(self) -> None:
        del self.model, self.opt, self.train_step, self.prepared


def bench_step(args: argparse.Namespace, phase: int, variant: Variant, device: torch.device,
               dtype: torch.dtype, peak: float, sheet: Optional[float]) -> StepRow:
    frames = args.frames
    cfg = phase_config(args, phase, variant, frames)
    lv = frames * (args.latent // cfg.model.patch_size[1]) * (args.latent // cfg.model.patch_size[2])
    n = Timeline(stride=cfg.model.vae_temporal_stride).video_frames(frames) if cfg.model.struct_tower else 0
    row = StepRow(phase, variant.label, frames, args.batch * (lv + n))
    stepper: Optional[Stepper] = None
    try:
        stepper = Stepper(cfg, device, dtype, args.text_tokens, fp8_all=variant.fp8_all)
        if variant.fp8 and not stepper.fp8.enabled:
            row.note = f"fp8 off: {stepper.fp8.reason}"
            return row
        batch = random_batch(cfg, args.batch, frames, args.latent, args.text_tokens, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = args.warmup + (args.compile_warmup if variant.compile else 0)
        timing = time_fn(lambda: stepper.step(batch), device, warmup, args.iters, args.max_seconds)
        row.ms = timing.median_ms
        row.tokens_per_s = row.tokens / (row.ms * 1e-3)
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        # the trainer's accounting (training.step.sample_training_flops), per sample of this batch
        flops = args.batch * sample_training_flops(cfg, stepper.train_step.last.inputs)
        row.tflops = flops / (row.ms * 1e-3) / 1e12
        row.mfu = row.tflops / peak
        row.mfu_sheet = row.tflops / sheet if sheet else None
        row.loss = stepper.last_loss
        if stepper.fp8.enabled:
            row.note = f"{stepper.fp8.backend}: {len(stepper.fp8.converted)} FP8 linears"
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
    cfg = phase_config(args, args.search_phase, Variant("eager+ckpt", checkpointing=True), args.frames,
                       args.search_backend)
    stepper = Stepper(cfg, device, dtype, args.text_tokens)
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
    p.add_argument("--variants", default="eager,compile,compile+fp8",
                   help="comma-separated; the first of each phase is the speedup reference (see the docstring)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-warmup", type=int, default=2, help="extra warm-up steps of compiled variants")
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
        args.warmup, args.compile_warmup, args.iters, args.max_seconds, args.peak_n = 0, 1, 1, 0.0, 256
        args.search_max_frames, args.search_tolerance = 6, 1
    args.phases = csv_list(args.phases, int)
    args.variants = [Variant.parse(v) for v in csv_list(args.variants)]
    return args


def speedups(rows: list[StepRow]) -> None:
    """Each row's speed relative to the first measured row of its phase (the reference variant)."""
    for row in rows:
        base = next((r for r in rows if r.phase == row.phase and r.ms), None)
        if row.ms and base is not None:
            row.speedup = base.ms / row.ms


def table(rows: list[StepRow]) -> str:
    headers = ["phase", "variant", "frames", "tokens", "step ms", "tokens/s", "peak GiB", "TFLOP/s", "MFU",
               "MFU sheet", "speedup", "loss", "note"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    return markdown_table(headers, [[str(r.phase), r.variant, str(r.frames), str(r.tokens), fmt(r.ms),
                                     fmt(r.tokens_per_s), fmt(r.peak_gib), fmt(r.tflops), pct(r.mfu), pct(r.mfu_sheet),
                                     fmt(r.speedup), fmt(r.loss, 4), r.note] for r in rows])


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    device, dtype = bench_device(args.cpu_smoke)
    if device.type == "cuda":
        allow_recompiles(8)   # eager rows compile flex attention once per attention shape
    peak = measure_peak_flops(device, dtype, size=args.peak_n, iters=args.iters, warmup=args.warmup) / 1e12
    sheet_flops = datasheet_peak_flops(device, dtype)
    sheet = sheet_flops / 1e12 if sheet_flops else None
    dt = DTYPE_LABEL[dtype]
    print(f"# training step — {device_name(device)}; preset {args.preset}, batch {args.batch}, "
          f"{args.frames} latent frames {args.latent}x{args.latent}, params {dt}; measured {dt} matmul peak "
          f"{fmt(peak)} TFLOP/s (n={args.peak_n}), datasheet {fmt(sheet)}", flush=True)
    rows: list[StepRow] = []
    for phase in args.phases:
        for variant in args.variants:
            rows.append(bench_step(args, phase, variant, device, dtype, peak, sheet))
            speedups(rows)
            r = rows[-1]   # one line per row as it finishes: a part cut off by a timeout keeps its rows
            print(f"row phase {r.phase} {r.variant}: {fmt(r.ms)} ms, MFU {fmt(None if r.mfu is None else 100 * r.mfu)}%"
                  f", speedup {fmt(r.speedup)} {r.note}", flush=True)
    print(table(rows), flush=True)
    search = None
    if not args.no_search:
        lo, hi, note = max_frames(args, device, dtype)
        search = {"phase": args.search_phase, "max_fit": lo, "first_oom": hi, "note": note}
        print(f"\n# max latent frames, one {device.type.upper()}, activation checkpointing, "
              f"{args.search_backend} attention, batch {args.batch}")
        print(markdown_table(["phase", "max frames that fit", "first OOM", "note"],
                             [[str(args.search_phase), str(lo), "-" if hi is None else str(hi), note]]))
    dump_json(args.json, {"device": device_name(device), "peak_tflops": peak, "datasheet_tflops": sheet,
                          "rows": rows, "search": search,
                          "args": {k: (v if k != "variants" else [x.label for x in v]) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
