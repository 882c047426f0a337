"""FP8 training for the transformer linears (DESIGN §6).

Only the linears that carry the bulk of the FLOPs are converted: the q/k/v/o projections of every
``Attention`` (self-attention, text cross-attention, audio cross-attention, both bridge directions)
and the two FFN linears of every ``FeedForward``. Modulation tables, embeddings (patch, text, time,
audio projector, struct tokenizer, keypoints), norms, the auxiliary heads and the output head stay
in bf16: they are small, and they set the scale of everything downstream.

Backends, chosen by ``train.fp8_backend``:
  te       Transformer Engine ``te.Linear`` under ``te.fp8_autocast`` (``train.fp8_recipe``: delayed ->
           ``DelayedScaling``, current -> ``Float8CurrentScaling``; HYBRID format: E4M3 forward,
           E5M2 gradients). Wrap the forward in ``fp8_autocast(state)``.
  torchao  ``torchao.float8.convert_to_float8_training`` with dynamic tensor-wise scaling (torchao has
           no delayed scaling; both recipes map to it). Needs no context manager.
  torch    ``fp8_torch.TorchFP8Linear``: the same tensor-wise current scaling on ``torch._scaled_mm``
           alone, for machines with neither package.
  auto     te when ``transformer_engine`` imports, else torchao, else torch.

Dimension policy: FP8 GEMMs need the feature dims (in and out) to be multiples of 16. A linear whose
feature dims are not is skipped and logged (every linear of the shipped presets qualifies). The
token dim varies per batch (struct stream: 1 + 4(F-1) tokens) and is handled inside each backend:
torchao pads the inner GEMM dim (``pad_inner_dim``), the torch backend pads the tokens of its wgrad
GEMM, and for TE the token rows are zero-padded to a multiple of 16 and the padding sliced off (zero
rows add nothing to the weight gradient).

FP8 is switched off, with a log line saying so, without CUDA or below compute capability 8.9.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ConfigError
from .blocks import Attention
from .fp8_torch import TorchFP8Linear
from .layers import FeedForward

log = logging.getLogger(__name__)

FP8_BACKENDS = ("auto", "te", "torchao", "torch")
FP8_RECIPES = ("delayed", "current")
# FP8 tensor-core GEMMs (cuBLASLt / TE) need feature dims that are multiples of this.
FP8_DIM_MULTIPLE = 16
# First compute capability with FP8 tensor cores (Ada 8.9, Hopper 9.0).
FP8_MIN_CAPABILITY = (8, 9)


@dataclass
class FP8State:
    """What ``apply_fp8`` did; ``fp8_autocast(state)`` needs it."""
    backend: str = "off"                     # off | te | torchao | torch
    recipe: str = ""
    reason: str = ""                         # why FP8 is off / which backend runs
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    te_recipe: object = None                 # the TE recipe object (te only)

    @property
    def enabled(self) -> bool:
        return self.backend != "off"


# --------------------------------------------------------------------------------------
# which modules
# --------------------------------------------------------------------------------------
def _dims_ok(lin: nn.Linear) -> bool:
    return lin.in_features % FP8_DIM_MULTIPLE == 0 and lin.out_features % FP8_DIM_MULTIPLE == 0


def fp8_candidates(model: nn.Module) -> list[str]:
    """Qualified names of the linears FP8 applies to (before the dimension check), sorted.

    Selected by owner type, not by name pattern, so renamed or new layers built from
    ``Attention`` / ``FeedForward`` are covered and nothing else is.
    """
    names = []
    for owner_name, owner in model.named_modules():
        if isinstance(owner, Attention):
            children = [n for n in ("q", "k", "v", "o") if isinstance(getattr(owner, n, None), nn.Linear)]
        elif isinstance(owner, FeedForward):
            children = [n for n, m in owner.named_children() if isinstance(m, nn.Linear)]
        else:
            continue
        prefix = f"{owner_name}." if owner_name else ""
        names.extend(prefix + c for c in children)
    return sorted(names)


def fp8_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(convertible, skipped for dims) among ``fp8_candidates``."""
    mods = dict(model.named_modules())
    ok, skipped = [], []
    for name in fp8_candidates(model):
        (ok if _dims_ok(mods[name]) else skipped).append(name)
    return ok, skipped


# --------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------
def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # not installed, or built against another torch / CUDA
        return False


def _torchao_available() -> bool:
    try:
        from torchao.float8 import convert_to_float8_training  # noqa: F401
        return True
    except Exception:
        return False


