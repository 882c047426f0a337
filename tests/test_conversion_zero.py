"""ZeRO checkpoint -> safetensors conversion is lossless.

One module fixture trains the tiny preset for 3 steps with the real trainer (ZeRO-3, 2 ranks, gloo),
then a second 2-rank job (this file run as a script) rebuilds the trainer's engine from the run
directory, loads the checkpoint and records its full (gathered) parameters and forward outputs; it also
writes ZeRO-1/2/3 checkpoints with frozen parameters. The tests convert in a single process.

Lossless is a property of the code, so it is asserted bit for bit: every converted tensor ``torch.equal``
to DeepSpeed's own ``zero_to_fp32`` reconstruction and to the engine's live parameter
(``test_one_ulp_change_fails_the_checks`` shows one flipped ulp fails both). The forward outputs are a
computation done in another process: same weights and inputs, but which CPU kernels run (and how they
block their float sums) depends on the machine, so they are compared to FORWARD_RTOL.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 3
WORLD = 2
EXTRA = {"zero1_frozen": 1, "zero2_frozen": 2, "zero3_frozen": 3}   # extra engines: name -> ZeRO stage
OUTPUT_FIELDS = ("video", "struct", "flame", "lip_struct", "lip_audio")
# Forward of identical fp32 weights in two processes at different thread counts (the ranks run one
# thread, the test process its default): the kernels' summation order differs with the CPU and the
# threads. Measured on MKL's AVX2 path (conftest): up to 3.6e-7 of the largest output; a wrong weight,
# config or layer mapping changes the outputs by far more than 1e-5 of it.
FORWARD_RTOL = 1e-5


def train_overrides(run_dir: Path) -> list[str]:
    return [f"run.dir={run_dir}", f"train.steps={TRAIN_STEPS}", f"train.save_every={TRAIN_STEPS}",
            f"train.global_batch={WORLD}", "train.micro_batch=1", "parallel.zero_stage=3", "run.tensorboard=false",
            "data.synthetic_clips=8", "data.synthetic_shards=2", "train.precision=fp32"]


def fixed_inputs(model_cfg) -> dict:
    from model_utils import random_inputs
    return random_inputs(model_cfg, batch=2, frames=3, hw=(4, 4), seed=123)


def forward(module, model_cfg) -> dict[str, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        out = module(**fixed_inputs(model_cfg), return_aux=True)
    return {k: getattr(out, k).detach().clone() for k in OUTPUT_FIELDS}


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """The engine's live parameters, gathered from their ZeRO-3 partitions (collective: every rank calls it)."""
    import deepspeed

    named = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values())):   # a no-op below stage 3
        return {n: p.detach().clone() for n, p in named.items()}


# --------------------------------------------------------------------------------------
# the 2-rank engine job (run by torchrun with this file as the script)
# --------------------------------------------------------------------------------------
def _engine_job(run_dir: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    from dualforce_mega.config import load_config
    from dualforce_mega.parallel.deepspeed_config import build_deepspeed_config, build_optimizer
    from dualforce_mega.parallel.groups import init_groups
    from dualforce_mega.summary import count_parameters
    from dualforce_mega.training.trainer import Trainer, build_model
    from model_utils import random_inputs, randomize_heads

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(str(run_dir / "config.yaml"))
    trainer = Trainer(cfg, init_groups(cfg.parallel.sp), torch.device("cpu"), rank, world)
    resumed = trainer.checkpoints.load(trainer.engine)
    assert resumed is not None and resumed.step == TRAIN_STEPS
    outputs = {"trainer_zero3": forward(trainer.engine, cfg.model)}
    params = {"trainer_zero3": full_parameters(trainer.engine)}
    counts = {}
    for name, stage in EXTRA.items():
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=stage))
        model = build_model(c)
        randomize_heads(model)          # gradients reach every trainable parameter
        for p in model.video.patch_embedding.parameters():
            p.requires_grad_(False)     # frozen parameters take a separate path in ZeRO checkpoints
        ds_config = build_deepspeed_config(c, world, "cpu")
        if stage == 3:   # partition even the tiny model's small parameters (kept whole below 1e5 elements)
            ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                          optimizer=build_optimizer(model, c.train, torch.device("cpu")),
                                          dist_init_required=False)
        if stage == 3:   # what count_parameters sees of a partitioned model: empty placeholders + ds_numel
            counts = {"placeholders": sum(p.numel() == 0 for p in engine.module.parameters()),
                      "counts": count_parameters(engine.module.named_parameters())}
        for step in range(2):
            out = engine(**random_inputs(c.model, batch=1, frames=3, hw=(4, 4), seed=10 * step + rank),
                         return_aux=True)
            engine.backward(out.video.pow(2).mean() + out.struct.pow(2).mean())
            engine.step()
        engine.save_checkpoint(str(run_dir / name), tag="final")
        outputs[name] = forward(engine, c.model)
        params[name] = full_parameters(engine)
    if rank == 0:
        torch.save(outputs, run_dir / "engine_outputs.pt")
        torch.save(params, run_dir / "engine_parameters.pt")
        (run_dir / "engine_counts.json").write_text(json.dumps(counts))
    dist.barrier()


