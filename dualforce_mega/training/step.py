"""The training step: the one implementation the trainer, the single-process trainer, the smoke run and
``benchmarks/bench_train_step.py`` all run.

One optimizer step = one or more micro batches, each: batch to the device -> Diffusion Forcing
noise from per-sample seeds -> forward (under the FP8 context) -> weighted loss -> backward; then the
update. Who applies the update is an ``Updater``: DeepSpeed's engine (ZeRO, gradient accumulation and
clipping inside) or a plain torch optimizer.

No host syncs: the batch is copied asynchronously, masks and sigma-bucket counts come from host
copies (diffusion/objective.py), and metrics stay 0-dim device tensors in a ``MetricAccumulator``
until a log step reads them. Each sample's noise comes from
``sample_seeds(train.seed, step, batch["__index__"])``, so the same sample at the same step gets the
same noise whoever computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
import torch.nn as nn

from ..config import Config
from ..diffusion.noise import sample_seeds
from ..flops import forward_flops
from ..models.fp8 import FP8State, fp8_autocast
from .metrics import MetricAccumulator
from .recipe import DualForceRecipe


class Updater(Protocol):
    """Applies the backward and the optimizer update of a step."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def after_micro(self) -> None:
        """Called after every micro batch's backward."""

    def update(self) -> Optional[torch.Tensor]:
        """End of the step; returns the gradient norm before clipping when known (a device tensor)."""


class TorchUpdater:
    """A torch optimizer: gradients averaged over ``accum`` micro batches, clipped to ``grad_clip``
    (0 = no clipping, the norm is still returned), optional LR scheduler stepped after the update."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, accum: int = 1,
                 scheduler: Optional[Any] = None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.grad_clip, self.accum, self.scheduler = optimizer, grad_clip, accum, scheduler

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum if self.accum > 1 else loss).backward()

    def after_micro(self) -> None:
        pass

    def update(self) -> Optional[torch.Tensor]:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return norm


class DeepSpeedUpdater:
    """A DeepSpeed engine: it scales the loss for accumulation, reduces, clips and steps at the
    accumulation boundary (``engine.step()`` after every micro batch). Its gradient norm is read at
    log steps (``engine.get_global_grad_norm()``)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def after_micro(self) -> None:
        self.engine.step()

    def update(self) -> Optional[torch.Tensor]:
        return None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device`` without waiting (``__index__`` and other ``__*__`` metadata stay on the host)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and not k.startswith("__") else v
            for k, v in batch.items()}


def cast_inputs(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating inputs in the model's dtype; sigmas stay fp32 (the modulation math is fp32)."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and not k.startswith("sigma")
            else v for k, v in inputs.items()}


def tokens_in(inputs: dict[str, torch.Tensor], patch_size: tuple) -> int:
    """Transformer tokens of a micro batch: video patches plus struct frames."""
    b, _, f, h, w = inputs["video_latent"].shape
    tokens = b * f * (h // patch_size[1]) * (w // patch_size[2])
    if "struct" in inputs:
        tokens += inputs["struct"].shape[0] * inputs["struct"].shape[1]
    return tokens


def sample_training_flops(cfg: Config, inputs: dict[str, torch.Tensor]) -> float:
    """Model FLOPs (forward + backward, no recomputation) of one sample of this batch's shape."""
    _, _, frames, h, w = inputs["video_latent"].shape
    text_len = inputs["text_emb"].shape[1] if "text_emb" in inputs else 0
    count = forward_flops(cfg.model, 1, frames, (h, w), text_len=text_len, with_struct="struct" in inputs,
                          with_audio="audio" in inputs, return_aux=True, attention="causal")
    return count.training


@dataclass
class MicroResult:
    metrics: dict[str, torch.Tensor]     # 0-dim device tensors
    tokens: int
    inputs: dict[str, Any]               # the model inputs (shapes for FLOP counting)


class TrainStep:
    """forward + loss + backward per micro batch, then the update (see the module docstring).

    ``recipe`` (training/recipe.py; default DualForce) supplies the objective (``prepare`` and
    ``loss_terms``, metrics as device tensors), the model's extra call arguments and the token count."""

    def __init__(self, cfg: Any, model: Any, updater: Updater, device: torch.device, dtype: torch.dtype,
                 fp8: Optional[FP8State] = None, recipe: Any = None,
                 loss_hook: Optional[Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = None):
        """``loss_hook(loss, batch)``: the loss to backpropagate (training/nonfinite.py poisons a non-finite
        one, so that the optimizer skips the step on every rank)."""
        self.cfg, self.model, self.updater = cfg, model, updater
        self.device, self.dtype = device, dtype
        self.fp8 = fp8 or FP8State()
        self.recipe = recipe or DualForceRecipe()
        self.objective = self.recipe.objective(cfg, device)
        self.model_kwargs = self.recipe.model_kwargs(cfg)
        self.loss_hook = loss_hook
        self.last: Optional[MicroResult] = None

    def micro(self, batch: dict[str, Any], step: int) -> MicroResult:
        """Forward and backward of one micro batch of optimizer step ``step``."""
        seeds = sample_seeds(self.cfg.train.seed, step, batch["__index__"])
        batch = to_device(batch, self.device)
        inputs, targets = self.objective.prepare(batch, seeds)
        inputs = cast_inputs(inputs, self.dtype)
        with fp8_autocast(self.fp8):
            out = self.model(**inputs, **self.model_kwargs)
        loss, metrics = self.objective.loss_terms(out, targets.to(self.device))
        if self.loss_hook is not None:
            loss = self.loss_hook(loss, batch)
        self.updater.backward(loss)
        self.updater.after_micro()
        return MicroResult(metrics, self.recipe.tokens(self.cfg, inputs), inputs)

    def __call__(self, batches: Iterable[dict[str, Any]], step: int, acc: Optional[MetricAccumulator] = None,
                 count: bool = True) -> Optional[torch.Tensor]:
        """One optimizer step over the micro ``batches``; metrics, tokens and sample ids go to ``acc``
        (``count=False``: metrics only, e.g. on the ranks of a sequence-parallel group that do not own
        the sample). Returns the updater's gradient norm (a device tensor, or None)."""
        for batch in batches:
            res = self.micro(batch, step)
            if acc is not None:
                acc.add(res.metrics, res.tokens if count else 0, batch["__index__"].tolist() if count else [])
            self.last = res
        return self.updater.update()
