"""Prepare a model for training, in one place (torchtitan's ``parallelize``).

``parallelize(model, cfg, device, dtype, ...)`` applies, in this order:

1. sequence parallelism over ``sp_group`` (parallel/sequence_parallel.py; a no-op at sp = 1);
2. device and dtype;
3. FP8 linears (models/fp8.py), only on the linears whose GEMMs are large enough for FP8 to pay
   (``fp8_pays``: the time two GEMM rates save against the time the casts cost, from the shapes of
   this configuration and the accelerator's datasheet) -- before the optimizer exists, since a
   backend may replace parameters;
4. per-block activation checkpointing (``train.activation_checkpointing``: ``on``, ``off``, or
   ``auto``: the planner's memory model decides how many layers must recompute to fit the device);
5. regional ``torch.compile`` of each transformer block (``train.compile``), which fuses the AdaLN
   modulation, norms, RoPE and GELU around the GEMMs and removes most of the launch overhead of the
   struct tower's tiny blocks.

The trainer, ``training/single_process.py``, the smoke run and ``benchmarks/bench_train_step.py`` all
call it, and all run the same training step (training/step.py).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..models import DualForceModel
from ..models.fp8 import FP8State, apply_fp8
from ..plan import GIB, RUNTIME_RESERVE_GIB, layer_params, static_memory
from ..plan_activations import activation_report
from .sequence_parallel import apply_sequence_parallel

log = logging.getLogger(__name__)

# dynamo compiles each distinct block variant (video / struct tower, with or without audio or text,
# bridge) for the forward and the backward; this many graphs per variant leaves room for the masks'
# variants before dynamo would fall back to eager
GRAPHS_PER_VARIANT = 4


@dataclass
class TrainShape:
    """The shape of one training micro batch on one rank, which the build-time choices are priced on."""
    batch: int
    latent_frames: int
    latent_hw: tuple[int, int]
    text_len: int = 0
    sp: int = 1

    @classmethod
    def from_config(cls, cfg: Config, sp: int = 1) -> "TrainShape":
        """``data.window`` latent frames of ``data.latent_height`` x ``data.latent_width`` (the training
        window; shards carry that latent size), ``train.micro_batch`` clips."""
        d = cfg.data
        return cls(cfg.train.micro_batch, d.window, (d.latent_height, d.latent_width), sp=sp)

    def grid(self, cfg: Config) -> tuple[int, int]:
        _, ph, pw = cfg.model.patch_size
        return self.latent_hw[0] // ph, self.latent_hw[1] // pw

    def rows(self, cfg: Config) -> dict[str, int]:
        """Token rows of a micro batch per stream on this rank (the M of every linear's GEMM)."""
        m = cfg.model
        gh, gw = self.grid(cfg)
        n = 1 + m.vae_temporal_stride * (self.latent_frames - 1)
        return {"video": self.batch * math.ceil(self.latent_frames * gh * gw / self.sp),
                "struct": self.batch * n if m.struct_tower else 0,
                "audio": self.batch * n * (m.audio_rate // m.fps) if m.audio else 0,
                "text": self.batch * self.text_len}


@dataclass
class Prepared:
    """What ``parallelize`` did to the model."""
    model: DualForceModel
    fp8: FP8State
    checkpointed_layers: list[int] = field(default_factory=list)
    compiled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# activation checkpointing
# --------------------------------------------------------------------------------------
def _device_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return None


def plan_checkpointing(model: DualForceModel, cfg: Config, shape: TrainShape, dtype: torch.dtype, world: int,
                       device_memory: Optional[int]) -> tuple[list[int], str]:
    """Layers to recompute in the backward, and why.

    ``on``/``off`` are taken as given. ``auto`` prices the step with the planner's memory model
    (plan.static_memory for parameters, gradients, optimizer and ZeRO buffers at ``parallel.zero_stage``
    over ``world`` ranks; plan_activations for the activations of ``shape``) and checkpoints the
    fewest layers, largest first, that bring it under the device memory minus the runtime reserve.
    Without a device memory size (CPU) ``auto`` is off.
    """
    layers = list(range(cfg.model.layers))
    mode = cfg.train.activation_checkpointing
    if mode == "on":
        return layers, "train.activation_checkpointing=on"
    if mode == "off":
        return [], "train.activation_checkpointing=off"
    if device_memory is None:
        return [], "auto: no device memory limit to fit (CPU)"
    m = cfg.model
    acts = activation_report(m, shape.batch, shape.latent_frames, shape.grid(cfg), shape.sp,
                             torch.finfo(dtype).bits // 8, dense_mask=False, text_len=shape.text_len)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = sum(static_memory(params, layer_params(model), cfg.parallel.zero_stage, world,
                               cfg.parallel.offload_optimizer).values())
    budget = device_memory - RUNTIME_RESERVE_GIB * GIB
    by_size = sorted(layers, key=lambda i: -acts.per_layer[i])
    for k in range(len(layers) + 1):
        chosen = sorted(by_size[:k])
        need = static + acts.total_with(chosen)
        if need <= budget:
            return chosen, (f"auto: {k}/{len(layers)} layers checkpointed, estimate {need / GIB:.1f} GiB "
                            f"<= {budget / GIB:.1f} GiB (static {static / GIB:.1f} GiB)")
    need = static + acts.total(True)
    return layers, (f"auto: every layer checkpointed and still over budget: estimate {need / GIB:.1f} GiB > "
                    f"{budget / GIB:.1f} GiB (raise parallel.sp or lower data.window)")


def zero_stage_note(model: DualForceModel, cfg: Config, world: int, device_memory: Optional[int]) -> str:
    """The planner's view of ``parallel.zero_stage``: ZeRO-3 gathers every block's parameters in module
    hooks (one all-gather per module, and no compiled blocks); when ZeRO-2 fits as well, say so."""
    stage = cfg.parallel.zero_stage
    if stage != 3 or device_memory is None:
        return f"ZeRO-{stage}"
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = sum(static_memory(params, layer_params(model), 2, world, cfg.parallel.offload_optimizer).values())
    budget = device_memory - RUNTIME_RESERVE_GIB * GIB
    if need <= budget / 2:   # leave at least half of the memory to activations
        return (f"ZeRO-3; ZeRO-2 would fit too ({need / GIB:.1f} GiB of states on {world} rank(s), "
                f"{budget / GIB:.0f} GiB budget) and gathers nothing per module: parallel.zero_stage=2")
    return f"ZeRO-3 (ZeRO-2 would need {need / GIB:.1f} GiB of states of a {budget / GIB:.0f} GiB budget)"


def apply_checkpointing(model: DualForceModel, layers: list[int]) -> None:
    """Mark every block of ``layers`` (video, struct, bridge) for recomputation in the backward."""
    chosen = set(layers)
    for i, _, block in model.transformer_blocks():
        block.activation_checkpointing = i in chosen


# --------------------------------------------------------------------------------------
# regional compilation
# --------------------------------------------------------------------------------------
def compile_wanted(cfg: Config, device: torch.device) -> tuple[bool, str]:
    """``train.compile``; ``auto`` = on CUDA, except under ZeRO-3, whose per-module parameter gathering
    hooks (excluded from compilation by DeepSpeed) would split every block's graph at each linear."""
    mode = cfg.train.compile
    if mode != "auto":
        return mode == "on", f"train.compile={mode}"
    if device.type != "cuda":
        return False, f"auto: off on {device.type}"
    if cfg.parallel.zero_stage == 3:
        return False, "auto: off under ZeRO-3 (parameter gathers split the block graphs; ZeRO <= 2 compiles)"
    return True, "auto: on (CUDA)"


def compile_blocks(model: DualForceModel) -> list[str]:
    """``torch.compile`` every transformer block in place (parameter names unchanged); returns their names.

    Static shapes: the training shape is fixed, and a dynamic graph would give up the tile choices
    per shape. The dynamo recompile limit is raised to cover every block variant.
    """
    from torch._dynamo import config as dynamo_config

    blocks = model.transformer_blocks()
    variants = {(type(b).__name__, name.split(".")[0], getattr(b, "audio_attn", None) is None,
                 getattr(b, "cross_attn", None) is None) for _, name, b in blocks}
    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, key, max(getattr(dynamo_config, key), GRAPHS_PER_VARIANT * len(variants)))
    for _, _, block in blocks:
        block.compile(dynamic=False)
    return [name for _, name, _ in blocks]