# --------------------------------------------------------------------------------------
# fixture
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str]) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           f"--master_port={_free_port()}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("conversion") / "run"
    _torchrun(["-m", "dualforce_mega.training.train", *[f"--set={s}" for s in train_overrides(run)]])
    _torchrun([__file__, str(run)])
    return run


@pytest.fixture(scope="module")
def engine_outputs(run_dir) -> dict:
    return torch.load(run_dir / "engine_outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def engine_parameters(run_dir) -> dict:
    return torch.load(run_dir / "engine_parameters.pt", weights_only=True)


def deepspeed_reconstruction(ds_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)


def assert_identical(ours: dict, ref: dict, what: str, allow_extra: tuple = ()) -> None:
    """Same names (``ours`` may hold ``allow_extra`` more), and every tensor bit for bit equal."""
    assert set(ours) - set(ref) <= set(allow_extra) and set(ref) <= set(ours), \
        f"names differ from {what}: {sorted(set(ours) ^ set(ref))[:5]}"
    bad = [k for k in ref if not torch.equal(ours[k], ref[k].contiguous())]
    assert not bad, f"tensors differ from {what}: {bad[:5]}"


def assert_lossless(converted: dict, ds_dir: Path, tag: str, engine_params: dict, frozen: tuple = ()) -> None:
    # DeepSpeed's reconstruction drops frozen parameters of ZeRO-1 checkpoints; we take them from the
    # full module state dict that stage 1/2 checkpoints hold (the engine comparison checks their values)
    assert_identical(converted, deepspeed_reconstruction(ds_dir, tag), "zero_to_fp32", allow_extra=frozen)
    assert_identical(converted, engine_params, "the engine's parameters")


def assert_forward_close(got: dict, ref: dict) -> None:
    for k in OUTPUT_FIELDS:
        scale = ref[k].abs().max().item()
        diff = (got[k] - ref[k]).abs().max().item()
        assert scale > 0 and diff <= FORWARD_RTOL * scale, f"{k}: max abs diff {diff:.3e} (outputs up to {scale:.3e})"


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
def test_trainer_zero3_checkpoint_converts_losslessly(run_dir, engine_outputs, engine_parameters, tmp_path):
    """Must-show: every converted tensor == DeepSpeed's zero_to_fp32 reconstruction and == the ZeRO-3
    engine's gathered parameter, bit for bit; the loaded bundle's forward matches the engine's."""
    from checkpoints_conv.zero_to_safetensors import main as convert_main
    from dualforce_mega.bundle import load_bundle, read_state_dict
    from dualforce_mega.models import DualForceModel

    out = tmp_path / "converted"
    assert convert_main([str(run_dir), str(out)]) == 0
    model, cfg, _ = load_bundle(out)
    assert set(model.state_dict()) == set(DualForceModel(cfg.model).state_dict())
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert_lossless(read_state_dict(out), run_dir / "checkpoints", tag, engine_parameters["trainer_zero3"])
    assert_forward_close(forward(model, cfg.model), engine_outputs["trainer_zero3"])
    assert json.loads((out / "config.json").read_text())["model"] == cfg.to_dict()["model"]


def test_parameter_counts_of_a_zero3_partitioned_model(run_dir):
    """summary.count_parameters sizes ZeRO-3's empty placeholders by ds_numel: the partitioned engine's
    counts equal those of the unpartitioned model (with the same frozen patch embedding)."""
    from dualforce_mega.config import load_config
    from dualforce_mega.models import DualForceModel
    from dualforce_mega.summary import count_parameters

    engine = json.loads((run_dir / "engine_counts.json").read_text())
    model = DualForceModel(load_config(str(run_dir / "config.yaml")).model)
    for p in model.video.patch_embedding.parameters():
        p.requires_grad_(False)
    assert engine["placeholders"] == len(list(model.parameters()))
    assert engine["counts"] == count_parameters(model.named_parameters())


def test_one_ulp_change_fails_the_checks(run_dir, engine_parameters, tmp_path):
    """The lossless checks have teeth: one element of one converted tensor moved by one ulp fails both."""
    from checkpoints_conv.zero_to_safetensors import convert
    from dualforce_mega.bundle import read_state_dict

    convert(run_dir, tmp_path / "converted")
    converted = read_state_dict(tmp_path / "converted")
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert_lossless(converted, run_dir / "checkpoints", tag, engine_parameters["trainer_zero3"])
    name = "video.blocks.0.self_attn.q.weight"
    flat = converted[name].view(-1)
    flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf")))
    with pytest.raises(AssertionError, match=rf"differ from zero_to_fp32: \['{name}'\]"):
        assert_identical(converted, deepspeed_reconstruction(run_dir / "checkpoints", tag), "zero_to_fp32")
    with pytest.raises(AssertionError, match=rf"differ from the engine's parameters: \['{name}'\]"):
        assert_identical(converted, engine_parameters["trainer_zero3"], "the engine's parameters")


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_zero2_and_frozen_parameters(run_dir, engine_outputs, engine_parameters, tmp_path, name):
    from checkpoints_conv.zero_to_safetensors import convert
    from dualforce_mega.bundle import load_bundle, read_state_dict

    res = convert(run_dir / name, tmp_path / name, config=run_dir / "config.yaml")
    assert res.stage == EXTRA[name] and res.world_size == WORLD
    frozen = ("video.patch_embedding.weight", "video.patch_embedding.bias") if EXTRA[name] == 1 else ()
    assert_lossless(read_state_dict(tmp_path / name), run_dir / name, "final", engine_parameters[name], frozen)
    model, cfg, _ = load_bundle(tmp_path / name)
    assert_forward_close(forward(model, cfg.model), engine_outputs[name])


def test_sharding_bf16_and_diff(run_dir, tmp_path):
    from checkpoints_conv.diff import diff_checkpoints
    from checkpoints_conv.diff import main as diff_main
    from checkpoints_conv.zero_to_safetensors import convert
    from dualforce_mega.bundle import INDEX_NAME, read_state_dict, weight_files

    whole = convert(run_dir, tmp_path / "whole")
    sharded = convert(run_dir, tmp_path / "sharded", max_shard_size="400KB")
    assert len(whole.files) == 1 and len(sharded.files) > 2
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in sharded.files}
    assert all(p.stat().st_size <= 400_000 + 64 * 1024 for p in sharded.files[:-1])  # limit + header slack
    assert set(weight_files(tmp_path / "sharded")) == set(weight_files(tmp_path / "whole"))
    assert diff_checkpoints(tmp_path / "whole", tmp_path / "sharded").equal
    assert diff_checkpoints(run_dir, tmp_path / "sharded").equal          # ZeRO directory read directly
    assert diff_main([str(tmp_path / "whole"), str(tmp_path / "sharded"), "--json"]) == 0

    convert(run_dir, tmp_path / "bf16", dtype="bf16")
    fp32, bf16 = read_state_dict(tmp_path / "whole"), read_state_dict(tmp_path / "bf16")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].bfloat16()) for k in fp32)
    r = diff_checkpoints(tmp_path / "whole", tmp_path / "bf16")
    assert not r.equal and len(r.dtype_mismatch) == len(fp32) and 0 < r.max_abs_overall < 1e-1
    assert diff_checkpoints(tmp_path / "whole", tmp_path / "bf16", atol=r.max_abs_overall).equal
    assert diff_main([str(tmp_path / "whole"), str(tmp_path / "bf16")]) == 1


