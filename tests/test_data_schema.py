"""Shard schema: valid clips pass; every broken field is reported with its shard, key and field."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save as st_save

from dualforce_mega.config import ModelConfig
from dualforce_mega.data.schema import SchemaError, ShardSchema, read_safetensors_layout, to_storage, \
    validate_sample
from dualforce_mega.data.synthetic import make_synthetic_clip

FRAMES, HW = 3, (4, 4)
SHARD, KEY = "/data/shard-000007.tar", "hdtf_clip_0001"


def clip(cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = make_synthetic_clip(0, FRAMES, HW, cfg, seed=0)
    return to_storage(tensors), {**meta, "source_dataset": "synthetic"}


def test_valid_clip_passes_and_returns_latent_frames(tiny_cfg: ModelConfig) -> None:
    tensors, meta = clip(tiny_cfg)
    assert validate_sample(tensors, meta, tiny_cfg, shard=SHARD, key=KEY) == FRAMES
    assert tensors["video_latent"].dtype == torch.bfloat16


def _drop(d: dict, name: str) -> dict:
    return {k: v for k, v in d.items() if k != name}


# (name, field named in the error, how to break the (tensors, meta) pair)
BREAKS = [
    ("struct rows", "struct", lambda t, m: ({**t, "struct": t["struct"][:-1]}, m)),
    ("audio rows", "audio", lambda t, m: ({**t, "audio": t["audio"][:-1]}, m)),
    ("audio dim", "audio", lambda t, m: ({**t, "audio": torch.zeros(t["audio"].shape[0], 7)}, m)),
    ("struct missing", "struct", lambda t, m: (_drop(t, "struct"), m)),     # talking-head fields come together
    ("flame without struct", "flame", lambda t, m: (_drop(_drop(_drop(t, "struct"), "audio"), "kp_canonical"), m)),
    ("ref without positions", "ref_positions",
     lambda t, m: ({**{k: v for k, v in t.items() if k != "ref_positions"},
                    "ref_latent": t["video_latent"][:, :1].movedim(1, 0).contiguous()}, m)),
    ("ref count", "ref_latent", lambda t, m: ({**t, "ref_latent": t["video_latent"][:, :2].movedim(1, 0).contiguous(),
                                              "ref_positions": torch.tensor([0])}, m)),
    ("ref position", "ref_positions", lambda t, m: ({**t, "ref_latent": t["video_latent"][:, :1].movedim(1, 0).contiguous(),
                                                    "ref_positions": torch.tensor([FRAMES])}, m)),
    ("latent dtype", "video_latent", lambda t, m: ({**t, "video_latent": t["video_latent"].float()}, m)),
    ("latent channels", "video_latent", lambda t, m: ({**t, "video_latent": t["video_latent"][:3]}, m)),
    ("odd latent size", "video_latent", lambda t, m: ({**t, "video_latent": t["video_latent"][..., :3]}, m)),
    ("kp dims", "kp_canonical", lambda t, m: ({**t, "kp_canonical": t["kp_canonical"][None]}, m)),
    ("nan", "flame", lambda t, m: ({**t, "flame": t["flame"].clone().fill_(float("nan"))}, m)),
    ("unknown tensor", "depth", lambda t, m: ({**t, "depth": torch.zeros(1)}, m)),
    ("text dim", "text_emb", lambda t, m: ({**t, "text_emb": torch.zeros(2, 5)}, m)),
    ("fps", "meta.fps", lambda t, m: (t, {**m, "fps": 30})),
    ("frame count", "meta.num_video_frames", lambda t, m: (t, {**m, "num_video_frames": 3})),
    ("subject missing", "meta.subject", lambda t, m: (t, _drop(m, "subject"))),
    ("split", "meta.split", lambda t, m: (t, {**m, "split": "holdout"})),
    ("quality", "meta.quality.mouth_std", lambda t, m: (t, {**m, "quality": {"mouth_std": "high"}})),
    ("time range", "meta.time_range", lambda t, m: (t, {**m, "time_range": [2.0, 1.0]})),
]


@pytest.mark.parametrize("name,field,breaker", BREAKS, ids=[b[0] for b in BREAKS])
def test_errors_name_shard_key_and_field(tiny_cfg: ModelConfig, name: str, field: str, breaker) -> None:
    tensors, meta = breaker(*clip(tiny_cfg))
    with pytest.raises(SchemaError) as err:
        validate_sample(tensors, meta, tiny_cfg, shard=SHARD, key=KEY)
    assert err.value.field == field
    msg = str(err.value)
    assert SHARD in msg and repr(KEY) in msg and repr(field) in msg


def test_key_with_dot_is_rejected(tiny_cfg: ModelConfig) -> None:
    with pytest.raises(SchemaError, match="__key__"):
        validate_sample(*clip(tiny_cfg), tiny_cfg, shard=SHARD, key="clip.0001")


def test_dims_come_from_the_model_config(tiny_cfg: ModelConfig) -> None:
    tensors, meta = clip(tiny_cfg)
    other = dataclasses.replace(tiny_cfg, audio_dim=tiny_cfg.audio_dim * 2)
    with pytest.raises(SchemaError) as err:
        validate_sample(tensors, meta, other, shard=SHARD, key=KEY)
    assert err.value.field == "audio" and str(other.audio_dim) in str(err.value)
    # a higher audio rate needs proportionally more audio rows
    faster = dataclasses.replace(tiny_cfg, audio_rate=tiny_cfg.audio_rate * 2)
    schema = ShardSchema.from_model(faster)
    assert schema.audio_frames(FRAMES) == 2 * ShardSchema.from_model(tiny_cfg).audio_frames(FRAMES)
    with pytest.raises(SchemaError, match="'audio'"):
        validate_sample(tensors, meta, faster, shard=SHARD, key=KEY)


def test_header_layout_matches_tensors_and_detects_truncation(tiny_cfg: ModelConfig) -> None:
    tensors, _ = clip(tiny_cfg)
    blob = st_save(tensors)
    layout = read_safetensors_layout(blob, shard=SHARD, key=KEY)
    assert layout == {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    for cut in (3, len(blob) // 2, len(blob) - 1):
        with pytest.raises(SchemaError) as err:
            read_safetensors_layout(blob[:cut], shard=SHARD, key=KEY)
        assert SHARD in str(err.value) and KEY in str(err.value)
