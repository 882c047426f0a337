"""Memory / FLOP / step-time planner for a training configuration.

    python -m dualforce_mega.plan --preset lite --frames 512 --resolution 512 --gpus 8 --nodes 1 --sp 4 [--json]

Per GPU, ZeRO-3 over all ``gpus * nodes`` ranks with bf16 parameters and gradients and fp32 master
weights + Adam moments (2 + 2 + 12 bytes per parameter, partitioned), DeepSpeed's communication
buffers (its default bucket sizes, which our DeepSpeed config keeps), one gathered layer, and the
activations of one micro batch (``plan_activations``) with and without activation checkpointing.

Parameters come from the model itself, built on the meta device (``summary.build_meta_model``).
FLOPs per sample come from ``flops.forward_flops`` (block-causal attention counts only the unmasked
pairs); training = 3 x forward, plus one more forward of the layers when checkpointing recomputes them.

Step time = training FLOPs per GPU / sustained throughput. The default throughput is
``DEFAULT_MFU`` x the H100 SXM dense bf16 peak (``H100_BF16_PEAK_TFLOPS``); with ``--fp8`` the
linear FLOPs run at the FP8 peak (attention stays bf16). ``--tflops`` overrides the sustained figure.

Frames: the Wan VAE maps ``N`` video frames to ``1 + (N - 1) // 4`` latent frames (the first frame
alone, then groups of 4; a trailing partial group is dropped), which cover ``1 + 4 (F - 1)`` video
frames: 32 -> 8 (29 frames), 128 -> 32 (125), 256 -> 64 (253), 512 -> 128 (509).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Optional

from .config import MODEL_PRESETS, ConfigError, ModelConfig, build_config
from .flops import BACKWARD_OVER_FORWARD, forward_flops
from .hardware import H100
from .plan_activations import activation_report
from .summary import build_meta_model, count_parameters
from .timeline import Timeline

GIB = 1024 ** 3
H100_BF16_PEAK_TFLOPS = H100.bf16_tflops    # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet, no sparsity)
H100_FP8_PEAK_TFLOPS = H100.fp8_tflops      # H100 SXM dense FP8 peak
DEFAULT_MFU = 0.4                  # sustained fraction of peak a well-tuned DiT step reaches (assumption)
DEFAULT_GPU_MEM_GIB = 80.0         # H100 80GB
BF16, FP32 = 2, 4
ADAM_STATES = 2                    # exp_avg, exp_avg_sq (fp32)
# DeepSpeed ZeRO-3 defaults (deepspeed.runtime.zero.config), not overridden by parallel/deepspeed_config.py
DS_REDUCE_BUCKET = int(5e8)        # gradient elements reduced per bucket
DS_PREFETCH_BUCKET = int(5e7)      # parameter elements prefetched ahead of use
RUNTIME_RESERVE_GIB = 2.0          # CUDA context, NCCL buffers, allocator fragmentation (headroom, not modelled)


@dataclass
class PlanInput:
    preset: str
    frames: int                     # video frames per sample
    resolution: int                 # square frames, pixels
    gpus: int = 8                   # per node
    nodes: int = 1
    sp: int = 1
    micro_batch: int = 1
    checkpointing: bool = True
    fp8: bool = False
    gpu_mem_gib: float = DEFAULT_GPU_MEM_GIB
    tflops: Optional[float] = None  # sustained TFLOP/s per GPU; None = DEFAULT_MFU x peak
    text_len: int = 0               # text tokens per sample (0 = no text embeddings)
    act_bytes: int = BF16
    dense_mask: bool = False        # True = the CPU reference attention (keeps an Lq x Lk fp32 mask)

    def __post_init__(self) -> None:
        positive = {"--frames": self.frames, "--resolution": self.resolution, "--gpus": self.gpus,
                    "--nodes": self.nodes, "--sp": self.sp, "--micro-batch": self.micro_batch,
                    "--gpu-mem-gib": self.gpu_mem_gib}
        if self.tflops is not None:
            positive["--tflops"] = self.tflops
        for flag, value in positive.items():
            if not value > 0:
                raise ValueError(f"{flag}: {value} must be positive")
        if self.text_len < 0:
            raise ValueError(f"--text-len: {self.text_len} must be >= 0")


def latent_grid(resolution: int, m: ModelConfig) -> tuple[int, int]:
    _, ph, pw = m.patch_size
    unit = m.vae_spatial_stride * math.lcm(ph, pw)
    if resolution < unit or resolution % unit:
        raise ValueError(f"--resolution: {resolution} must be a multiple of VAE stride x patch = {unit}")
    side = resolution // m.vae_spatial_stride
    return side // ph, side // pw


def model_config(preset: str, sp: int) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (known: {sorted(MODEL_PRESETS)})")
    return build_config({"model": {"preset": preset}, "parallel": {"sp": sp}}).model


def sp_comm_bytes(m: ModelConfig, inp: PlanInput, shard_tokens: int) -> float:
    """Bytes one GPU sends over the SP group per micro batch (forward, checkpoint recompute, backward).

    Per video layer two all-to-alls (q/k/v in, attention out back), per bidirectional bridge layer one
    K/V all-gather, and the output head's all-gather; each moves (P-1)/P of its buffer, and the
    backward moves the same again (inverse all-to-all, reduce-scatter).
    """
    if inp.sp == 1:
        return 0.0
    a, tok = inp.act_bytes, inp.micro_batch * shard_tokens
    per_forward = m.layers * (3 + 1) * tok * m.dim * a
    if m.struct_tower and m.bridge == "bidirectional":
        per_forward += m.fusion_depth * 2 * tok * m.dim * a
    per_forward += tok * m.out_channels * math.prod(m.patch_size) * a
    passes = 2 + (1 if inp.checkpointing else 0)
    return passes * per_forward * (inp.sp - 1) / inp.sp


def static_memory(params: int, gathered: int, zero_stage: int, world: int, offload_optimizer: bool = False
                  ) -> dict[str, float]:
    """Bytes per GPU of everything but activations: bf16 parameters and gradients, fp32 master weights
    and Adam moments (partitioned as far as the ZeRO stage does: 1 optimizer states, 2 + gradients,
    3 + parameters), and DeepSpeed's buffers (stage 3: one layer gathered and one prefetched plus the
    reduce and prefetch buckets; stages 1-2: the reduce bucket)."""
    opt_shard = world if zero_stage >= 1 else 1
    grad_shard = world if zero_stage >= 2 else 1
    param_shard = world if zero_stage >= 3 else 1
    if zero_stage == 3:
        buffers = BF16 * (2 * gathered + min(DS_REDUCE_BUCKET, params) + min(DS_PREFETCH_BUCKET, params))
    else:
        buffers = BF16 * min(DS_REDUCE_BUCKET, params) if zero_stage >= 1 else 0
    return {"params": BF16 * params / param_shard,
            "grads": BF16 * params / grad_shard,
            "optimizer": 0.0 if offload_optimizer else (FP32 + ADAM_STATES * FP32) * params / opt_shard,
            "zero_buffers": float(buffers)}


def layer_params(model) -> int:
    """Largest parameter count gathered at once by one checkpointed layer (video + struct block + bridge)."""
    sizes = []
    for i in range(model.cfg.layers):
        mods = [model.video.blocks[i]]
        if model.struct is not None:
            mods.append(model.struct.blocks[i])
        if i < len(model.bridge):
            mods.append(model.bridge[i])
        sizes.append(sum(p.numel() for mod in mods for p in mod.parameters()))
    return max(sizes)


@lru_cache(maxsize=None)
def model_structure(preset: str) -> tuple[dict[str, int], int]:
    """(per-component parameter counts, largest layer's parameters) of the preset's model (meta device)."""
    model = build_meta_model(build_config({"model": {"preset": preset}}))
    return count_parameters(model.named_parameters()), layer_params(model)


def plan(inp: PlanInput, propose: bool = True) -> dict:
    """The plan for ``inp``; when it does not fit and ``propose``, a ``suggestion`` that does."""
    m = model_config(inp.preset, inp.sp)
    world = inp.gpus * inp.nodes
    if inp.sp < 1 or inp.gpus % inp.sp:
        raise ValueError(f"--sp: {inp.sp} must divide --gpus {inp.gpus} (sequence-parallel groups stay in a node)")
    counts, gathered = model_structure(inp.preset)
    params = counts["total_trainable"]
    tl = Timeline.of(m)
    f = tl.latent_frames_within(inp.frames)
    grid = latent_grid(inp.resolution, m)
    video_tokens = f * grid[0] * grid[1]

    acts = activation_report(m, inp.micro_batch, f, grid, inp.sp, inp.act_bytes, inp.dense_mask, inp.text_len)
    static = static_memory(params, gathered, 3, world)
    mem = {"params": static["params"], "grads": static["grads"], "optimizer": static["optimizer"],
           "zero3_buffers": static["zero_buffers"], "activations": acts.total(inp.checkpointing)}
    mem_gib = {k: v / GIB for k, v in mem.items()}
    mem_gib["total"] = sum(mem_gib.values())

    latent_hw = (grid[0] * m.patch_size[1], grid[1] * m.patch_size[2])
    fwd = forward_flops(m, inp.micro_batch, f, latent_hw, text_len=inp.text_len)
    recompute = fwd.forward if inp.checkpointing else 0.0
    per_sample = {"linear_forward": fwd.linear / inp.micro_batch, "attention_forward": fwd.attention / inp.micro_batch,
                  "training": fwd.training / inp.micro_batch,
                  "training_with_recompute": (fwd.training + recompute) / inp.micro_batch}
    # every rank of an SP group does 1/P of the sample (the replicated struct stream is < 1% of the work)
    if inp.tflops is not None:
        seconds = (fwd.training + recompute) / inp.sp / (inp.tflops * 1e12)
        throughput = f"{inp.tflops:g} TFLOP/s sustained (given)"
    else:
        linear_peak = H100_FP8_PEAK_TFLOPS if inp.fp8 else H100_BF16_PEAK_TFLOPS
        work_scale = (1.0 + BACKWARD_OVER_FORWARD + (1.0 if inp.checkpointing else 0.0))
        seconds = work_scale * (fwd.linear / linear_peak + fwd.attention / H100_BF16_PEAK_TFLOPS) \
            / 1e12 / DEFAULT_MFU / inp.sp
        throughput = (f"{DEFAULT_MFU:g} x H100 {'FP8 (linears) / ' if inp.fp8 else ''}bf16 dense peak "
                      f"({H100_BF16_PEAK_TFLOPS:g} TFLOP/s bf16{', %g FP8' % H100_FP8_PEAK_TFLOPS if inp.fp8 else ''})")
    budget = inp.gpu_mem_gib - RUNTIME_RESERVE_GIB
    fits = mem_gib["total"] <= budget
    result = {
        "input": asdict(inp),
        "latent_frames": f,
        "video_frames_covered": tl.video_frames(f),
        "latent_grid": list(grid),
        "tokens": {"video": video_tokens, "video_per_rank": math.ceil(video_tokens / inp.sp),
                   "struct": tl.video_frames(f) if m.struct_tower else 0},
        "world": world, "dp": world // inp.sp,
        "params": params,
        "params_by_component": {k: v for k, v in counts.items() if k != "total_trainable"},
        "memory_gib": mem_gib,
        "activations_gib": {"checkpointing": acts.total(True) / GIB, "no_checkpointing": acts.total(False) / GIB},
        "flops_per_sample": per_sample,
        "step_time_s_per_micro_batch": seconds,
        "sp_comm_gib_per_micro_batch": sp_comm_bytes(m, inp, math.ceil(video_tokens / inp.sp)) / GIB,
        "throughput_assumption": throughput,
        "budget_gib": budget,
        "fits": fits,
    }
    if not fits and propose:
        result["suggestion"] = suggest(inp, m)
    return result


def suggest(inp: PlanInput, m: ModelConfig) -> Optional[dict]:
    """A configuration that fits: the smallest SP size (dividing model.heads and the GPUs of a node)
    without checkpointing, else the smallest with checkpointing (recompute costs ~1/3 more FLOPs)."""
    sizes = [p for p in range(1, inp.gpus + 1) if m.heads % p == 0 and inp.gpus % p == 0]
    for ckpt in (False, True):
        for sp in sizes:
            if (sp, ckpt) == (inp.sp, inp.checkpointing):
                continue
            r = plan(replace(inp, sp=sp, checkpointing=ckpt), propose=False)
            if r["fits"]:
                return {"sp": sp, "checkpointing": ckpt, "memory_gib": r["memory_gib"]["total"]}
    return None


def format_report(r: dict) -> str:
    i = r["input"]
    mem = r["memory_gib"]
    fl = r["flops_per_sample"]
    lines = [
        f"{i['preset']}: {i['frames']} frames -> {r['latent_frames']} latent frames "
        f"({r['video_frames_covered']} video frames), {i['resolution']}px -> grid {r['latent_grid']}; "
        f"{r['tokens']['video']:,} video tokens ({r['tokens']['video_per_rank']:,} per rank), "
        f"{r['tokens']['struct']} struct tokens",
        f"world {r['world']} = dp {r['dp']} x sp {i['sp']}; micro batch {i['micro_batch']}; "
        f"checkpointing {'on' if i['checkpointing'] else 'off'}; params {r['params']:,}",
        "memory per GPU (GiB):",
    ]
    for k in ("params", "grads", "optimizer", "zero3_buffers", "activations", "total"):
        lines.append(f"  {k:<14} {mem[k]:9.2f}")
    a = r["activations_gib"]
    lines.append(f"  (activations: {a['checkpointing']:.2f} with checkpointing, {a['no_checkpointing']:.2f} without)")
    lines.append(f"FLOPs per sample: forward linear {fl['linear_forward']:.3e}, forward attention "
                 f"{fl['attention_forward']:.3e} (block-causal, unmasked pairs only); training {fl['training']:.3e}"
                 + (f", {fl['training_with_recompute']:.3e} with checkpoint recompute" if i["checkpointing"] else ""))
    lines.append(f"step time per micro batch: {r['step_time_s_per_micro_batch']:.2f} s at {r['throughput_assumption']}"
                 f" (compute only; SP traffic {r['sp_comm_gib_per_micro_batch']:.1f} GiB sent per GPU)")
    if r["fits"]:
        lines.append(f"fits: {mem['total']:.1f} GiB <= {r['budget_gib']:.1f} GiB budget")
    else:
        lines.append(f"WARNING: does not fit: {mem['total']:.1f} GiB > {r['budget_gib']:.1f} GiB budget "
                     f"(GPU memory minus {RUNTIME_RESERVE_GIB:g} GiB runtime reserve)")
        s = r.get("suggestion")
        lines.append(f"  suggestion: --sp {s['sp']} {'--checkpointing' if s['checkpointing'] else '--no-checkpointing'}"
                     f" ({s['memory_gib']:.1f} GiB)" if s else "  no SP size / checkpointing setting on this node fits")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualforce_mega.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, help=f"model preset {sorted(MODEL_PRESETS)}")
    ap.add_argument("--frames", type=int, required=True, help="video frames per sample (25 fps)")
    ap.add_argument("--resolution", type=int, default=512, help="square frame size in pixels")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--sp", type=int, default=1, help="sequence-parallel size (divides heads and --gpus)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="activation checkpointing per layer (default on)")
    ap.add_argument("--fp8", action="store_true", help="FP8 linears (step time only; activations stay bf16)")
    ap.add_argument("--gpu-mem-gib", type=float, default=DEFAULT_GPU_MEM_GIB)
    ap.add_argument("--tflops", type=float, default=None,
                    help=f"sustained TFLOP/s per GPU (default {DEFAULT_MFU:g} x H100 bf16 peak)")
    ap.add_argument("--text-len", type=int, default=0, help="text tokens per sample (0 = none)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    try:
        inp = PlanInput(preset=args.preset, frames=args.frames, resolution=args.resolution, gpus=args.gpus,
                        nodes=args.nodes, sp=args.sp, micro_batch=args.micro_batch, checkpointing=args.checkpointing,
                        fp8=args.fp8, gpu_mem_gib=args.gpu_mem_gib, tflops=args.tflops, text_len=args.text_len)
        r = plan(inp)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
