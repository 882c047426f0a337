"""FP8 training for the transformer linears (DESIGN §6).

Candidates are the linears that carry the bulk of the FLOPs: the q/k/v/o projections of every
``Attention`` (self-attention, text cross-attention, audio cross-attention, both bridge directions)
and the two FFN linears of every ``FeedForward``. Modulation tables, embeddings (patch, text, time,
audio projector, struct tokenizer, keypoints), norms, the auxiliary heads and the output head stay
in bf16: they are small, and they set the scale of everything downstream.

Of the candidates only those where FP8 pays are converted (``fp8_pays``), given the token rows of
each GEMM in the training shape (``rows``: per stream, from parallel/parallelize.py): FP8 halves the
time of the three GEMMs (forward, dgrad, wgrad) but every operand is first scaled and cast, a
memory-bound pass. At the struct tower's 33 tokens the casts of the weights cost far more than the
GEMMs save, so that tower, the audio and text keys/values stay bf16; at a video window's ~9k tokens
the FFN pays clearly and the attention projections about break even.

Backends, chosen by ``train.fp8_backend``:
  te       Transformer Engine ``te.Linear`` under ``te.fp8_autocast`` (``train.fp8_recipe``: delayed ->
           ``DelayedScaling``, current / rowwise -> ``Float8CurrentScaling``; HYBRID format: E4M3
           forward, E5M2 gradients). Wrap the forward in ``fp8_autocast(state)``.
  torchao  ``torchao.float8.convert_to_float8_training`` with dynamic scaling: ``rowwise`` -> its
           row-wise recipe, delayed / current -> tensor-wise (torchao has no delayed scaling). Needs
           no context manager; meant to run under torch.compile, which fuses the casts.
  torch    ``fp8_torch.TorchFP8Linear``: tensor-wise current scaling on ``torch._scaled_mm`` alone.
  auto     te when ``transformer_engine`` imports, else torchao, else torch.
The packages are imported only when FP8 is switched on (their import logs noise about compiled
extensions of other CUDA / torch builds, which the float8 training path does not use).

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
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..hardware import H100, Accelerator, TERA, datasheet
from .blocks import Attention
from .fp8_torch import TorchFP8Linear
from .layers import FeedForward

log = logging.getLogger(__name__)

FP8_BACKENDS = ("auto", "te", "torchao", "torch")
FP8_RECIPES = ("delayed", "current", "rowwise")
# bytes moved per operand element by dynamic scaling: amax pass (read 2) + scaled cast (read 2, write 1),
# then the fp8 copy transposed for the backward GEMMs (read 1, write 1)
CAST_BYTES_PER_ELEMENT = 5
TRANSPOSE_BYTES_PER_ELEMENT = 2
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
    skipped: list[str] = field(default_factory=list)        # feature dims not multiples of 16
    not_paying: list[str] = field(default_factory=list)     # GEMMs too small for FP8 to pay
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


def linear_rows(name: str, rows: dict[str, int]) -> int:
    """Token rows of the GEMM input of the candidate linear ``name``, given rows per stream
    (``video``, ``struct``, ``audio``, ``text``).

    Queries, outputs and FFNs run on their tower's stream; keys and values on the context: the same
    stream for self-attention, text for ``cross_attn``, audio features for ``audio_attn``, the other
    tower for the bridge (``s2v``: video queries struct, ``v2s``: struct queries video).
    """
    parts = name.split(".")
    if parts[0] == "bridge":                       # bridge.<i>.<s2v|v2s>.<q|k|v|o>
        query, context = ("video", "struct") if parts[2] == "s2v" else ("struct", "video")
    else:                                          # <video|struct>.blocks.<i>.<sublayer>....
        query = parts[0]
        context = {"cross_attn": "text", "audio_attn": "audio"}.get(parts[3], query)
    return rows[context if parts[-1] in ("k", "v") else query]


def fp8_speedup(m: int, k: int, n: int, acc: Accelerator) -> float:
    """Predicted (bf16 time) / (FP8 time) of one linear's forward + backward GEMMs, [m, k] x [k, n].

    Both ceilings from the datasheet: the three GEMMs at the bf16 or FP8 rate; FP8 adds the casts of
    x, W and the output gradient and the transposed fp8 copies (``CAST_BYTES_PER_ELEMENT``,
    ``TRANSPOSE_BYTES_PER_ELEMENT``) at the memory bandwidth. Under torch.compile the casts fuse
    into neighbouring kernels, so this is the pessimistic side."""
    if m <= 0 or acc.fp8_tflops <= 0:
        return 0.0
    flops = 3 * 2 * m * k * n
    elements = m * k + k * n + m * n
    t16 = flops / (acc.bf16_tflops * TERA)
    t8 = flops / (acc.fp8_tflops * TERA) + \
        (CAST_BYTES_PER_ELEMENT + TRANSPOSE_BYTES_PER_ELEMENT) * elements / (acc.bandwidth_tbs * TERA)
    return t16 / t8


def fp8_pays(model: nn.Module, names: list[str], rows: dict[str, int], acc: Accelerator
             ) -> tuple[list[str], list[str]]:
    """(names whose predicted ``fp8_speedup`` > 1, the rest)."""
    pays, not_paying = [], []
    for name in names:
        lin = model.get_submodule(name)
        gain = fp8_speedup(linear_rows(name, rows), lin.in_features, lin.out_features, acc)
        (pays if gain > 1.0 else not_paying).append(name)
    return pays, not_paying


def accelerator_of(device: Optional[torch.device]) -> Accelerator:
    """The datasheet of ``device`` (the H100's when it is not in the table, with a log line)."""
    name = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else "cpu"
    acc = datasheet(name)
    if acc is None:
        log.info("fp8: no datasheet entry for %r; pricing FP8 with the H100's figures", name)
        return H100
    return acc


# --------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_import(*loggers: str):
    """Import an FP8 package without its import-time log noise (failed loads of compiled extensions
    for other builds, deprecation notices): those loggers are raised to ERROR for the import."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _te_available() -> bool:
    try:
        with _quiet_import("transformer_engine"):
            import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # not installed, or built against another torch / CUDA
        return False


def _torchao_available() -> bool:
    try:
        with _quiet_import("torchao", "torch.utils._pytree"):
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
    if want in ("auto", "torchao") and _torchao_available():
        if t.fp8_recipe == "rowwise":
            return "torchao", "torchao float8 training, row-wise dynamic scaling"
        note = "" if t.fp8_recipe == "current" else " (train.fp8_recipe=delayed needs TE: dynamic tensor-wise instead)"
        return "torchao", f"torchao float8 training, tensor-wise dynamic scaling{note}"
    if want == "torchao":
        raise ConfigError("train.fp8_backend=torchao: torchao.float8 is not importable")
    if hasattr(torch, "_scaled_mm"):
        note = "" if t.fp8_recipe == "current" else f" (train.fp8_recipe={t.fp8_recipe} needs TE or torchao)"
        return "torch", f"torch._scaled_mm FP8 linears, tensor-wise current scaling{note}"
    return "off", "no FP8 GEMM available (no transformer_engine, torchao or torch._scaled_mm); linears stay bf16"


# --------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------
def _te_recipe(name: str) -> object:
    from transformer_engine.common import recipe as te_recipe  # type: ignore

    if name == "delayed":
        return te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID)
    return te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)   # current, rowwise


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


def convert_linears(model: nn.Module, backend: str, names: list[str], recipe: str = "current") -> None:
    """Replace the linears ``names`` of ``model`` in place by ``backend``'s FP8 linear (weights kept)."""
    if backend == "torchao":
        with _quiet_import("torchao", "torch.utils._pytree"):
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name("rowwise" if recipe == "rowwise" else "tensorwise")
        wanted = set(names)
        convert_to_float8_training(model, config=dataclasses.replace(config, pad_inner_dim=True),
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


def apply_fp8(model: nn.Module, cfg: Config, device: Optional[torch.device] = None,
              rows: Optional[dict[str, int]] = None) -> FP8State:
    """Convert the transformer linears of ``model`` to FP8 if ``cfg.train.fp8`` and the hardware allow.

    ``rows``: token rows per stream of a training micro batch (``linear_rows``); with it, only the
    linears where ``fp8_pays`` are converted, without it every candidate with FP8-able dims.
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
    not_paying: list[str] = []
    if rows is not None:
        acc = accelerator_of(device)
        ok, not_paying = fp8_pays(model, ok, rows, acc)
        log.info("fp8: %d linears stay bf16 where FP8 would not pay on %s (token rows per stream %s)",
                 len(not_paying), acc.name, rows)
    convert_linears(model, backend, ok, cfg.train.fp8_recipe)
    if backend == "te":
        state.te_recipe = _te_recipe(cfg.train.fp8_recipe)
    state.converted, state.skipped, state.not_paying = ok, skipped, not_paying
    log.info("fp8: %s — %d linears converted, %d skipped", reason, len(ok), len(skipped) + len(not_paying))
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
