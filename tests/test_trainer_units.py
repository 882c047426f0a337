"""Trainer pieces that need no process group: LR schedule, DeepSpeed config, preflight errors,
world-size independent global batches, checkpoint atomicity, the launch scripts' two faces."""
from __future__ import annotations

import errno
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dualforce_mega.data.synthetic_shards import write_synthetic_shards
from dualforce_mega.config import ConfigError, build_config
from dualforce_mega.flops import forward_flops
from dualforce_mega.parallel.deepspeed_config import build_deepspeed_config, build_optimizer, grad_accum_steps
from dualforce_mega.training.checkpoint import CheckpointManager, TMP_PREFIX, tag_for
from dualforce_mega.training.exit_codes import CheckpointWriteError
from dualforce_mega.training.data_feed import GlobalBatchFeed
from dualforce_mega.training.launch_entry import script_args
from dualforce_mega.training.metrics import MetricAccumulator
from dualforce_mega.training.phase import apply_phase
from dualforce_mega.training.preflight import check_shards, check_world, hostfile_slots
from dualforce_mega.training.schedule import build_lr_scheduler, lr_factor
from dualforce_mega.training.trainer import build_model, sample_training_flops, tokens_in

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("launch/pretrain_causal.sh", "launch/train_dualforce.sh")


# ------------------------------------------------------------------------------ LR schedule
def test_warmup_cosine_shape() -> None:
    warmup, total, ratio = 4, 20, 0.1
    f = [lr_factor(s, warmup, total, ratio) for s in range(total)]
    assert f[:warmup] == [(s + 1) / warmup for s in range(warmup)]
    assert f[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))       # cosine only decays
    assert lr_factor(total, warmup, total, ratio) == pytest.approx(ratio)
    assert lr_factor(total + 5, warmup, total, ratio) == pytest.approx(ratio)  # floor after the end
    mid = warmup + (total - warmup) // 2
    assert f[mid] == pytest.approx(ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_lr_scheduler_state_resumes_the_same_curve() -> None:
    cfg = build_config({"train": {"steps": 30, "warmup_steps": 5, "lr": 1e-3, "min_lr_ratio": 0.2}})

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.lr)
        return opt, build_lr_scheduler(opt, cfg.train)

    opt, sched = make()
    lrs = []
    for _ in range(30):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    opt2, sched2 = make()
    for _ in range(12):
        opt2.step()
        sched2.step()
    state = sched2.state_dict()
    opt3, sched3 = make()
    sched3.load_state_dict(state)
    resumed = []
    for _ in range(18):
        resumed.append(sched3.get_last_lr()[0])
        opt3.step()
        sched3.step()
    assert resumed == lrs[12:]


# ------------------------------------------------------------------------------ DeepSpeed config
@pytest.mark.parametrize("clip", [0.0, 0.5, 2.5])
def test_gradient_clipping_is_always_explicit(clip: float) -> None:
    cfg = build_config({"train": {"grad_clip": clip}})
    assert build_deepspeed_config(cfg, 1, "cpu")["gradient_clipping"] == clip


def test_deepspeed_config_from_config() -> None:
    cfg = build_config({"train": {"global_batch": 12, "micro_batch": 2, "lr": 2e-4, "betas": [0.8, 0.95],
                                  "adam_eps": 1e-7, "weight_decay": 0.05},
                        "parallel": {"zero_stage": 2, "offload_optimizer": True}})
    ds = build_deepspeed_config(cfg, 3, "cuda")
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True}                     # precision auto on GPU
    cpu = build_deepspeed_config(build_config({}), 2, "cpu")
    assert "bf16" not in cpu
    assert cpu["zero_optimization"]["stage"] == 3
    # the optimizer is torch's AdamW passed as a client optimizer, with the config's hyper-parameters
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]    # matrices decay, vectors do not
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-7


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deepspeed_config_never_requests_a_jit_op(stage: int, offload: bool, device: str) -> None:
    """No "optimizer" section (DeepSpeed would build FusedAdam / CPUAdam, JIT-compiled C++/CUDA ops) and,
    with the optimizer offloaded, DeepSpeed may keep the client's torch AdamW instead of its CPUAdam."""
    if offload and stage == 0:
        pytest.skip("offload needs ZeRO >= 1")
    cfg = build_config({"parallel": {"zero_stage": stage, "offload_optimizer": offload}})
    ds = build_deepspeed_config(cfg, 1, device)
    assert "optimizer" not in ds
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert not any(k in ds for k in ("fp16", "sparse_attention", "compression_training", "activation_checkpointing"))


