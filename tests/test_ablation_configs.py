"""The seven seed ablations load, and each differs from the base run exactly where it should."""
from __future__ import annotations

from pathlib import Path

import pytest

from dualforce_mega.config import load_config

DIR = Path(__file__).resolve().parents[1] / "launch" / "configs" / "ablations"
EXPECTED = {
    "no_struct_stream": {"model.struct_tower": False},
    "unidirectional_bridge": {"model.bridge": "struct_to_video"},
    "fusion_depth_4": {"model.fusion_depth": 4},
    "fusion_depth_12": {"model.fusion_depth": 12},
    "sigma_s_0.5": {"diffusion.struct_sigma": "tied", "diffusion.struct_sigma_k": 0.5},
    "sigma_s_1.0": {"diffusion.struct_sigma": "tied"},  # k = 1.0 is also the default value
    "long_sequence_eval": {"diffusion.window_blocks": 8},
}


def _flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, body in cfg.to_dict().items() for k, v in body.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_differs_from_base_only_where_intended(name: str) -> None:
    base = _flat(load_config(str(DIR / "dualforce_lite.yaml")))
    abl = _flat(load_config(str(DIR / f"{name}.yaml")))
    diff = {k: abl[k] for k in abl if abl[k] != base[k]}
    assert diff == EXPECTED[name]


def test_all_seed_ablations_present() -> None:
    assert sorted(p.stem for p in DIR.glob("*.yaml") if p.stem != "dualforce_lite") == sorted(EXPECTED)
