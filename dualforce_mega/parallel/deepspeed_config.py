"""DeepSpeed engine configuration built from the typed ``Config`` (never from hand-written JSON).

Every value DeepSpeed would otherwise default is set explicitly: in particular ``gradient_clipping``
(DeepSpeed's silent default is 1.0) comes from ``train.grad_clip``.

The optimizer is a client optimizer, torch's AdamW (``build_optimizer``: fused on CUDA), never one
of DeepSpeed's ops: its FusedAdam and CPUAdam are JIT-compiled C++/CUDA extensions, which need nvcc
and a parseable ``TORCH_CUDA_ARCH_LIST`` at start-up (``9.0a`` made DeepSpeed 0.19 raise before step 1).
With the optimizer offloaded to the CPU, ``zero_force_ds_cpu_optimizer`` is off so DeepSpeed keeps
torch's AdamW instead of insisting on its CPUAdam.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import Config, ConfigError, TrainConfig


def resolve_precision(cfg: Config, device_type: str) -> str:
    """``train.precision`` -> ``"bf16"`` or ``"fp32"``; ``auto`` means bf16 on GPU, fp32 on CPU."""
    precision = cfg.train.precision
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    """global_batch = micro_batch * dp_size * accumulation; anything else is a configuration error."""
    t = cfg.train
    per_step = t.micro_batch * dp_size
    if t.global_batch % per_step != 0:
        raise ConfigError(
            f"train.global_batch: {t.global_batch} is not divisible by train.micro_batch x data-parallel size "
            f"= {t.micro_batch} x {dp_size} = {per_step}")
    return t.global_batch // per_step


def build_deepspeed_config(cfg: Config, dp_size: int, device_type: str) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize`` (the LR schedule is a client scheduler)."""
    t, p = cfg.train, cfg.parallel
    on_gpu = device_type == "cuda"
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "contiguous_gradients": True,
        # overlapping reduction with backward needs CUDA streams; on CPU it only adds copies.
        "overlap_comm": on_gpu,
    }
    if p.zero_stage == 3:
        # consolidating a 16-bit copy on save would gather the full model on rank 0 each checkpoint;
        # checkpoints_conv/ consolidates offline instead.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if p.offload_optimizer:
        if p.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer: needs parallel.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": grad_accum_steps(cfg, dp_size),
        "gradient_clipping": t.grad_clip,
        # no "optimizer" section: the client optimizer (build_optimizer) is passed to deepspeed.initialize
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": max(t.steps, 1) + 1,   # our own logger reports progress
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
    }
    precision = resolve_precision(cfg, device_type)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm scales, gates and 1-d tables are not regularised."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW over ``optimizer_param_groups``: the trainer's DeepSpeed client optimizer and the
    optimizer of the single-process paths. Fused (one kernel for all parameters) on CUDA."""
    return torch.optim.AdamW(optimizer_param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                             eps=t.adam_eps, weight_decay=t.weight_decay, fused=device.type == "cuda")