def test_batch_split_errors_name_the_key() -> None:
    cfg = build_config({"train": {"global_batch": 6, "micro_batch": 1}})
    assert grad_accum_steps(cfg, 3) == 2
    with pytest.raises(ConfigError, match=r"train.global_batch: 6 .* 1 x 4"):
        grad_accum_steps(cfg, 4)
    with pytest.raises(ConfigError, match=r"parallel.sp: world size 3 is not divisible by parallel.sp=2"):
        check_world(build_config({"parallel": {"sp": 2}}), 3)


def test_phase2_is_video_only() -> None:
    cfg = apply_phase(build_config({"train": {"phase": 2}}))
    assert not cfg.model.struct_tower and not cfg.model.audio
    full = apply_phase(build_config({"train": {"phase": 4}}))
    assert full.model.struct_tower and full.model.audio


# ------------------------------------------------------------------------------ preflight: shards
def test_shard_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.shards: .*nope"):
        check_shards(build_config({"data": {"shards": str(tmp_path / "nope")}}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.shards: .*no shards"):
        check_shards(build_config({"data": {"shards": str(tmp_path / "empty")}}))
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.shards: .*zero.tar is empty"):
        check_shards(build_config({"data": {"shards": str(tmp_path / "zero.tar")}}))
    with pytest.raises(ConfigError, match="data.synthetic_shards: 2 shards cannot feed 4 streams"):
        check_shards(build_config({"data": {"synthetic_shards": 2}, "train": {"global_batch": 4}}))


def test_hostfile_slots(tmp_path: Path) -> None:
    hf = tmp_path / "hosts"
    hf.write_text("# comment\nnode-a slots=8\n\nnode-b slots=4  # trailing\n")
    assert hostfile_slots(str(hf)) == 12
    hf.write_text("node-a gpus=8\n")
    with pytest.raises(ConfigError, match=r"hosts:1: expected 'hostname slots=N'"):
        hostfile_slots(str(hf))


# ------------------------------------------------------------------------------ global batches
@pytest.fixture(scope="module")
def synthetic_cfg(tmp_path_factory: pytest.TempPathFactory):
    cfg = build_config({"train": {"global_batch": 4, "micro_batch": 1},
                        "data": {"synthetic_clips": 16, "synthetic_shards": 4}})
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, cfg)
    return build_config({"train": {"global_batch": 4, "micro_batch": 1}, "data": {"shards": str(out)}})


def _global_batches(cfg, dp_size: int, steps: int) -> list[dict[int, tuple[str, float]]]:
    accum = grad_accum_steps(cfg, dp_size)
    feeds = [GlobalBatchFeed(cfg, r, dp_size, accum) for r in range(dp_size)]
    out = []
    for _ in range(steps):
        samples = {}
        for feed in feeds:
            for m in range(accum):
                b = feed.next(m)
                for i, idx in enumerate(b["__index__"].tolist()):
                    samples[idx] = (b["__key__"][i], float(b["video_latent"][i].double().sum()))
        out.append(samples)
    return out


def test_global_batch_does_not_depend_on_dp_size(synthetic_cfg) -> None:
    steps = 6     # more than one epoch of 16 clips at 4 per step
    one, two, four = (_global_batches(synthetic_cfg, dp, steps) for dp in (1, 2, 4))
    assert one == two == four
    assert all(len(s) == synthetic_cfg.train.global_batch for s in one)
    indices = [i for s in one for i in s]
    assert len(set(indices)) == len(indices)        # every global sample index is unique


def test_feed_resume_continues_the_stream(synthetic_cfg) -> None:
    accum = grad_accum_steps(synthetic_cfg, 2)
    feed = GlobalBatchFeed(synthetic_cfg, 1, 2, accum)
    for _ in range(3):
        for m in range(accum):
            feed.next(m)
    state = feed.state_dict()
    expected = [feed.next(m)["__key__"] for m in range(accum)]
    fresh = GlobalBatchFeed(synthetic_cfg, 1, 2, accum)
    fresh.load_state_dict(state)
    assert [fresh.next(m)["__key__"] for m in range(accum)] == expected
    other_rank = GlobalBatchFeed(synthetic_cfg, 0, 2, accum)
    with pytest.raises(ValueError, match="logical data streams"):
        other_rank.load_state_dict(state)


def test_close_stops_loader_workers_mid_read_ahead(tmp_path) -> None:
    """With worker processes and a batch being read ahead, close() leaves no worker behind and none
    failed: workers left to interpreter exit die mid-read and torch reports 'DataLoader worker exited
    unexpectedly' after every run (seen with data.workers=2); workers are forked from the main thread."""
    import multiprocessing
    import os
    import threading

    base = {"train": {"global_batch": 2, "micro_batch": 1}, "data": {"synthetic_clips": 8, "synthetic_shards": 4}}
    write_synthetic_shards(tmp_path, build_config(base))
    cfg = build_config({"train": base["train"], "data": {"shards": str(tmp_path), "workers": 2}})
    forks: list[str] = []      # the thread of every fork (workers forked from the read-ahead thread hang at exit)
    os.register_at_fork(before=lambda: forks.append(threading.current_thread().name))
    feed = GlobalBatchFeed(cfg, 0, 1, grad_accum_steps(cfg, 1), prefetch=True)
    feed.next(0)
    feed._ahead[1].result()
    assert feed._ahead is not None and multiprocessing.active_children()
    assert forks and set(forks) == {threading.main_thread().name}
    forks.clear()
    feed.close()
    assert feed._ahead is None and multiprocessing.active_children() == []


def test_prefetch_hands_out_the_same_batches_and_exact_states(synthetic_cfg) -> None:
    """The read-ahead thread changes neither the batches nor the resume state at any step boundary; a stream
    whose batch was read ahead reports its position before that batch (so a resume re-reads it)."""
    accum = grad_accum_steps(synthetic_cfg, 1)
    ahead = GlobalBatchFeed(synthetic_cfg, 0, 1, accum, prefetch=True)
    plain = GlobalBatchFeed(synthetic_cfg, 0, 1, accum, prefetch=False)
    for _ in range(3):
        for m in range(accum):
            a, p = ahead.next(m), plain.next(m)
            assert a["__key__"] == p["__key__"] and torch.equal(a["video_latent"], p["video_latent"])
        assert ahead._ahead is not None and ahead._ahead[0] == 0      # next step's first batch is being read
        assert ahead.state_dict() == plain.state_dict()
        assert ahead.stats() == plain.stats()          # skip / delivery counters as of the batches handed out
    resumed = GlobalBatchFeed(synthetic_cfg, 0, 1, accum)
    resumed.load_state_dict(ahead.state_dict())
    assert [resumed.next(m)["__key__"] for m in range(accum)] == [plain.next(m)["__key__"] for m in range(accum)]
    # out of order: the unused read ahead is stepped back, nothing is skipped
    check = GlobalBatchFeed(synthetic_cfg, 0, 1, accum, prefetch=True)
    ref = GlobalBatchFeed(synthetic_cfg, 0, 1, accum, prefetch=False)
    check.next(0)
    ref.next(0)                                  # check now reads stream 1 ahead
    assert check.next(2)["__key__"] == ref.next(2)["__key__"]
    assert check.next(1)["__key__"] == ref.next(1)["__key__"]   # stream 1's batch was not lost


# ------------------------------------------------------------------------------ metrics
def test_metric_accumulator_skips_missing_and_nan() -> None:
    acc = MetricAccumulator()
    acc.add({"loss": 2.0, "loss_video_sigma_0.00_0.50": 1.0}, tokens=10, sample_ids=[3])
    acc.add({"loss": 4.0, "loss_video_sigma_0.00_0.50": float("nan")}, tokens=6, sample_ids=[1])
    acc.add({"loss": 6.0}, tokens=4, sample_ids=[2])
    out = acc.reduce()
    assert out["loss"] == 4.0 and out["loss_video_sigma_0.00_0.50"] == 1.0
    assert out["tokens"] == 20 and out["samples"] == 3 and out["sample_ids"] == [1, 2, 3]


# ------------------------------------------------------------------------------ checkpoints
class _FakeEngine:
    """Writes/reads one file per tag the way DeepSpeed lays out a tag directory; can die mid-save."""

    def __init__(self, fail_at_tag: str = ""):
        self.fail_at_tag = fail_at_tag
        self.loaded = None
        self.checkpoint_engine = None      # DeepSpeed's; the manager wraps it in its safe loader

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest      # `latest` is ours to publish
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, path / "mp_rank_00_model_states.pt")
        if tag == self.fail_at_tag:
            raise OSError(errno.EIO, "disk died mid-save")

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        path = Path(load_dir) / tag
        self.loaded = tag
        return str(path), torch.load(path / "mp_rank_00_model_states.pt", weights_only=True)