def choose_backend(cfg: Config, device: Optional[torch.device] = None) -> tuple[str, str]:
    """(backend, reason) for ``cfg.train`` on ``device``; backend ``off`` when FP8 cannot run."""
    t = cfg.train
    if t.fp8_backend not in FP8_BACKENDS:
        raise ConfigError(f"train.fp8_backend: {t.fp8_backend!r} is not one of {', '.join(FP8_BACKENDS)}")
    if t.fp8_recipe not in FP8_RECIPES:
        raise ConfigError(f"train.fp8_recipe: {t.fp8_recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    if not t.fp8:
        return "off", "train.fp8=false"
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    if device.type != "cuda":
        return "off", f"no CUDA device ({device.type}); linears stay torch.nn.Linear"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        return "off", (f"compute capability {cap[0]}.{cap[1]} < {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                       f"has no FP8 tensor cores; linears stay bf16 torch.nn.Linear")
    want = t.fp8_backend
    if want in ("auto", "te") and _te_available():
        return "te", f"Transformer Engine te.Linear, recipe {t.fp8_recipe}"
    if want == "te":
        raise ConfigError("train.fp8_backend=te: transformer_engine is not importable")
    note = "" if t.fp8_recipe == "current" else " (train.fp8_recipe=delayed needs TE: dynamic tensor-wise instead)"
    if want in ("auto", "torchao") and _torchao_available():
        return "torchao", f"torchao float8 training, tensor-wise current scaling{note}"
    if want == "torchao":
        raise ConfigError("train.fp8_backend=torchao: torchao.float8 is not importable")
    if hasattr(torch, "_scaled_mm"):
        return "torch", f"torch._scaled_mm FP8 linears, tensor-wise current scaling{note}"
    return "off", "no FP8 GEMM available (no transformer_engine, torchao or torch._scaled_mm); linears stay bf16"


# --------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------
def _te_recipe(name: str) -> object:
    from transformer_engine.common import recipe as te_recipe  # type: ignore

    if name == "delayed":
        return te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID)
    return te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)


def _te_linear_class() -> type:
    """te.Linear whose forward pads the token rows to a multiple of ``FP8_DIM_MULTIPLE``."""
    import transformer_engine.pytorch as te  # type: ignore

    class PaddedTELinear(te.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            lead = x.shape[:-1]
            rows = x.reshape(-1, x.shape[-1])
            n = rows.shape[0]
            pad = (-n) % FP8_DIM_MULTIPLE
            out = super().forward(F.pad(rows, (0, 0, 0, pad)) if pad else rows)
            return out[:n].reshape(*lead, out.shape[-1])

    return PaddedTELinear


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_linears(model: nn.Module, backend: str, names: list[str]) -> None:
    """Replace the linears ``names`` of ``model`` in place by ``backend``'s FP8 linear (weights kept)."""
    if backend == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        wanted = set(names)
        convert_to_float8_training(model, config=Float8LinearConfig(pad_inner_dim=True),
                                   module_filter_fn=lambda mod, fqn: fqn in wanted)
        return
    if backend == "torch":
        for name in names:
            _swap(model, name, TorchFP8Linear.from_linear(model.get_submodule(name)))
        return
    if backend != "te":
        raise ValueError(f"convert_linears: unknown FP8 backend {backend!r}")
    cls = _te_linear_class()
    for name in names:
        old = model.get_submodule(name)
        new = cls(old.in_features, old.out_features, bias=old.bias is not None,
                  params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        _swap(model, name, new)


def apply_fp8(model: nn.Module, cfg: Config, device: Optional[torch.device] = None) -> FP8State:
    """Convert the transformer linears of ``model`` to FP8 if ``cfg.train.fp8`` and the hardware allow.

    Call once, after the model is on its device and in its dtype and before the optimizer is
    built (the TE backend replaces parameters). Logs which backend runs, or why none does.
    """
    backend, reason = choose_backend(cfg, device)
    state = FP8State(backend=backend, recipe=cfg.train.fp8_recipe if backend != "off" else "", reason=reason)
    if backend == "off":
        log.info("fp8: off — %s", reason)
        return state
    ok, skipped = fp8_targets(model)
    for name in skipped:
        lin = model.get_submodule(name)
        log.info("fp8: %s stays bf16 (in=%d, out=%d not multiples of %d)", name, lin.in_features,
                 lin.out_features, FP8_DIM_MULTIPLE)
    convert_linears(model, backend, ok)
    if backend == "te":
        state.te_recipe = _te_recipe(cfg.train.fp8_recipe)
    state.converted, state.skipped = ok, skipped
    log.info("fp8: %s — %d linears converted, %d skipped", reason, len(ok), len(skipped))
    return state


def fp8_autocast(state: FP8State) -> ContextManager:
    """Context to wrap the model forward in (TE needs it; other backends get a no-op)."""
    if state.backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te  # type: ignore

    autocast: Optional[Callable] = getattr(te, "autocast", None)
    if autocast is not None:  # TE >= 2.9 renamed fp8_autocast
        return autocast(enabled=True, recipe=state.te_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=state.te_recipe)
