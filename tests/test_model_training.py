"""Zero-initialised gates, gradient flow to every parameter, Phase-2 / Phase-4 modes of one model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dualforce_mega.models import DualForceModel
from dualforce_mega.plan_activations import activation_report
from model_utils import random_inputs, randomize_heads, saved_activation_bytes, tiny_model


def _loss(out, targets: dict) -> torch.Tensor:
    """Stand-in for the objective: every output head contributes."""
    loss = F.mse_loss(out.video, targets["video"])
    if out.struct is not None:
        loss = loss + F.mse_loss(out.struct, targets["struct"]) + F.mse_loss(out.flame, targets["flame"])
        a = F.normalize(out.lip_audio.flatten(0, 1), dim=-1)
        s = F.normalize(out.lip_struct.flatten(0, 1), dim=-1)
        logits = a @ s.T / 0.1
        loss = loss + F.cross_entropy(logits, torch.arange(logits.shape[0]))
    return loss


def _targets(out, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {"video": torch.randn(out.video.shape, generator=g)}
    if out.struct is not None:
        t["struct"] = torch.randn(out.struct.shape, generator=g)
        t["flame"] = torch.randn(out.flame.shape, generator=g)
    return t


def _audio_changes_output(model: DualForceModel, inputs: dict) -> bool:
    other = dict(inputs, audio=inputs["audio"] + torch.randn_like(inputs["audio"]))
    with torch.no_grad():
        a, b = model(**inputs), model(**other)
    return not (torch.equal(a.video, b.video) and torch.equal(a.struct, b.struct))


def test_audio_gate_is_inert_at_init_and_opens_after_a_step() -> None:
    # Audio is added to a model whose heads are already trained (the real Phase-2 -> Phase-4
    # path): with the gates at 0 audio changes nothing; one optimizer step opens them.
    model = tiny_model()
    randomize_heads(model)
    inputs = random_inputs(model.cfg)
    assert all(b.audio_attn.gate.item() == 0.0 for b in model.video.blocks if b.audio_attn is not None)
    assert not _audio_changes_output(model, inputs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(**inputs, return_aux=True)
    _loss(out, _targets(out)).backward()
    opt.step()
    assert _audio_changes_output(model, inputs)


def test_fresh_model_audio_inert_then_active() -> None:
    # From scratch the zero output heads block every gradient but their own on step 1, so the
    # gates open on step 2.
    model = tiny_model()
    inputs = random_inputs(model.cfg)
    assert not _audio_changes_output(model, inputs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        out = model(**inputs, return_aux=True)
        _loss(out, _targets(out)).backward()
        opt.step()
    assert _audio_changes_output(model, inputs)


def test_every_parameter_gets_gradient_in_full_mode() -> None:
    model = tiny_model()
    inputs = random_inputs(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    touched = {n: False for n, p in model.named_parameters() if p.requires_grad}
    for step in range(4):
        opt.zero_grad()
        out = model(**inputs, return_aux=True)
        _loss(out, _targets(out, seed=step)).backward()
        for n, p in model.named_parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                touched[n] = True
        opt.step()
    missing = [n for n, ok in touched.items() if not ok]
    assert not missing, f"parameters without gradient after 4 steps: {missing}"


def test_phase2_video_only_model() -> None:
    model = tiny_model(struct_tower=False, audio=False)
    assert model.struct is None and len(model.bridge) == 0 and model.aux is None
    names = [n for n, _ in model.named_parameters()]
    assert not any("audio" in n for n in names)
    inputs = random_inputs(model.cfg, struct=False)
    out = model(**inputs)
    assert out.video.shape == inputs["video_latent"].shape and out.struct is None


def test_struct_inputs_ignored_by_phase2_model_and_video_only_call_of_full_model() -> None:
    # Phase 2 batches still carry motion, keypoints and audio: the video-only model ignores them (the
    # same computation as without them, so bit-identical in one process)
    phase2 = tiny_model(struct_tower=False, audio=False)
    randomize_heads(phase2)
    inputs = random_inputs(phase2.cfg)       # struct, sigma_struct, kp_canonical, audio, text_emb
    assert {"struct", "sigma_struct", "kp_canonical", "audio"} <= inputs.keys()
    video_only = {k: inputs[k] for k in ("video_latent", "sigma_video", "text_emb")}
    with torch.no_grad():
        out, ref = phase2(**inputs, return_aux=True), phase2(**video_only, return_aux=True)
    assert out.struct is None and out.flame is None and torch.equal(out.video, ref.video)
    # and the full model called with video inputs only runs its video tower alone
    full = tiny_model()
    out = full(**{k: inputs[k] for k in ("video_latent", "sigma_video")})
    assert out.struct is None and out.video.shape == inputs["video_latent"].shape


def test_gradient_checkpointing_matches_and_keeps_only_layer_inputs() -> None:
    model = tiny_model()
    randomize_heads(model)
    inputs = random_inputs(model.cfg)
    grads, saved = [], []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        out = model(**inputs, return_aux=True)
        _loss(out, _targets(out)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        saved.append(saved_activation_bytes(model, inputs))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    # checkpointing is really on: the forward keeps each layer's inputs (and what lies outside the
    # layers), not the layers' activations: within the planner's bound, far below the bytes without checkpointing
    f, h, w = inputs["video_latent"].shape[2:]
    _, ph, pw = model.cfg.patch_size
    rep = activation_report(model.cfg, inputs["video_latent"].shape[0], f, (h // ph, w // pw), 1, 4, True,
                            inputs["text_emb"].shape[1])
    assert saved[0] > rep.layer_inputs + rep.outside >= saved[1], (saved, rep.layer_inputs + rep.outside)
    assert saved[1] < saved[0] / 4, saved