def test_checkpoint_publish_prune_and_crash(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep_last=2, rank=0, world_size=1)
    assert mgr.load(_FakeEngine()) is None
    def rank_state(step: int) -> dict:
        return {"data": {"streams": [0], "loaders": [{"pos": step}]}}

    for step in (5, 10, 15):
        mgr.save(_FakeEngine(), step, {}, rank_state(step))
    assert mgr.tags() == [tag_for(10), tag_for(15)]
    assert (root / "latest").read_text() == tag_for(15)

    with pytest.raises(CheckpointWriteError, match="step 20 .* failed: .*disk died mid-save"):
        mgr.save(_FakeEngine(fail_at_tag=f"{TMP_PREFIX}{tag_for(20)}"), 20, {}, rank_state(20))
    assert (root / f"{TMP_PREFIX}{tag_for(20)}").is_dir()
    assert (root / "latest").read_text() == tag_for(15)

    engine = _FakeEngine()
    resumed = CheckpointManager(root, keep_last=2, rank=0, world_size=1).load(engine)
    assert resumed is not None and resumed.step == 15 and engine.loaded == tag_for(15)
    assert resumed.rank_state == rank_state(15)
    assert not (root / f"{TMP_PREFIX}{tag_for(20)}").exists()   # the interrupted save is cleaned up
    # another world size is resharded (training/elastic.py; tests/test_reliability_distributed.py)


