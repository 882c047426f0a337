"""parallel/parallelize.py and training/step.py: one preparation and one step for every caller.

* the DeepSpeed engine built the trainer's way loads no DeepSpeed op and its ZeRO-3 hooks see the
  model's output tensors (no "cannot be detected" warning);
* regional torch.compile of the blocks computes what eager computes (fp32, inductor on CPU);
* the step reads nothing from the device (it runs on the meta device, where any read fails);
* activation checkpointing ``auto`` follows the memory model; FP8 goes only where it pays;
* FP8 packages are imported only when FP8 is used, and every CLI's --help is its own output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dualforce_mega.config import build_config
from dualforce_mega.hardware import H100
from dualforce_mega.models import DualForceModel
from dualforce_mega.models.fp8 import fp8_candidates, fp8_pays, fp8_speedup, linear_rows
from dualforce_mega.parallel.parallelize import TrainShape, apply_checkpointing, parallelize, plan_checkpointing
from dualforce_mega.smoke import random_batch
from dualforce_mega.training.metrics import MetricAccumulator
from dualforce_mega.training.step import TorchUpdater, TrainStep

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def _env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


# --------------------------------------------------------------------------------------
# DeepSpeed: no JIT op, hooks see the outputs
# --------------------------------------------------------------------------------------
ENGINE_JOB = r"""
import json, logging, os, sys, torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
from deepspeed.ops.op_builder import builder
from deepspeed.runtime.zero import utils as zero_utils
from dualforce_mega.config import build_config
from dualforce_mega.parallel.deepspeed_config import build_deepspeed_config, build_optimizer
from dualforce_mega.parallel.parallelize import parallelize
from dualforce_mega.smoke import random_batch
from dualforce_mega.training.step import DeepSpeedUpdater, TrainStep
from dualforce_mega.training.trainer import build_model

deepspeed.init_distributed(dist_backend="gloo")   # DeepSpeed's own CPU comm op is built here, not by us
loaded = []
for cls in (builder.OpBuilder, builder.CUDAOpBuilder):
    for name in ("load", "jit_load"):
        orig = getattr(cls, name)
        def record(self, *a, _orig=orig, **k):
            loaded.append(self.name)
            return _orig(self, *a, **k)
        setattr(cls, name, record)
warnings = []
class Grab(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("DeepSpeed").addHandler(Grab(level=logging.WARNING))
zero_utils.warned = False
stage = int(sys.argv[2])
cfg = build_config({}, [f"parallel.zero_stage={stage}", "train.global_batch=1"])
device = torch.device("cpu")
model = build_model(cfg)
prepared = parallelize(model, cfg, device, torch.float32)
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train, device),
                                  config=build_deepspeed_config(cfg, 1, "cpu"), dist_init_required=False)
step = TrainStep(cfg, engine, DeepSpeedUpdater(engine), device, torch.float32, prepared.fp8)
batch = random_batch(cfg, 1, 3, 8, 8, 4, torch.Generator().manual_seed(0), device)
before = [p.detach().clone() for p in engine.optimizer.param_groups[0]["params"]] if stage < 3 else None
for i in range(2):
    step([batch], i)
print(json.dumps({"loaded": loaded, "warnings": warnings, "loss": float(step.last.metrics["loss"]),
                  "optimizer": type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                                    else engine.optimizer).__name__}))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_engine_loads_no_op_and_sees_the_output_tensors(stage: int) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-c", ENGINE_JOB, str(port), str(stage)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["loaded"] == [], res["loaded"]                     # no FusedAdam / CPUAdam / any op
    assert res["optimizer"] == "AdamW"
    assert not [w for w in res["warnings"] if "cannot be detected" in w], res["warnings"]
    assert torch.isfinite(torch.tensor(res["loss"]))


# --------------------------------------------------------------------------------------
# compiled == eager
# --------------------------------------------------------------------------------------
def _one_step(compile_blocks: bool, checkpointing: str) -> tuple[dict, dict]:
    cfg = build_config({}, ["model.layers=1", "model.fusion_depth=1", "model.audio_layers=1",
                            f"train.compile={'on' if compile_blocks else 'off'}",
                            f"train.activation_checkpointing={checkpointing}", "train.grad_clip=0"])
    torch.manual_seed(0)
    model = DualForceModel(cfg.model)
    prep = parallelize(model, cfg, torch.device("cpu"), torch.float32)
    assert bool(prep.compiled) == compile_blocks
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(cfg, model, TorchUpdater(model, opt, 0.0), torch.device("cpu"), torch.float32)
    batch = random_batch(cfg, 2, 3, 4, 4, 3, torch.Generator().manual_seed(1), torch.device("cpu"))
    res = step.micro(batch, 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in res.metrics.items()}, grads


