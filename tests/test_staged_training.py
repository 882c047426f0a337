"""Staged training through the launch scripts (2 CPU ranks, ZeRO-3, tiny preset, synthetic shards):
Phase 2 -> Phase 4 with ``train.init_from``, the sharded EMA (exact resume, conversion), and
``train.init_from`` on its own (sources, report, errors)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints_conv.export_bundle import export_bundle
from checkpoints_conv.zero_to_safetensors import convert
from dualforce_mega.bundle import read_state_dict
from dualforce_mega.config import model_preset
from dualforce_mega.models import DualForceModel
from dualforce_mega.training.checkpoint import FAULT_ENV, tag_for
from dualforce_mega.training.init_from import REPORT_NAME, InitFromError, init_from

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
EMA_DECAY = 0.9
EMA_STEPS = 3


def launch(script: str, run_dir: Path, *sets: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["DS_ACCELERATOR"] = "cpu"
    if fault:
        env[FAULT_ENV] = fault
    args = ["bash", f"launch/{script}", "--set", f"run.dir={run_dir}", "--set", "train.save_every=1",
            "--set", "train.keep_last=10", "--set", "run.tensorboard=false"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def weights(run_dir: Path, tag: str, out: Path) -> dict[str, torch.Tensor]:
    convert(run_dir, out, tag=tag)
    return read_state_dict(out)


@pytest.fixture(scope="module")
def phase2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("phase2")
    ok(launch("pretrain_causal.sh", run, "train.steps=2"))
    return run


@pytest.fixture(scope="module")
def shards(phase2: Path) -> str:
    return str(phase2 / "synthetic_shards")


@pytest.mark.distributed
@pytest.mark.slow
def test_phase4_starts_from_phase2(phase2: Path, shards: str, tmp_path: Path) -> None:
    run = tmp_path / "phase4"
    out = launch("train_dualforce.sh", run, f"data.shards={shards}", f"train.init_from={phase2}", "train.steps=0")
    ok(out)
    p2 = weights(phase2, tag_for(2), tmp_path / "p2")
    p4 = weights(run, tag_for(0), tmp_path / "p4")
    assert p2 and all(k.startswith("video.") for k in p2)
    for name, t in p2.items():
        assert torch.equal(p4[name], t), name            # the video tower at step 0 is Phase 2's, exactly
    report = json.loads((run / REPORT_NAME).read_text())
    assert sorted(report["loaded"]) == sorted(p2) and report["ignored"] == []
    assert sorted(report["new"]) == sorted(set(p4) - set(p2))
    assert any(n.startswith("struct.") for n in report["new"]) and any(n.startswith("bridge.") for n in report["new"])
    assert any(".audio_attn." in n for n in report["new"])
    assert "newly initialised" in out.stdout + out.stderr


def ema_run(run: Path, shards: str, init: Path, fault: str = "") -> subprocess.CompletedProcess:
    return launch("train_dualforce.sh", run, f"data.shards={shards}", f"train.init_from={init}",
                  f"train.steps={EMA_STEPS}", f"train.ema_decay={EMA_DECAY}", fault=fault)


@pytest.mark.distributed
@pytest.mark.slow
def test_ema_is_sharded_exact_on_resume_and_converted(phase2: Path, shards: str, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    ok(ema_run(straight, shards, phase2))
    tag_dir = straight / "checkpoints" / tag_for(EMA_STEPS)
    assert sorted(p.name for p in (tag_dir / "ema").iterdir()) == ["rank_00000.safetensors", "rank_00001.safetensors"]

    # converted EMA == the EMA recurrence over the trainer's weights, from the weights it started from
    bundle = export_bundle(straight, tmp_path / "bundle")
    ema = read_state_dict(bundle / "ema")
    start = tiny().state_dict()   # train.seed 0: the initialisation the trainer built, then Phase 2's tower
    start.update(weights(phase2, tag_for(2), tmp_path / "p2"))
    expected = {k: v.float().clone() for k, v in start.items()}
    for step in range(1, EMA_STEPS + 1):
        w = weights(straight, tag_for(step), tmp_path / f"w{step}")
        for k in expected:
            expected[k].lerp_(w[k], 1.0 - EMA_DECAY)
    assert set(ema) == set(expected)
    worst = max(float((ema[k] - expected[k]).abs().max()) for k in ema)
    assert worst < 1e-6, worst
    assert max(float((ema[k] - w[k]).abs().max()) for k in ema) > 1e-4   # the EMA is not the raw weights

    # a run killed while saving the last step resumes from the step before; its EMA ends up identical
    crashed = tmp_path / "crashed"
    out = ema_run(crashed, shards, phase2, fault=f"{EMA_STEPS}:1")
    assert out.returncode != 0
    out = ema_run(crashed, shards, phase2)
    ok(out)
    assert "EMA (decay 0.9) resumed" in out.stdout + out.stderr
    resumed = read_state_dict(export_bundle(crashed, tmp_path / "bundle_resumed") / "ema")
    assert all(torch.equal(resumed[k], ema[k]) for k in ema)


# ---------------------------------------------------------------------------------------------
# init_from on its own (no launcher)
# ---------------------------------------------------------------------------------------------
def tiny(**model) -> DualForceModel:
    torch.manual_seed(0)
    return DualForceModel(model_preset("tiny", **model))


def test_init_from_safetensors_reports_loaded_new_and_ignored(tmp_path: Path) -> None:
    source = tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    target = tiny(struct_tower=False, audio=False)          # Phase 2 model from a full checkpoint
    report = init_from(target, str(tmp_path))
    assert not report.new and "extra.weight" in report.ignored
    assert any(n.startswith("struct.") for n in report.ignored)
    for name, t in target.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_init_from_errors_name_path_and_parameter(tmp_path: Path) -> None:
    with pytest.raises(InitFromError, match="does not exist"):
        init_from(tiny(), str(tmp_path / "missing"))
    save_file({"video.head.head.weight": torch.zeros(5, 5)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InitFromError, match="video.head.head.weight"):
        init_from(tiny(), str(tmp_path))
    save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InitFromError, match="no tensor matches"):
        init_from(tiny(), str(tmp_path))
    with pytest.raises(InitFromError, match="ema"):
        init_from(tiny(), str(tmp_path), ema=True)


def test_ema_resumes_on_another_world_size(tmp_path: Path) -> None:
    """Elastic resume: EMA pieces written by 2 ranks are cut anew for 1 and 3 ranks, exactly."""
    from dualforce_mega.training.ema import ShardedEMA, partition

    torch.manual_seed(0)
    params = [("a", torch.nn.Parameter(torch.randn(5, 3))), ("b", torch.nn.Parameter(torch.randn(7)))]
    writers = [ShardedEMA(params, 0.9, rank, 2) for rank in range(2)]
    with torch.no_grad():
        for _, p in params:
            p.add_(1.0)
    for ema in writers:
        ema.update()
        ema.save(tmp_path)
    expected = {n: p.detach() - 0.9 for n, p in params}      # ema = w0 + 0.1 * ((w0 + 1) - w0) = w1 - 0.9
    for world in (1, 3):
        for rank in range(world):
            ema = ShardedEMA(params, 0.9, rank, world)
            ema.load(tmp_path)
            for name, full in expected.items():
                assert torch.allclose(ema.shadow[name], partition(full.flatten(), rank, world), atol=1e-6), (world, name)
