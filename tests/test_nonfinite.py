"""Non-finite data and steps (issue 15 probe: "one shard with NaN latents, or one Inf audio value"): the loader
skips and counts such samples; the step guard turns a non-finite loss into gradients that make every rank
skip the update, counts skipped steps and stops after ``train.nonfinite_limit`` consecutive ones.
End-to-end runs are in ``tests/test_reliability_distributed.py``."""
from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from dualforce_mega.config import build_config, model_preset
from dualforce_mega.data.loader import build_loader
from dualforce_mega.data.schema import CRC_META_KEY
from dualforce_mega.data.synthetic_shards import synthetic_key, write_shards
from dualforce_mega.training.exit_codes import NonFiniteLimit
from dualforce_mega.training.nonfinite import NonFiniteGuard

SHARDS, PER_SHARD, FRAMES, HW = 4, 3, 5, (4, 4)


def poison(shard_dir: Path, key: str, field: str, value: float) -> None:
    """Put ``value`` into one element of ``field`` of sample ``key`` and re-sign it (CRC of the new bytes):
    a sample that was written non-finite by an upstream bug, not one damaged in storage."""
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        if not any(m.name == f"{key}.safetensors" for m, _ in members):
            continue
        out = []
        tensors = st_load(next(d for m, d in members if m.name == f"{key}.safetensors"))
        t = tensors[field].clone()
        t.view(-1)[t.numel() // 2] = value
        tensors[field] = t
        blob = st_save(tensors)
        for m, data in members:
            if m.name == f"{key}.safetensors":
                data = blob
            elif m.name == f"{key}.json":
                meta = json.loads(data)
                meta[CRC_META_KEY] = zlib.crc32(blob)
                data = json.dumps(meta, sort_keys=True).encode()
            m.size = len(data)
            out.append((m, data))
        with tarfile.open(shard, "w") as tar:
            for m, data in out:
                tar.addfile(m, io.BytesIO(data))
        return
    raise AssertionError(f"{key} not found in {shard_dir}")


def _epoch_keys(shard_dir: Path) -> tuple[list[str], dict[str, int]]:
    cfg = build_config({}, [f"data.shards={shard_dir}", "data.window=3", "data.shuffle_buffer=4", "data.workers=0",
                            "train.micro_batch=1"])
    loader = build_loader(cfg, 0, 1)
    seen = []
    while True:
        batch = next(loader)
        if loader.stats.get("epochs_started", 0) > 1:
            return seen, loader.stats
        seen += batch["__key__"]


def test_loader_skips_and_counts_non_finite_samples(tmp_path: Path, caplog) -> None:
    write_shards(tmp_path, model_preset("tiny"), clips=SHARDS * PER_SHARD, frames=FRAMES, latent_hw=HW, seed=0,
                 shards=SHARDS)
    clean, clean_stats = _epoch_keys(tmp_path)
    nan_key, inf_key = synthetic_key(0, 1), synthetic_key(0, 7)
    poison(tmp_path, nan_key, "video_latent", float("nan"))
    poison(tmp_path, inf_key, "audio", float("inf"))
    seen, stats = _epoch_keys(tmp_path)
    assert sorted(seen) == sorted(k for k in clean if k not in (nan_key, inf_key))
    # the snapshot is taken at the first batch of epoch 2, which may have met a poisoned sample again
    assert stats["nonfinite_samples"] >= 2 and clean_stats["nonfinite_samples"] == 0
    assert stats["corrupt_samples"] == 0          # re-signed: the CRC matches, only the values are bad
    assert f"{nan_key}: video_latent contains NaN or Inf" in caplog.text
    assert f"{inf_key}: audio contains NaN or Inf" in caplog.text


def test_all_samples_non_finite_is_one_clear_error(tmp_path: Path) -> None:
    """The probe's "NaN in every shard" ended in ``KeyError: 'loss'``: now the loader says what is wrong."""
    write_shards(tmp_path, model_preset("tiny"), clips=4, frames=FRAMES, latent_hw=HW, seed=0, shards=1)
    for i in range(4):
        poison(tmp_path, synthetic_key(0, i), "video_latent", float("nan"))
    cfg = build_config({}, [f"data.shards={tmp_path}", "data.window=3", "data.workers=0", "train.micro_batch=1"])
    with pytest.raises(ValueError, match="no batch: all samples corrupt, non-finite or too short"):
        next(build_loader(cfg, 0, 1))


# ------------------------------------------------------------------ the step guard (one process)
def test_non_finite_loss_poisons_every_gradient_it_reaches() -> None:
    """An infinite MSE can have finite gradients; after the guard they are NaN, so DeepSpeed's
    gradient-norm check (all-reduced) skips the update on every rank."""
    guard = NonFiniteGuard(limit=3, update_skips=True)
    w = torch.nn.Parameter(torch.ones(3))
    x = torch.tensor([1.0, 2.0, 3.0])
    loss = (w * x).sum() + torch.log(torch.zeros(()))     # -inf, yet d loss / d w = x is finite
    assert not torch.isfinite(loss)
    loss.backward(retain_graph=True)
    assert torch.isfinite(w.grad).all()                    # what would reach the optimizer without the guard
    w.grad = None
    guard.loss_for_backward(loss, ["a"]).backward()
    assert torch.isnan(w.grad).all()
    w.grad = None
    finite = (w * torch.tensor([1.0, 2.0, 3.0])).sum()
    out = guard.loss_for_backward(finite, ["b"])
    assert torch.equal(out, finite)
    out.backward()
    assert torch.equal(w.grad, torch.tensor([1.0, 2.0, 3.0]))   # untouched (x 1.0 is exact)


def test_skipped_steps_are_counted_and_a_run_of_them_stops_training() -> None:
    guard = NonFiniteGuard(limit=3, update_skips=True, total=4)
    nan = torch.tensor(float("nan"))
    guard.loss_for_backward(torch.tensor(1.0), ["ok"])
    assert guard.after_update(0, applied=True) is None
    guard.loss_for_backward(nan, ["bad_0"])
    guard.loss_for_backward(torch.tensor(1.0), ["fine_0"])
    assert guard.after_update(1, applied=False) == ["bad_0"]
    assert guard.after_update(2, applied=False) == []          # gradient norm only: no sample to blame
    guard.loss_for_backward(torch.tensor(1.0), ["ok"])
    assert guard.after_update(3, applied=True) is None          # a good step resets the run of bad ones
    assert (guard.total, guard.consecutive) == (6, 0)
    for step in (4, 5):
        guard.loss_for_backward(nan, [f"bad_{step}"])
        guard.after_update(step, applied=False)
        guard.check_limit(step + 1)                              # 1, then 2 consecutive: go on
    guard.loss_for_backward(nan, ["bad_6"])
    guard.after_update(6, applied=False)
    with pytest.raises(NonFiniteLimit, match=r"3 consecutive steps \(5\.\.7\).*bad_6.*after step 4") as err:
        guard.check_limit(7)
    assert err.value.exit_code == 3 and guard.total == 9


def test_without_a_skipping_optimizer_the_first_bad_step_stops() -> None:
    guard = NonFiniteGuard(limit=10, update_skips=False)
    guard.loss_for_backward(torch.tensor(2.0), ["ok"])
    assert guard.after_update(0, applied=True) is None
    guard.loss_for_backward(torch.tensor(float("inf")), ["bad"])
    assert guard.after_update(1, applied=True) == ["bad"]
    with pytest.raises(NonFiniteLimit, match="bad"):
        guard.check_limit(2)
