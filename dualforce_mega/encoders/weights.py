"""Reading pretrained weight files safely and loading them strictly, with one-line errors that name
the file: ``.safetensors``, or a torch file read with ``weights_only=True`` (pickled code is never
executed; a file that needs it is refused)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

SHOWN_KEYS = 5


def read_state_dict(path: Union[str, Path], what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """A state dict from ``path``; a Lightning-style ``{"state_dict": {...}}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} weights not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal ends in the same clear line
        raise ValueError(f"{path}: the {what} file is not loadable with weights_only=True "
                         f"({type(e).__name__}){'; ' + hint if hint else ''}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors for the {what}, found {type(obj).__name__}")
    return obj


def _few(items: list[str]) -> str:
    return f"{items[:SHOWN_KEYS]}{' ...' if len(items) > SHOWN_KEYS else ''}"


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Union[str, Path], what: str,
                shown_prefix: str = "", assign: bool = False) -> nn.Module:
    """``model.load_state_dict(state, strict=True)`` after naming every missing, unexpected or mis-shaped
    key (``shown_prefix``: what the file's keys carry in front of the model's names; ``assign``: take
    the tensors themselves, for a model built on the meta device)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        note = f" (keys shown without the file's '{shown_prefix}' prefix)" if shown_prefix else ""
        raise ValueError(f"{path}: not the {what} layout: missing keys {_few(missing)}, unexpected keys "
                         f"{_few(unexpected)}, wrong shapes {_few(wrong)}{note}")
    model.load_state_dict(state, strict=True, assign=assign)
    return model