@pytest.mark.slow
def test_compiled_blocks_equal_eager_fp32() -> None:
    """fp32, inductor on CPU: losses within 1e-5 relative, every gradient within 1e-4 of its norm
    (fused kernels reorder fp32 sums; a wrong fusion is off by O(1))."""
    torch._dynamo.reset()
    eager_m, eager_g = _one_step(False, "off")
    comp_m, comp_g = _one_step(True, "on")   # compiled blocks inside checkpoint recomputation too
    assert eager_m.keys() == comp_m.keys()
    for k in eager_m:
        assert comp_m[k] == pytest.approx(eager_m[k], rel=1e-5, abs=1e-7), k
    assert eager_g.keys() == comp_g.keys()
    for n, g in eager_g.items():
        err = float((comp_g[n] - g).norm())
        assert err <= 1e-4 * float(g.norm()) + 1e-7, (n, err, float(g.norm()))


# --------------------------------------------------------------------------------------
# no host syncs
# --------------------------------------------------------------------------------------
def test_training_step_reads_nothing_from_the_device() -> None:
    """On the meta device every read of a value (.item(), float(), bool(), data-dependent indexing) fails,
    so a step that completes there, metrics included, never waits for the device."""
    cfg = build_config({}, ["train.activation_checkpointing=on"])
    torch.manual_seed(0)
    model = DualForceModel(cfg.model)
    meta = torch.device("meta")
    prep = parallelize(model, cfg, meta, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    step = TrainStep(cfg, model, TorchUpdater(model, opt, cfg.train.grad_clip), meta, torch.float32, prep.fp8)
    batch = random_batch(cfg, 2, 3, 4, 4, 3, torch.Generator().manual_seed(1), torch.device("cpu"))
    acc = MetricAccumulator()
    norm = step([batch, batch], 0, acc)
    assert norm is not None and norm.device.type == "meta"
    assert {"loss", "loss_video", "loss_struct", "loss_flame", "loss_lipsync"} <= set(acc.sums)
    # every metric is a device tensor, except the sigma buckets' frame counts, which come from host sigmas
    host = {k for k, v in acc.sums.items() if not isinstance(v, torch.Tensor)}
    assert host and all(k.startswith("frames_video_sigma_") for k in host)
    assert all(v.device.type == "meta" for k, v in acc.sums.items() if k not in host)
    with pytest.raises(Exception):
        float(acc.sums["loss"])      # the proof that a read would have failed


def test_step_metrics_equal_the_objective_floats() -> None:
    """The step's device-side metrics (sigma buckets from host copies) are the objective's float metrics."""
    from dualforce_mega.diffusion.objective import DiffusionForcingObjective
    from dualforce_mega.diffusion.noise import sample_seeds

    cfg = build_config({}, ["diffusion.sigma_buckets=3"])
    torch.manual_seed(0)
    model = DualForceModel(cfg.model)
    batch = random_batch(cfg, 3, 4, 4, 4, 3, torch.Generator().manual_seed(2), torch.device("cpu"))
    obj = DiffusionForcingObjective(cfg)
    inputs, targets = obj.prepare(batch, sample_seeds(cfg.train.seed, 5, batch["__index__"]))
    with torch.no_grad():
        out = model(**inputs, return_aux=True)
    _, floats = obj.losses(out, targets)
    step = TrainStep(cfg, model, TorchUpdater(model, torch.optim.SGD(model.parameters(), lr=0.0), 0.0),
                     torch.device("cpu"), torch.float32)
    res = step.micro(batch, 5)
    assert res.metrics.keys() == floats.keys()
    assert any(k.startswith("loss_video_sigma_") for k in floats)
    for k, v in floats.items():
        assert float(res.metrics[k]) == pytest.approx(v, rel=1e-5), k
    assert res.tokens == 3 * 4 * 2 * 2 + 3 * (1 + 4 * 3)          # video patches + struct frames


# --------------------------------------------------------------------------------------
# activation checkpointing: auto follows the memory model
# --------------------------------------------------------------------------------------
def test_auto_checkpointing_recomputes_only_what_memory_needs() -> None:
    cfg = build_config({}, ["model.preset=lite", "data.window=9", "data.latent_height=64", "data.latent_width=64",
                            "data.synthetic_frames=9", "parallel.zero_stage=2"])
    with torch.device("meta"):
        model = DualForceModel(cfg.model)
    shape = TrainShape.from_config(cfg)
    big, why = plan_checkpointing(model, cfg, shape, torch.bfloat16, world=1, device_memory=141 * GIB)
    assert big == [] and why.startswith("auto: 0/20")
    some, _ = plan_checkpointing(model, cfg, shape, torch.bfloat16, world=1, device_memory=40 * GIB)
    none_fit, why = plan_checkpointing(model, cfg, shape, torch.bfloat16, world=1, device_memory=10 * GIB)
    assert 0 < len(some) < 20 and none_fit == list(range(20)) and "over budget" in why
    # the audio / bridge layers (the first ones) hold the most activations: checkpointed first
    assert some == list(range(len(some)))
    assert plan_checkpointing(model, cfg, shape, torch.bfloat16, 1, None)[0] == []          # CPU: off
    cfg.train.activation_checkpointing = "on"
    assert plan_checkpointing(model, cfg, shape, torch.bfloat16, 1, None)[0] == list(range(20))
    apply_checkpointing(model, [0, 2])
    marked = {name for i, name, b in model.transformer_blocks() if b.activation_checkpointing}
    assert marked == {"video.blocks.0", "struct.blocks.0", "bridge.0", "video.blocks.2", "struct.blocks.2",
                      "bridge.2"}


# --------------------------------------------------------------------------------------
# FP8 only where it pays
# --------------------------------------------------------------------------------------
def test_fp8_size_rule_on_the_lite_training_shape() -> None:
    cfg = build_config({}, ["model.preset=lite", "data.window=9", "data.latent_height=64", "data.latent_width=64",
                            "data.synthetic_frames=9"])
    with torch.device("meta"):
        model = DualForceModel(cfg.model)
    rows = TrainShape.from_config(cfg).rows(cfg)
    assert rows == {"video": 9 * 32 * 32, "struct": 33, "audio": 33 * 2, "text": 0}
    names = fp8_candidates(model)
    pays, not_paying = fp8_pays(model, names, rows, H100)
    assert all(n.startswith(("video.", "bridge.")) for n in pays)
    assert all(linear_rows(n, rows) == rows["video"] for n in pays)
    assert not any(n.startswith("struct.") for n in pays)               # 33-token GEMMs
    assert "video.blocks.0.ffn.0" in pays and "video.blocks.0.cross_attn.k" in not_paying
    assert linear_rows("bridge.3.v2s.k", rows) == rows["video"] and linear_rows("bridge.3.v2s.q", rows) == 33
    # hand-computed: FFN 9216 x 1536 x 8960 on an H100: 0.770 ms bf16, 0.385 ms FP8 + 0.231 ms casts
    assert fp8_speedup(9216, 1536, 8960, H100) == pytest.approx(0.7696 / (0.3848 + 0.2311), rel=2e-3)
    # struct tower q: 33 x 1536 x 1536: 0.472 us of bf16 GEMMs against 0.236 us FP8 + 5.14 us of casts
    assert fp8_speedup(33, 1536, 1536, H100) == pytest.approx(0.4719 / (0.2359 + 5.137), rel=2e-3)


# --------------------------------------------------------------------------------------
# quiet imports and CLI first screens
# --------------------------------------------------------------------------------------
CLIS = [["-m", "dualforce_mega.training.train"], ["-m", "dualforce_mega.smoke"],
        ["-m", "dualforce_mega.training.single_process"], ["-m", "dualforce_mega.plan"],
        ["benchmarks/bench_train_step.py"]]


@pytest.fixture(scope="module")
def noisy_packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins for torchao and transformer_engine that shout when imported."""
    root = tmp_path_factory.mktemp("noisy")
    for name in ("torchao", "transformer_engine"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(
            f"import sys\nprint('{name.upper()} IMPORTED', file=sys.stderr)\nprint('{name.upper()} IMPORTED')\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("cli", CLIS, ids=lambda c: c[-1])
def test_cli_help_is_its_own_first_screen(cli: list[str], noisy_packages: Path) -> None:
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(noisy_packages), str(REPO)])
    out = subprocess.run([sys.executable, *cli, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:"), out.stdout[:300]
    assert "IMPORTED" not in out.stdout + out.stderr
    assert out.stderr.strip() == "" or all("real_accelerator" in l or "Setting accelerator" in l
                                           for l in out.stderr.strip().splitlines()), out.stderr[:1000]


def test_building_and_preparing_a_model_without_fp8_imports_no_fp8_package(noisy_packages: Path) -> None:
    code = textwrap.dedent("""
        import sys, torch
        from dualforce_mega.config import build_config
        from dualforce_mega.models import DualForceModel
        from dualforce_mega.parallel.parallelize import parallelize
        import dualforce_mega.training.trainer
        cfg = build_config({})
        parallelize(DualForceModel(cfg.model), cfg, torch.device("cpu"), torch.float32)
        print(sorted(m for m in sys.modules if m.startswith(("torchao", "transformer_engine"))))
    """)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(noisy_packages), str(REPO)])
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
