"""Loading official weight files strictly, and the loud warning for random-weight smoke runs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

RANDOM_PRESETS = ("tiny",)


class WeightFileError(ValueError):
    """A weight file that is missing, unreadable or not in the expected layout."""


def require_file(path: Optional[Union[str, Path]], flag: str, what: str) -> Path:
    """The path given for ``flag`` must be an existing file; the message names the flag."""
    if not path:
        raise WeightFileError(f"{flag}: no path given for the {what} (or run with --random-models tiny)")
    p = Path(path)
    if not p.is_file():
        raise WeightFileError(f"{flag}: {p} does not exist (the {what})")
    return p


def load_state_dict_strict(model: nn.Module, path: Union[str, Path], what: str,
                           strip_prefix: str = "") -> nn.Module:
    """``torch.load(weights_only=True)`` + ``load_state_dict(strict=True)``; any missing, unexpected or
    mis-shaped key is an error naming the file."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file ends in the same one-line error
        raise WeightFileError(f"{path}: cannot read the {what} weights ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise WeightFileError(f"{path}: expected a state dict for the {what}, found {type(sd).__name__}")
    if strip_prefix:
        sd = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise WeightFileError(f"{path}: not the {what} layout: {' '.join(s.strip() for s in first[:3])}") from e
    return model


def warn_random(what: str) -> None:
    log.warning("!!! %s: RANDOM WEIGHTS (--random-models); its numbers are meaningless (smoke run only) !!!",
                what)


def check_preset(preset: str) -> None:
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"random model preset {preset!r} is not one of {RANDOM_PRESETS}")
