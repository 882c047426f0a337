"""Loading checkpoints never unpickles arbitrary objects."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from dualforce_mega.training.safe_load import InertObject, UnsafeCheckpointError, safe_torch_load
from checkpoints_conv.zero_to_safetensors import convert


class _Payload:
    """Unpickling this runs ``os.system`` — what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_file(path, marker) -> None:
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "evil": _Payload(str(marker))}, path)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    _malicious_file(bad, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"bad\.pt: refused to load.*system"):
        safe_torch_load(bad)
    assert not marker.exists()
    # sanity: the file really is malicious when unpickled without the weights-only guard
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_converter_refuses_malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    tag = tmp_path / "ckpt" / "step1"
    tag.mkdir(parents=True)
    _malicious_file(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tmp_path / "ckpt" / "latest").write_text("step1")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("model: {preset: tiny}\n")
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_model_states.pt"):
        convert(tmp_path / "ckpt", tmp_path / "out", config=cfg)
    assert not marker.exists()


def test_deepspeed_objects_load_as_inert_records(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(2.0),
                                         "fp32_flat_groups": [torch.arange(4.0)]}}, path)
    state = safe_torch_load(path, mmap=True)["optimizer_state_dict"]
    stage, scaler = state["zero_stage"], state["loss_scaler"]
    assert isinstance(stage, InertObject) and stage.args == (3,)
    assert stage.qualified_name == "deepspeed.runtime.zero.config.ZeroStageEnum"
    assert isinstance(scaler, InertObject) and not isinstance(scaler, LossScaler)
    assert scaler.state["cur_scale"] == 2.0
    assert torch.equal(state["fp32_flat_groups"][0], torch.arange(4.0))


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    with open(path, "wb") as f:
        pickle.dump({"obj": _Payload(str(tmp_path / "pwned"))}, f)
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(path)
    assert not (tmp_path / "pwned").exists()
