"""Parameter summary: the component split partitions the model, matches a real instantiation, and
matches a closed-form count derived from the config dimensions."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dualforce_mega.config import ModelConfig, build_config, model_preset
from dualforce_mega.models import DualForceModel
from dualforce_mega.summary import COMPONENTS, build_meta_model, classify_parameter, count_parameters, main


def _linear(i: int, o: int) -> int:
    return i * o + o


def _attention(d: int, qk_norm: bool) -> int:
    return 4 * _linear(d, d) + (2 * d if qk_norm else 0)


def closed_form(m: ModelConfig) -> dict[str, int]:
    """Expected counts from the architecture (DESIGN §3), written independently of the model code."""
    d, ln = m.dim, 2 * m.dim                                  # an affine LayerNorm has weight + bias
    attn = _attention(d, m.qk_norm)
    ffn = _linear(d, m.ffn_dim) + _linear(m.ffn_dim, d)
    towers = 2 if m.struct_tower else 1
    audio_layers = m.audio_layers if m.audio else 0
    per_tower_adaln = (_linear(m.freq_dim, d) + _linear(d, d)      # sigma embedding MLP
                       + _linear(d, 6 * d)                          # projection to 6 modulation vectors
                       + m.layers * 6 * d + 2 * d)                  # per-block (1,6,d) and head (1,2,d) tables
    audio_per_tower = ((_linear(m.audio_dim, d) + _linear(d, d) + ln) if m.audio else 0) \
        + audio_layers * (ln + attn + 1)                            # norm, attention, tanh gate
    patch = m.in_channels * math.prod(m.patch_size) * d + d
    out = {
        "video_tower": patch + m.layers * (attn + ffn) + _linear(d, m.out_channels * math.prod(m.patch_size)),
        "struct_tower": 0, "bridge": 0, "aux_heads": 0,
        "audio": towers * audio_per_tower,
        "adaln": towers * per_tower_adaln,
        "text": (_linear(m.text_dim, d) + _linear(d, d) + m.layers * (ln + attn)) if m.text_dim else 0,
    }
    if m.struct_tower:
        out["struct_tower"] = (_linear(m.motion_dim, d) + _linear(d, d)        # motion tokenizer
                               + m.layers * (attn + ffn) + _linear(d, m.motion_dim))
        out["adaln"] += _linear(m.kp_dim, d) + _linear(d, d)                  # canonical keypoint embedding
        directions = 2 if m.bridge == "bidirectional" else 1
        out["bridge"] = m.fusion_depth * (2 * ln + directions * attn)
        lip = m.lipsync_dim
        out["aux_heads"] = (_linear(m.motion_dim, m.flame_dim) + _linear(m.kp_dim, lip) + _linear(lip, lip)
                            + _linear(m.audio_dim, lip) + _linear(lip, lip))
    out["total_trainable"] = sum(out.values())
    return out


def _meta_model(cfg: ModelConfig) -> DualForceModel:
    with torch.device("meta"):
        return DualForceModel(cfg)


@pytest.mark.parametrize("preset", ["tiny", "lite", "wan1.3b"])
def test_components_partition_the_total(preset: str) -> None:
    model = _meta_model(model_preset(preset))
    counts = count_parameters(model.named_parameters())
    assert sum(counts[c] for c in COMPONENTS) == counts["total_trainable"]
    assert counts["total_trainable"] == sum(p.numel() for p in model.parameters())
    # every parameter is classified into a known component, and every component is non-empty
    assert {classify_parameter(n) for n, _ in model.named_parameters()} == set(COMPONENTS)


def test_meta_count_equals_real_tiny_instantiation(tiny_cfg: ModelConfig) -> None:
    real = DualForceModel(tiny_cfg)
    assert all(p.device.type == "cpu" for p in real.parameters())
    real_counts = count_parameters(real.named_parameters())
    assert real_counts == count_parameters(_meta_model(tiny_cfg).named_parameters())
    assert real_counts["total_trainable"] == sum(p.numel() for p in real.parameters() if p.requires_grad)


def test_frozen_parameters_are_excluded(tiny_cfg: ModelConfig) -> None:
    model = _meta_model(tiny_cfg)
    full = count_parameters(model.named_parameters())
    for p in model.bridge.parameters():
        p.requires_grad_(False)
    frozen = count_parameters(model.named_parameters())
    assert frozen["bridge"] == 0
    assert frozen["total_trainable"] == full["total_trainable"] - full["bridge"]
    assert count_parameters(model.named_parameters(), trainable_only=False)["total"] == full["total_trainable"]


@pytest.mark.parametrize("preset,overrides", [
    ("lite", {}),
    ("wan1.3b", {}),
    ("tiny", {}),
    ("lite", {"bridge": "struct_to_video", "fusion_depth": 4}),
    ("lite", {"struct_tower": False}),
    ("tiny", {"audio": False, "text_dim": 0, "qk_norm": False}),
])
def test_counts_match_closed_form(preset: str, overrides: dict) -> None:
    cfg = model_preset(preset, **overrides)
    assert count_parameters(_meta_model(cfg).named_parameters()) == closed_form(cfg)


def test_lite_total_is_the_documented_one() -> None:
    # docs/PARAMS.md quotes this number; a model change must update the document too
    cfg = build_config({"model": {"preset": "lite"}})
    assert count_parameters(build_meta_model(cfg).named_parameters())["total_trainable"] == 1_988_398_874


def test_wrapper_prefixes_and_unknown_names() -> None:
    assert classify_parameter("module.video.blocks.3.self_attn.q.weight") == "video_tower"
    assert classify_parameter("module._orig_mod.struct.blocks.0.audio_attn.gate") == "audio"
    assert classify_parameter("video.head.modulation") == "adaln"
    assert classify_parameter("video.head.head.weight") == "video_tower"
    assert classify_parameter("video.blocks.1.cross_attn.k.bias") == "text"
    assert classify_parameter("struct.kp_embedding.0.weight") == "adaln"
    with pytest.raises(ValueError, match="decoder.weight"):
        classify_parameter("decoder.weight")


def test_cli_json_parses_and_applies_overrides(capsys: pytest.CaptureFixture) -> None:
    assert main(["--preset", "lite", "--json", "--set", "model.fusion_depth=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = closed_form(model_preset("lite", fusion_depth=4))
    assert out["preset"] == "lite" and out["model"]["fusion_depth"] == 4
    for key, value in expected.items():
        assert out[key] == value, key


def test_cli_table_and_bad_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["--preset", "tiny"]) == 0
    table = capsys.readouterr().out
    assert "total_trainable" in table and all(c in table for c in COMPONENTS)
    assert main(["--preset", "tiny", "--set", "model.fusion_dept=1"]) == 2
    err = capsys.readouterr().err
    assert "model.fusion_dept" in err and "model.fusion_depth" in err
