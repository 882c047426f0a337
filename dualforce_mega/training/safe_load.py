"""Loading DeepSpeed ``.pt`` files without unpickling arbitrary objects.

Every file goes through ``torch.load(weights_only=True)``. DeepSpeed pickles a handful of its own
classes into checkpoints (the ZeRO stage enum, the loss scaler, stage-1/2 fragment addresses);
those names — and only those — are allow-listed, and they are *not* mapped to the real DeepSpeed
classes but to inert records (:class:`InertObject`) that merely keep their constructor arguments
and state. Nothing from a checkpoint can run code, and the converter does not need DeepSpeed
installed. Any other global makes the load fail with an error naming the file and the global.

The trainer's resume (``deepspeed_classes=True``, through :class:`SafeCheckpointEngine`) allows the same
names mapped to the real DeepSpeed classes, which its own loading code expects: still no other global,
so still no code from the checkpoint.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Union

import torch


class InertObject:
    """Stand-in for an allow-listed DeepSpeed object: records its arguments and state, nothing else."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args)
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name} args={self.args!r}>"


# DeepSpeed classes found in ZeRO checkpoints (model_states / optim_states) of stages 1-3.
DEEPSPEED_PICKLED_TYPES: tuple[str, ...] = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _inert_class(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"qualified_name": name})


_INERT = [(_inert_class(n), n) for n in DEEPSPEED_PICKLED_TYPES]


def _real_classes() -> list[type]:
    out = []
    for name in DEEPSPEED_PICKLED_TYPES:
        module, attr = name.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), attr))
    return out


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file needs something other than tensors, containers and allow-listed records."""


# torch's weights-only unpickler says this when a global is not allowed (as opposed to a damaged file)
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


_REASON_PREFIXES = ("Trying to", "Unsupported", "Can only", "Unsupported global")


def _reason(e: Exception) -> str:
    """The line of torch's weights-only error that names the offending global (not its generic advice)."""
    lines = [ln.strip().split("WeightsUnpickler error:", 1)[-1].split(". Please use", 1)[0].strip()
             for ln in str(e).splitlines() if ln.strip()]
    hits = [ln for ln in lines if ln.startswith(_REASON_PREFIXES)]
    return hits[0] if hits else (lines[-1] if lines else repr(e))


def safe_torch_load(path: Union[str, Path], mmap: bool = False, map_location: Any = "cpu",
                    deepspeed_classes: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allow-listed DeepSpeed names, as inert records
    (default) or as the real DeepSpeed classes (``deepspeed_classes``, for DeepSpeed's own loader).

    ``mmap=True`` maps tensor storages from the file instead of reading them, so a rank's
    optimizer file (fp32 partition + Adam moments) costs memory only for the slices read.
    """
    path = Path(path)
    allowed = _real_classes() if deepspeed_classes else _INERT
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if _WEIGHTS_ONLY_REFUSAL not in str(e):
            raise
        raise UnsafeCheckpointError(
            f"{path}: refused to load — it contains objects outside the weights-only allow-list "
            f"(tensors, containers and {', '.join(DEEPSPEED_PICKLED_TYPES)}): {_reason(e)}") from e
    except RuntimeError as e:
        if "mmap" in str(e) and mmap:  # legacy (non-zip) torch.save files cannot be mapped
            return safe_torch_load(path, mmap=False, map_location=map_location, deepspeed_classes=deepspeed_classes)
        raise
