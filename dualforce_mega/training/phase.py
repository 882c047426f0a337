"""Training phases: what the model contains in each (DESIGN §1)."""
from __future__ import annotations

import dataclasses

from ..config import Config, validate


def apply_phase(cfg: Config) -> Config:
    """Phase 2 = causal video-only pretraining: no struct tower, no audio. Phase 4 = the full model as
    configured. Returns a new, validated config."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model))
    if cfg.train.phase == 2:
        cfg.model.struct_tower = False
        cfg.model.audio = False
    validate(cfg)
    return cfg
