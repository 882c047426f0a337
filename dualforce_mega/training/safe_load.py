"""Loading DeepSpeed ``.pt`` files without unpickling arbitrary objects.

Every file goes through ``torch.load(weights_only=True)``. DeepSpeed pickles a handful of its own
classes into checkpoints (the ZeRO stage enum, the loss scaler, stage-1/2 fragment addresses);
those names — and only those — are allow-listed, and they are *not* mapped to the real DeepSpeed
classes but to inert records (:class:`InertObject`) that merely keep their constructor arguments
and state. Nothing from a checkpoint can run code, and the converter does not need DeepSpeed
installed. Any other global makes the load fail with an error naming the file and the global.
"""
from __future__ import annotations

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


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file needs something other than tensors, containers and allow-listed records."""


_REASON_PREFIXES = ("Trying to", "Unsupported", "Can only", "Unsupported global")


def _reason(e: Exception) -> str:
    """The line of torch's weights-only error that names the offending global (not its generic advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hits = [ln for ln in lines if ln.startswith(_REASON_PREFIXES)]
    return hits[0] if hits else (lines[-1] if lines else repr(e))


def safe_torch_load(path: Union[str, Path], mmap: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` and inert DeepSpeed records.

    ``mmap=True`` maps tensor storages from the file instead of reading them, so a rank's
    optimizer file (fp32 partition + Adam moments) costs memory only for the slices read.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_INERT):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load — it contains objects outside the weights-only allow-list "
            f"(tensors, containers and {', '.join(DEEPSPEED_PICKLED_TYPES)}): {_reason(e)}") from e
    except RuntimeError as e:
        if "mmap" in str(e) and mmap:  # legacy (non-zip) torch.save files cannot be mapped
            return safe_torch_load(path, mmap=False)
        raise
