"""Block causality: inputs of latent frames in later blocks never change outputs of earlier ones."""
from __future__ import annotations

import pytest
import torch

from dualforce_mega.timeline import Timeline
from model_utils import random_inputs, randomize_heads, tiny_model

FRAMES = 7


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_aux=True)
    return out


def _perturb_after(cfg, inputs: dict, t: int, seed: int) -> dict:
    """Change every input that belongs to latent frames > t (and audio past frame t's window)."""
    g = torch.Generator().manual_seed(seed)
    new = {k: v.clone() for k, v in inputs.items()}
    new["video_latent"][:, :, t + 1:] = torch.randn(new["video_latent"][:, :, t + 1:].shape, generator=g)
    new["sigma_video"][:, t + 1:] = torch.rand(new["sigma_video"][:, t + 1:].shape, generator=g)
    new["sigma_struct"][:, t + 1:] = torch.rand(new["sigma_struct"][:, t + 1:].shape, generator=g)
    last_vf = int(Timeline.of(cfg).spans(torch.tensor([t]))[0, 1])
    new["struct"][:, last_vf + 1:] = torch.randn(new["struct"][:, last_vf + 1:].shape, generator=g)
    ratio = cfg.audio_rate // cfg.fps
    first_unseen = (last_vf + 1 + cfg.audio_context) * ratio
    assert first_unseen < new["audio"].shape[1], "test setup: nothing left to perturb in audio"
    new["audio"][:, first_unseen:] = torch.randn(new["audio"][:, first_unseen:].shape, generator=g)
    return new


def _assert_prefix_equal(cfg, a, b, t: int, atol: float) -> None:
    last_vf = int(Timeline.of(cfg).spans(torch.tensor([t]))[0, 1])
    pairs = {
        "video": (a.video[:, :, :t + 1], b.video[:, :, :t + 1]),
        "struct": (a.struct[:, :last_vf + 1], b.struct[:, :last_vf + 1]),
        "flame": (a.flame[:, :last_vf + 1], b.flame[:, :last_vf + 1]),
        "lip_struct": (a.lip_struct[:, :t + 1], b.lip_struct[:, :t + 1]),
        "lip_audio": (a.lip_audio[:, :t + 1], b.lip_audio[:, :t + 1]),
    }
    for name, (x, y) in pairs.items():
        if atol == 0:
            assert torch.equal(x, y), f"{name}: outputs of frames <= {t} changed"
        else:
            diff = (x - y).abs().max().item()
            assert diff <= atol, f"{name}: outputs of frames <= {t} changed by {diff}"
    # and the perturbation is real: later frames do change
    assert not torch.equal(a.video[:, :, t + 1:], b.video[:, :, t + 1:])
    assert not torch.equal(a.struct[:, last_vf + 1:], b.struct[:, last_vf + 1:])


@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("backend,atol", [("sdpa", 0.0), ("flash", 1e-6), ("merged", 1e-6)])
def test_block_causality_full_model(block_size: int, backend: str, atol: float) -> None:
    model = tiny_model(causal_block_size=block_size, audio_context=1)
    randomize_heads(model)
    with torch.no_grad():  # audio gates open, as after training
        for blk in list(model.video.blocks) + list(model.struct.blocks):
            if blk.audio_attn is not None:
                blk.audio_attn.gate.fill_(0.5)
    model.set_attention_backend(backend)
    cfg = model.cfg
    inputs = random_inputs(cfg, frames=FRAMES)
    ref = _outputs(model, inputs)
    # the last frame of every block except the final one
    for t in range(block_size - 1, FRAMES - 1, block_size):
        if t + 1 >= FRAMES:
            continue
        changed = _outputs(model, _perturb_after(cfg, inputs, t, seed=100 + t))
        _assert_prefix_equal(cfg, ref, changed, t, atol)


def test_block_causality_video_only() -> None:
    model = tiny_model(struct_tower=False, audio=False, causal_block_size=2)
    randomize_heads(model)
    inputs = random_inputs(model.cfg, frames=6, struct=False)
    ref = _outputs(model, inputs).video
    for t in (1, 3):
        new = {k: v.clone() for k, v in inputs.items()}
        new["video_latent"][:, :, t + 1:] += 1.0
        out = _outputs(model, new).video
        assert torch.equal(ref[:, :, :t + 1], out[:, :, :t + 1])
        assert not torch.equal(ref[:, :, t + 1:], out[:, :, t + 1:])


def test_within_block_frames_see_each_other() -> None:
    """Sanity check that the test above can fail: frames of one block are mutually visible."""
    model = tiny_model(causal_block_size=3)
    randomize_heads(model)
    inputs = random_inputs(model.cfg, frames=6)
    ref = _outputs(model, inputs).video
    new = {k: v.clone() for k, v in inputs.items()}
    new["video_latent"][:, :, 2] += 1.0  # last frame of block 0
    out = _outputs(model, new).video
    assert not torch.equal(ref[:, :, 0], out[:, :, 0])
