"""Tiny random inputs for model tests (shapes follow docs/INTERFACES.md)."""
from __future__ import annotations

import torch

from dualforce_mega.config import ModelConfig, model_preset
from dualforce_mega.models import DualForceModel
from dualforce_mega.models.blocks import GATE_ROWS
from dualforce_mega.timeline import Timeline


def tiny_model(seed: int = 0, **overrides) -> DualForceModel:
    torch.manual_seed(seed)
    return DualForceModel(model_preset("tiny", **overrides))


def randomize_heads(model: DualForceModel, seed: int = 1, scale: float = 0.05) -> None:
    """Give the zero-initialised output heads, bridge outputs and AdaLN-Zero residual gates random
    weights, as a trained model would have, so that every input path reaches the outputs."""
    g = torch.Generator().manual_seed(seed)
    towers = [model.video] + ([model.struct] if model.struct is not None else [])
    params = [t.head.head.weight for t in towers]
    for layer in model.bridge:
        params += [layer.s2v.o.weight] + ([layer.v2s.o.weight] if layer.v2s is not None else [])
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for t in towers:
            dim = t.cfg.dim
            for row in GATE_ROWS:
                rows = slice(row * dim, (row + 1) * dim)
                proj = t.time_projection[1]
                proj.weight[rows] = torch.randn(proj.weight[rows].shape, generator=g) * scale
                proj.bias[rows] = 1.0 + torch.randn(dim, generator=g) * scale   # gates near 1: branches active


def randomized_model(**overrides) -> DualForceModel:
    """Tiny model (eval mode) whose zero-initialised parts (heads, bridge outputs, audio gates, AdaLN-Zero
    residual gates) are made non-zero, so every path (struct, bridge, audio) influences the output."""
    torch.manual_seed(0)
    model = DualForceModel(model_preset("tiny", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.5)
            elif p.abs().max() == 0:
                p.normal_(0.0, 0.1)
    randomize_heads(model, scale=0.1)
    return model.eval()


def random_inputs(cfg: ModelConfig, batch: int = 2, frames: int = 4, hw: tuple = (4, 6), seed: int = 0,
                  struct: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    tl = Timeline.of(cfg)
    n, a = tl.video_frames(frames), tl.audio_frames(frames)
    inputs = dict(
        video_latent=torch.randn(batch, cfg.in_channels, frames, *hw, generator=g),
        sigma_video=torch.rand(batch, frames, generator=g),
    )
    if struct:
        inputs.update(
            struct=torch.randn(batch, n, cfg.motion_dim, generator=g),
            sigma_struct=torch.rand(batch, frames, generator=g),
            kp_canonical=torch.randn(batch, cfg.kp_dim, generator=g),
            audio=torch.randn(batch, a, cfg.audio_dim, generator=g),
        )
        if cfg.text_dim:
            inputs["text_emb"] = torch.randn(batch, 5, cfg.text_dim, generator=g)
    return inputs


def saved_activation_bytes(model: DualForceModel, inputs: dict) -> int:
    """Bytes autograd saves for the backward during one training forward (what activation memory is):
    every saved tensor's storage counted once, parameters and the inputs themselves excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs, return_aux=True)
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *inputs.values()]}
    return sum(n for ptr, n in storages.items() if ptr not in excluded)