# ------------------------------------------------------------------------------ launch scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_is_valid_bash_and_python(script: str) -> None:
    path = REPO / script
    compile(path.read_text(), str(path), "exec")            # what DeepSpeed's launcher runs on each rank
    subprocess.run(["bash", "-n", str(path)], check=True)   # what `bash launch/...` runs
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, check=True)
    assert "--nproc" in out.stdout and "--hostfile" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "train.global_batch=3"], "train.global_batch: 3 is not divisible"),
    (["--set", "parallel.sp=4", "--nproc", "2"], "parallel.sp"),
    (["--set", "data.shards=/nonexistent/shards"], "data.shards: /nonexistent/shards"),
    (["--set", "train.stepz=3"], "train.stepz: unknown key (did you mean train.steps?)"),
    (["--set", "train.init_from=/nonexistent/run"], "train.init_from: /nonexistent/run does not exist"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_launch_fails_before_spawning(args: list[str], message: str) -> None:
    out = subprocess.run(["bash", str(REPO / "launch/train_dualforce.sh"), *args], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2
    assert message in out.stderr
    assert "deepspeed.launcher" not in out.stdout + out.stderr     # no rank was started


def test_script_defaults_under_a_launcher() -> None:
    args = script_args(2, ["--nproc", "8", "--set", "train.steps=3", "--local_rank=1"], has_gpu=False)
    assert args[:2] == ["--set", "train.phase=2"]
    assert args[2:4] == ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")]
    assert "--nproc" not in args and "8" not in args and args[-1] == "--local_rank=1"
    gpu = script_args(4, ["--config", "my.yaml"], has_gpu=True)
    assert gpu == ["--set", "train.phase=4", "--config", "my.yaml"]
    assert script_args(4, [], has_gpu=True)[3].endswith("launch/configs/phase4.yaml")


# ------------------------------------------------------------------------------ throughput accounting
@pytest.mark.parametrize("on", [False, True])
def test_trainer_model_follows_activation_checkpointing(on: bool) -> None:
    """The trainer's preparation (parallel.parallelize) marks every block, or none, as the config says."""
    from dualforce_mega.parallel.parallelize import parallelize

    cfg = build_config({}, [f"train.activation_checkpointing={str(on).lower()}"])
    model = build_model(cfg)
    assert not any(b.activation_checkpointing for _, _, b in model.transformer_blocks())   # not before
    parallelize(model, cfg, torch.device("cpu"), torch.float32)
    assert model.gradient_checkpointing is on
    assert all(b.activation_checkpointing is on for _, _, b in model.transformer_blocks())


def test_flops_and_tokens_follow_the_batch_shapes() -> None:
    cfg = build_config({})
    m = cfg.model
    frames, h, w = 3, 8, 6
    n = 1 + m.vae_temporal_stride * (frames - 1)
    video = {"video_latent": torch.zeros(2, m.in_channels, frames, h, w)}
    full = dict(video, struct=torch.zeros(2, n, m.motion_dim), audio=torch.zeros(2, 2 * n, m.audio_dim))
    expected = forward_flops(m, 1, frames, (h, w), with_struct=True, with_audio=True).training
    assert sample_training_flops(cfg, full) == expected
    assert sample_training_flops(cfg, video) < expected            # phase-2 inputs: video tower only
    patches = frames * (h // m.patch_size[1]) * (w // m.patch_size[2])
    assert tokens_in(video, m.patch_size) == 2 * patches
    assert tokens_in(full, m.patch_size) == 2 * (patches + n)


@pytest.mark.parametrize("visible, world", [("", 3), ("0,2", 2)])
def test_launch_counts_gpus(tmp_path: Path, visible: str, world: int) -> None:
    """With GPUs, ranks = CUDA_VISIBLE_DEVICES entries, else every GPU nvidia-smi lists (a stub here);
    shown through the preflight error, which names the data-parallel size, before anything starts."""
    stub = tmp_path / "nvidia-smi"
    stub.write_text("#!/bin/sh\nfor i in 0 1 2; do echo \"GPU $i: Stub (UUID: GPU-$i)\"; done\n")
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = visible
    out = subprocess.run(["bash", str(REPO / "launch/train_dualforce.sh"), "--set", "train.global_batch=5"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2
    assert f"train.micro_batch x data-parallel size = 1 x {world} = {world}" in out.stderr
