"""The smoke run that run.sh falls back to: it trains every parameter and fails loudly when it can't."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from dualforce_mega.config import load_config
from dualforce_mega.models import DualForceModel
from dualforce_mega.smoke import main, random_batch, run, smoke_step
from dualforce_mega.summary import count_parameters
from dualforce_mega.training.step import TorchUpdater, TrainStep

SHAPE = dict(batch=2, frames=2, height=4, width=4, text_tokens=3)


def test_smoke_steps_update_every_parameter() -> None:
    cfg = load_config(None, ["train.lr=1e-3"])
    torch.manual_seed(cfg.train.seed)
    model = DualForceModel(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    data = random_batch(cfg, device=torch.device("cpu"), generator=gen, **SHAPE)
    n = 1 + cfg.model.vae_temporal_stride * (SHAPE["frames"] - 1)
    assert data["struct"].shape == (2, n, cfg.model.motion_dim)
    assert data["audio"].shape[1] == n * cfg.model.audio_rate // cfg.model.fps
    step = TrainStep(cfg, model, TorchUpdater(model, opt, grad_clip=0.0), torch.device("cpu"), torch.float32)
    metrics = smoke_step(step, data, 0)
    assert {"loss", "loss_video", "loss_struct", "loss_flame", "loss_lipsync", "grad_norm"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    d = cfg.diffusion
    weighted = (d.loss_video * metrics["loss_video"] + d.loss_struct * metrics["loss_struct"]
                + d.loss_flame * metrics["loss_flame"] + d.loss_lipsync * metrics["loss_lipsync"])
    assert metrics["loss"] == pytest.approx(weighted, rel=1e-5)
    # zero-initialised output heads, then tanh gates, each block all gradient upstream of them for one
    # step (head -> gate -> audio attention / projector): by the third step every parameter has moved
    for i in (1, 2):
        smoke_step(step, data, i)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged


def test_smoke_fails_on_a_parameter_without_gradient() -> None:
    cfg = load_config(None)
    model = DualForceModel(cfg.model)
    model.video.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    data = random_batch(cfg, device=torch.device("cpu"), generator=gen, **SHAPE)
    step = TrainStep(cfg, model, TorchUpdater(model, opt, grad_clip=0.0), torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="video.unused"):
        smoke_step(step, data, 0)


def test_smoke_cli_logs_loss_and_parameter_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dualforce_mega.smoke")
    assert main(["--steps", "2", "--frames", "2", "--height", "4", "--width", "4", "--device", "cpu",
                 "--set", "model.causal_block_size=2"]) == 0
    expected = count_parameters(DualForceModel(load_config(None).model).named_parameters())["total_trainable"]
    text = caplog.text
    assert f"preset=tiny on cpu: {expected:,} trainable parameters" in text
    assert "step 1/2" in text and "step 2/2" in text and "loss=" in text


def test_smoke_run_video_only_model() -> None:
    cfg = load_config(None, ["model.struct_tower=false", "model.audio=false", "model.text_dim=0", "train.phase=2"])
    history = run(cfg, steps=1, device=torch.device("cpu"), **SHAPE)
    assert set(history[0]) >= {"loss", "loss_video"} and "loss_struct" not in history[0]


def test_smoke_cli_rejects_bad_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["--set", "model.layerz=2"]) == 2
    assert "model.layerz" in capsys.readouterr().err
