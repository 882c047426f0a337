"""Inference bundles: one call that turns a directory into a ready model.

A bundle (written by ``python -m checkpoints_conv.export_bundle``) is a directory::

    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
    config.json        the full resolved Config (all sections)
    stats.json         normalisation statistics of the training shards (absent when unknown)
    ema/               EMA weights in the same layout (only when training kept an EMA)
    bundle.json        manifest: source run, tag, step, dtype, what is present

``load_bundle`` also accepts any directory with safetensors weights + ``config.json`` (the output
of ``checkpoints_conv.zero_to_safetensors`` or ``checkpoints_conv.import_wan``). Only safetensors
are read, so loading a bundle never unpickles anything.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from safetensors import safe_open

from .config import Config, ConfigError, build_config
from .models import DualForceModel

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
STATS_NAME = "stats.json"
MANIFEST_NAME = "bundle.json"
EMA_DIR = "ema"

PathLike = Union[str, Path]


class BundleError(ValueError):
    """A bundle or weights directory is incomplete or inconsistent; the message names the file."""


# --------------------------------------------------------------------------------------
# safetensors files, single or sharded
# --------------------------------------------------------------------------------------
def weight_files(path: PathLike) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it.

    ``path`` is a ``.safetensors`` file, an ``*.index.json`` file, or a directory holding
    ``model.safetensors``, ``model.safetensors.index.json`` (or, failing those, exactly one
    ``*.safetensors`` / ``*.safetensors.index.json``).
    """
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            p = p / INDEX_NAME
        elif (p / WEIGHTS_NAME).is_file():
            p = p / WEIGHTS_NAME
        else:
            idx = sorted(p.glob("*.safetensors.index.json"))
            files = sorted(p.glob("*.safetensors"))
            if len(idx) == 1:
                p = idx[0]
            elif len(files) == 1:
                p = files[0]
            else:
                raise BundleError(f"{path}: no {INDEX_NAME} or {WEIGHTS_NAME}, and not exactly one "
                                  f"safetensors file or index ({len(files)} files, {len(idx)} indexes)")
    if not p.is_file():
        raise BundleError(f"{p}: weights file not found")
    if p.name.endswith(".json"):
        try:
            weight_map = json.loads(p.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BundleError(f"{p}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        out = {}
        for name, fname in weight_map.items():
            f = p.parent / fname
            if not f.is_file():
                raise BundleError(f"{p}: tensor {name!r} lives in {fname}, which is missing")
            out[name] = f
        return out
    with safe_open(str(p), framework="pt") as f:
        return {k: p for k in f.keys()}


def iter_tensors(path: PathLike, names: Optional[Iterable[str]] = None):
    """Yield ``(name, tensor)`` one at a time, opening each shard once (memory: one tensor)."""
    files = weight_files(path)
    wanted = list(files) if names is None else list(names)
    missing = [n for n in wanted if n not in files]
    if missing:
        raise BundleError(f"{path}: tensors not found: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    by_file: dict[Path, list[str]] = {}
    for n in wanted:
        by_file.setdefault(files[n], []).append(n)
    for fname, keys in by_file.items():
        with safe_open(str(fname), framework="pt") as f:
            for k in keys:
                yield k, f.get_tensor(k)


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


# --------------------------------------------------------------------------------------
# bundle
# --------------------------------------------------------------------------------------
def read_config(path: PathLike) -> Config:
    p = Path(path)
    f = p / CONFIG_NAME if p.is_dir() else p
    if not f.is_file():
        raise BundleError(f"{f}: config.json not found (every bundle / converted checkpoint has one)")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{f}: invalid JSON: {e}") from e
    try:
        return build_config(data, source=str(f))
    except ConfigError as e:
        raise BundleError(f"{f}: {e}") from e


def read_stats(path: PathLike) -> Optional[dict[str, Any]]:
    f = Path(path) / STATS_NAME
    return json.loads(f.read_text()) if f.is_file() else None


def build_model(cfg: Config, weights: PathLike, device: Union[str, torch.device] = "cpu",
                dtype: torch.dtype = torch.float32) -> DualForceModel:
    """A DualForceModel holding exactly the tensors in ``weights`` (strict: no missing, no extra)."""
    with torch.device("meta"):
        model = DualForceModel(cfg.model)
    expected = model.state_dict()
    state = {}
    for name, t in iter_tensors(weights):
        if name not in expected:
            continue  # reported below with the others
        if tuple(t.shape) != tuple(expected[name].shape):
            raise BundleError(f"{weights}: tensor {name!r} has shape {tuple(t.shape)}, the model built from "
                              f"config.json expects {tuple(expected[name].shape)}")
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    stored = set(weight_files(weights))
    missing = sorted(set(expected) - stored)
    extra = sorted(stored - set(expected))
    if missing or extra:
        raise BundleError(f"{weights}: does not match the model of config.json: missing {missing[:8]}, "
                          f"unexpected {extra[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def has_ema(path: PathLike) -> bool:
    d = Path(path) / EMA_DIR
    return d.is_dir() and ((d / WEIGHTS_NAME).is_file() or (d / INDEX_NAME).is_file())


def load_bundle(path: PathLike, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                weights: str = "auto") -> tuple[DualForceModel, Config, Optional[dict[str, Any]]]:
    """Load a bundle: ``(model in eval mode on device/dtype, Config, stats or None)``.

    ``weights``: ``auto`` (EMA when the bundle has it, else the raw weights), ``ema`` (required) or
    ``model`` (the raw trained weights).
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    if weights not in ("auto", "ema", "model"):
        raise BundleError(f"load_bundle: weights={weights!r} is not one of auto, ema, model")
    cfg = read_config(root)
    use_ema = has_ema(root) if weights == "auto" else weights == "ema"
    if use_ema and not has_ema(root):
        raise BundleError(f"{root / EMA_DIR}: weights='ema' but the bundle has no EMA weights")
    src = root / EMA_DIR if use_ema else root
    model = build_model(cfg, src, device, dtype)
    log.info("loaded %s weights from %s (%s, %s)", "EMA" if use_ema else "model", src, device, dtype)
    return model, cfg, read_stats(root)
