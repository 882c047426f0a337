"""Clips without FLAME and video-only clips (Phase 2) through schema, windowing and the objective."""
import dataclasses

import torch

from dualforce_mega.config import model_preset
from dualforce_mega.data.schema import ShardSchema, to_storage, validate_sample
from dualforce_mega.data.synthetic import make_synthetic_clip
from dualforce_mega.data.windowing import slice_window
from dualforce_mega.diffusion.losses import masked_mse_sum_count, mean_from_sum_count

FRAMES, WINDOW = 4, 3


def _clip(cfg, drop=()):
    t, m = make_synthetic_clip(0, FRAMES, (4, 4), cfg, seed=1)
    return {k: v for k, v in to_storage(t).items() if k not in drop}, m


def test_flameless_and_video_only_clips_are_valid_and_window():
    cfg = model_preset("tiny")
    schema = ShardSchema.from_model(cfg)
    full, meta = _clip(cfg)
    no_flame, _ = _clip(cfg, ("flame",))
    video_only, _ = _clip(cfg, ("flame", "struct", "kp_canonical", "audio", "text_emb"))
    for t in (full, no_flame, video_only):
        assert validate_sample(t, meta, cfg, key="k") == FRAMES
    w_full = slice_window(full, 1, WINDOW, schema, keep_text=False)
    w_none = slice_window(no_flame, 1, WINDOW, schema, keep_text=False)
    assert float(w_full["flame_valid"]) == 1.0 and float(w_none["flame_valid"]) == 0.0
    assert w_none["flame"].shape == w_full["flame"].shape and not w_none["flame"].any()
    torch.testing.assert_close(w_none["struct"], w_full["struct"])
    assert set(slice_window(video_only, 0, WINDOW, schema, keep_text=False)) == {"video_latent"}


def test_flame_loss_ignores_clips_without_flame():
    """The objective's flame mask: a batch of one clip with FLAME and one without gives exactly the
    loss of the clip with FLAME alone, whatever the second clip's (zero) targets are."""
    from dualforce_mega.diffusion.objective import DiffusionForcingObjective, Targets
    cfg = model_preset("tiny")
    n, q = 5, cfg.flame_dim
    pred = torch.randn(2, n, q)
    target = torch.randn(2, n, q)
    struct_valid = torch.ones(n, dtype=torch.bool)
    out = type("Out", (), {"video": None, "struct": None, "flame": pred, "lip_audio": None, "lip_struct": None})()
    base = dict(video=torch.zeros(1), sigma_video=torch.zeros(1), frame_valid=torch.ones(1, dtype=torch.bool),
                struct_valid=struct_valid, flame=target)
    obj = DiffusionForcingObjective.__new__(DiffusionForcingObjective)
    obj.weights = {"video": 0.0, "struct": 0.0, "flame": 1.0, "lipsync": 0.0}
    obj.cfg = dataclasses.make_dataclass("C", [("diffusion", object)])(None)
    loss, _ = obj.losses(out, Targets(**base, flame_valid=torch.tensor([1.0, 0.0])))
    want = mean_from_sum_count(*masked_mse_sum_count(pred[:1], target[:1], struct_valid[None, :, None]))
    torch.testing.assert_close(loss, want)
    loss_all, _ = obj.losses(out, Targets(**base))
    assert not torch.allclose(loss_all, want)