# --------------------------------------------------------------------------------------
# the one entry point
# --------------------------------------------------------------------------------------
def parallelize(model: DualForceModel, cfg: Config, device: torch.device, dtype: torch.dtype,
                sp_group: Optional[dist.ProcessGroup] = None, world: int = 1,
                shape: Optional[TrainShape] = None) -> Prepared:
    """Prepare ``model`` (built on the host, not yet wrapped) for training on ``device`` in ``dtype``.

    ``world``: ranks ZeRO partitions over (the planner's memory model); ``shape``: the micro batch the
    build-time choices are priced on (default: from the config). Call on every rank, before the
    optimizer and ``deepspeed.initialize``.
    """
    sp = dist.get_world_size(sp_group) if sp_group is not None else 1
    shape = shape or TrainShape.from_config(cfg, sp)
    apply_sequence_parallel(model, sp_group)
    model.to(device=device, dtype=dtype)
    fp8 = apply_fp8(model, cfg, device, rows=shape.rows(cfg))
    out = Prepared(model=model, fp8=fp8)
    memory = _device_memory(device)
    layers, why = plan_checkpointing(model, cfg, shape, dtype, world, memory)
    apply_checkpointing(model, layers)
    out.checkpointed_layers = layers
    out.notes.append(f"activation checkpointing: {why}")
    out.notes.append(f"zero: {zero_stage_note(model, cfg, world, memory)}")
    wanted, why = compile_wanted(cfg, device)
    if wanted:
        out.compiled = compile_blocks(model)
        why += f"; {len(out.compiled)} blocks compiled"
    out.notes.append(f"torch.compile: {why}")
    out.notes.append(f"fp8: {fp8.reason}" + (f"; {len(fp8.converted)} linears FP8, {len(fp8.skipped)} stay bf16"
                                               if fp8.enabled else ""))
    for note in out.notes:
        log.info("parallelize: %s", note)
    return out
