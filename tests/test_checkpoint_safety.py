"""Checkpoint failure modes of issue 15's probe, on the real ``CheckpointManager`` with a stand-in engine that
writes and reads through torch's own serializer (so the errors are the ones a DeepSpeed save / load
meets): a truncated checkpoint is named and the previous one is used; a malicious pickle never runs,
also through DeepSpeed's loader (``SafeCheckpointEngine``); a full disk is reported as such and the
previous checkpoint stays the one to resume from."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dualforce_mega.training.checkpoint import BROKEN_PREFIX, CheckpointManager, SafeCheckpointEngine, tag_for
from dualforce_mega.training.exit_codes import CheckpointWriteError
from dualforce_mega.training.safe_load import UnsafeCheckpointError

MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class StandInEngine:
    """``save_checkpoint`` / ``load_checkpoint`` as DeepSpeed calls them; files through torch.save and the
    engine's ``checkpoint_engine.load`` (what the manager makes safe)."""

    def __init__(self, numel: int = 64):
        self.checkpoint_engine = object()      # DeepSpeed's TorchCheckpointEngine in a real run
        self.numel = numel
        self.loaded: list[tuple[str, float]] = []

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": torch.full((self.numel,), float(client_state["step"])), **client_state},
                   Path(root) / tag / MODEL_FILE)

    def load_checkpoint(self, root: str, tag: str, **_) -> tuple[str, dict]:
        sd = self.checkpoint_engine.load(str(Path(root) / tag / MODEL_FILE), map_location="cpu")
        self.loaded.append((tag, float(sd["module"][0])))
        return root, {"step": sd["step"], "world_size": sd["world_size"]}


def _rank_state() -> dict:
    return {"data": {"streams": [0], "loaders": [{"position": 3}]}, "rng": {}}


def _saved(root: Path, steps: list[int], engine: StandInEngine) -> CheckpointManager:
    mgr = CheckpointManager(root, keep_last=len(steps), rank=0, world_size=1)
    for step in steps:
        mgr.save(engine, step, client_state={}, rank_state=_rank_state())
    return mgr


class Payload:
    """Unpickling this runs code (creates a marker file): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_truncated_checkpoint_is_named_and_the_previous_one_is_used(tmp_path: Path, caplog) -> None:
    engine = StandInEngine()
    mgr = _saved(tmp_path / "checkpoints", [5, 10], engine)
    damaged = tmp_path / "checkpoints" / tag_for(10) / MODEL_FILE
    damaged.write_bytes(damaged.read_bytes()[:200])          # a save cut short (node lost mid-write)
    resumed = mgr.load(engine)
    assert resumed.step == 5 and engine.loaded == [(tag_for(5), 5.0)]
    assert resumed.rank_state["data"] == {"streams": [0], "loaders": [{"position": 3}]}
    assert str(damaged) in caplog.text and "falling back to the previous one" in caplog.text
    assert (tmp_path / "checkpoints" / f"{BROKEN_PREFIX}{tag_for(10)}").is_dir()   # kept for inspection
    assert mgr.tags() == [tag_for(5)]
    # the next save of step 10 (after the resumed run got there again) is published normally
    mgr.save(engine, 10, client_state={}, rank_state=_rank_state())
    assert mgr.candidates()[0] == tag_for(10)


def test_no_usable_checkpoint_is_an_error_naming_the_files(tmp_path: Path) -> None:
    engine = StandInEngine()
    mgr = _saved(tmp_path / "checkpoints", [5], engine)
    (tmp_path / "checkpoints" / tag_for(5) / MODEL_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=f"no usable checkpoint.*{tag_for(5)}.*{MODEL_FILE}"):
        mgr.load(engine)


def test_malicious_pickle_in_a_checkpoint_never_runs(tmp_path: Path) -> None:
    engine = StandInEngine()
    mgr = _saved(tmp_path / "checkpoints", [5, 10], engine)
    marker = tmp_path / "pwned"
    target = tmp_path / "checkpoints" / tag_for(10) / MODEL_FILE
    torch.save({"module": torch.zeros(3), "step": 10, "world_size": 1, "x": Payload(marker)}, target)
    with pytest.raises(UnsafeCheckpointError, match=f"{target}: refused.*Unsupported global: GLOBAL"):
        mgr.load(engine)
    assert not marker.exists() and engine.loaded == []
    # DeepSpeed's own reads go through the same safe path (the check above reads before DeepSpeed does)
    with pytest.raises(UnsafeCheckpointError, match="Unsupported global: GLOBAL"):
        SafeCheckpointEngine(object()).load(str(target))
    assert not marker.exists()


def test_deepspeed_classes_load_through_the_safe_engine(tmp_path: Path) -> None:
    """What DeepSpeed pickles into its own files (the ZeRO stage enum, the loss scaler) still loads."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim.pt"
    torch.save({"zero_stage": ZeroStageEnum(3), "loss_scaler": LossScaler(1.0), "t": torch.ones(2)}, path)
    sd = SafeCheckpointEngine(object()).load(str(path), map_location="cpu")
    assert sd["zero_stage"] == ZeroStageEnum.weights and isinstance(sd["loss_scaler"], LossScaler)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: a real full disk (needs root / CAP_SYS_ADMIN, as in the project's CI containers)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    engine = StandInEngine(numel=300_000)                     # 1.2 MB per checkpoint
    mgr = _saved(small_disk / "checkpoints", [5, 10], engine)
    filler = small_disk / "other_job_output"
    with open(filler, "wb") as f:                             # someone else fills the disk
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 100_000))
    with pytest.raises(CheckpointWriteError) as err:
        mgr.save(engine, 15, client_state={}, rank_state=_rank_state())
    message = str(err.value)
    assert "writing checkpoint step 15" in message and "the disk is full" in message
    assert f"checkpoint {tag_for(10)} is intact" in message and "\n" not in message
    assert err.value.exit_code == 5
    assert (small_disk / "checkpoints" / "latest").read_text() == tag_for(10)
    os.unlink(filler)
    assert mgr.load(engine).step == 10                        # and the run resumes from it