def test_diff_reports_missing_extra_and_shape(tmp_path):
    from safetensors.torch import save_file

    from checkpoints_conv.diff import diff_checkpoints
    a = {"x": torch.zeros(3), "y": torch.ones(2, 2), "only_a": torch.zeros(1)}
    b = {"x": torch.tensor([0.0, 0.5, 0.0]), "y": torch.ones(4), "only_b": torch.zeros(1)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    r = diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.missing == ["only_a"] and r.extra == ["only_b"]
    assert r.shape_mismatch == {"y": [[2, 2], [4]]} and r.max_abs == {"x": 0.5} and r.over_atol == ["x"]


def test_export_bundle(run_dir, tmp_path):
    from checkpoints_conv.export_bundle import main as export_main
    from dualforce_mega.bundle import BundleError, load_bundle

    out = tmp_path / "bundle"
    assert export_main([str(run_dir), str(out)]) == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["step"] == TRAIN_STEPS and manifest["ema"] is False and "ema_decay=0" in manifest["ema_note"]
    shards_index = json.loads((run_dir / "synthetic_shards" / "index.json").read_text())
    model, cfg, stats = load_bundle(out, "cpu", torch.float32)
    assert stats == shards_index["stats"] and stats
    assert cfg.to_dict() == json.loads((out / "config.json").read_text())
    with pytest.raises(BundleError, match="no EMA"):
        load_bundle(out, weights="ema")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main([str(run_dir), str(out)])
    bf16, _, _ = load_bundle(out, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_export_bundle_carries_ema_when_the_run_has_one(run_dir, tmp_path):
    """The trainer's EMA files (checkpoints/<tag>/ema/rank_<r>.safetensors, ZeRO-3 pieces of 2 ranks) ->
    reassembled into the bundle's ema/ -> load_bundle prefers it."""
    import shutil

    from checkpoints_conv.export_bundle import export_bundle
    from dualforce_mega.bundle import load_bundle, read_state_dict
    from dualforce_mega.training.ema import partition, save_rank_file

    run = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", run / "checkpoints")
    shutil.copy(run_dir / "config.yaml", run / "config.yaml")
    tag = (run / "checkpoints" / "latest").read_text().strip()
    raw = read_state_dict(export_bundle(run, tmp_path / "plain"))
    ema = {k: v * 0.5 for k, v in raw.items()}
    shapes = {k: tuple(v.shape) for k, v in ema.items()}
    for rank in range(2):
        save_rank_file(run / "checkpoints" / tag, rank, 2, 0.5,
                       {k: partition(v.flatten(), rank, 2) for k, v in ema.items()}, shapes)
    out = export_bundle(run, tmp_path / "with_ema", max_shard_size="300KB")
    assert json.loads((out / "bundle.json").read_text())["ema"] is True
    auto, _, _ = load_bundle(out)
    model, _, _ = load_bundle(out, weights="model")
    assert all(torch.equal(v, ema[k]) for k, v in auto.state_dict().items())
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def test_incomplete_checkpoint_is_refused(run_dir, tmp_path):
    import shutil

    from dualforce_mega.training.zero_reader import ZeroCheckpointError
    from checkpoints_conv.zero_to_safetensors import convert
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "zero2_frozen", broken)   # outside any run directory: no config.yaml
    with pytest.raises(ZeroCheckpointError, match="no config.yaml"):
        convert(broken, tmp_path / "out")
    next((broken / "final").glob("*rank_1*optim_states.pt")).unlink()
    with pytest.raises(ZeroCheckpointError, match=r"written by 2 ranks but holds 1"):
        convert(broken, tmp_path / "out", config=run_dir / "config.yaml")
    assert not any(tmp_path.glob("out/*.safetensors"))   # nothing half-written


if __name__ == "__main__":
    _engine_job(Path(sys.argv[1]))
