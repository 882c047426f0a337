"""Config loading: YAML + --set overrides, presets, error messages that name the key, round trip."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dualforce_mega.config import (MODEL_PRESETS, Config, ConfigError, build_config, load_config, model_preset,
                                   save_config)


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_and_set_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model": {"preset": "tiny", "layers": 6}, "train": {"steps": 7, "lr": 1e-3},
                             "run": {"dir": "runs/x"}})
    cfg = load_config(path, ["train.lr=2e-4", "model.fusion_depth=3", "train.betas=[0.9, 0.95]",
                             "model.struct_tower=false", "parallel.sp=2"])
    assert cfg.model.layers == 6 and cfg.model.fusion_depth == 3 and cfg.model.struct_tower is False
    assert cfg.train.steps == 7
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.parallel.sp == 2
    assert cfg.run.dir == "runs/x"
    # untouched sections keep their defaults
    assert cfg.diffusion == Config().diffusion


def test_later_set_wins_over_earlier_and_over_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"train": {"steps": 7}})
    assert load_config(path, ["train.steps=8", "train.steps=9"]).train.steps == 9


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_apply(preset: str) -> None:
    cfg = build_config({"model": {"preset": preset}})
    for key, value in MODEL_PRESETS[preset].items():
        assert getattr(cfg.model, key) == value, key
    assert cfg.model == model_preset(preset)


def test_explicit_keys_override_the_preset(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model": {"preset": "lite", "layers": 10, "fusion_depth": 4}})
    cfg = load_config(path)
    assert (cfg.model.dim, cfg.model.ffn_dim) == (1536, 8960)          # from the preset
    assert (cfg.model.layers, cfg.model.fusion_depth) == (10, 4)        # explicit
    # a preset chosen on the command line replaces the file's, and the file's explicit keys still win
    cfg = load_config(path, ["model.preset=wan1.3b"])
    assert cfg.model.preset == "wan1.3b" and cfg.model.layers == 10 and cfg.model.text_dim == 4096
    # the default preset is tiny
    assert load_config().model == model_preset("tiny")


def test_model_preset_keyword_overrides() -> None:
    m = model_preset("lite", fusion_depth=12)
    assert m.fusion_depth == 12 and m.layers == MODEL_PRESETS["lite"]["layers"]
    with pytest.raises(ConfigError, match=r"model\.fusion_depht.*did you mean model\.fusion_depth"):
        model_preset("lite", fusion_depht=12)
    with pytest.raises(ConfigError, match=r"model\.preset.*'huge'"):
        model_preset("huge")


@pytest.mark.parametrize("data,match", [
    ({"modle": {"dim": 8}}, r"modle: unknown section.*did you mean model"),
    ({"train": {"stpes": 3}}, r"train\.stpes: unknown key.*did you mean train\.steps"),
    ({"model": {"fusion": 3}}, r"model\.fusion: unknown key.*model\.fusion_depth"),
    ({"train": [1, 2]}, r"train: expected a mapping"),
])
def test_unknown_sections_and_keys_in_yaml(tmp_path: Path, data: dict, match: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=match) as exc:
        load_config(path)
    if "unknown section" in match:
        assert path in str(exc.value)  # a file error names the file too


@pytest.mark.parametrize("item,match", [
    ("trian.steps=3", r"trian\.steps: unknown section.*did you mean train"),
    ("train.stepz=3", r"train\.stepz: unknown key.*did you mean train\.steps"),
    ("train.steps", r"train\.steps.*expected section\.key=value"),
    ("steps=3", r"steps.*expected section\.key"),
])
def test_bad_set_items(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [item])


@pytest.mark.parametrize("item,key", [
    ("train.steps=many", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("train.lr=fast", "train.lr"),
    ("model.struct_tower=maybe", "model.struct_tower"),
    ("model.patch_size=3", "model.patch_size"),
    ("train.betas=[0.9, high]", "train.betas"),
    ("model.patch_size=[1, 2.5, 2]", "model.patch_size"),
    ("model.patch_size=[1, 2]", "model.patch_size"),
    ("train.betas=[0.9, 0.95", "train.betas"),
])
def test_type_errors_name_the_key(item: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [item])


@pytest.mark.parametrize("data,match", [
    ({"data": {"window": "three"}}, r"data\.window: expected an integer"),
    ({"run": {"dir": ["a", "b"]}}, r"run\.dir: expected a string"),
    ({"train": {"betas": 0.9}}, r"train\.betas: expected a list"),
    ({"model": {"qk_norm": "sometimes"}}, r"model\.qk_norm: expected a boolean"),
])
def test_yaml_type_errors_name_the_key(tmp_path: Path, data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, data))


def test_values_are_coerced_to_the_field_type() -> None:
    cfg = load_config(None, ["train.lr=1", "train.steps=3.0", "model.audio=0", "run.name=on", "run.dir=123",
                             "data.shards=", "model.patch_size=1,2,2"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)
    assert cfg.model.audio is False
    # string fields take the command-line text as written (YAML would read "on" as a boolean)
    assert cfg.run.name == "on" and cfg.run.dir == "123"
    assert cfg.data.shards == ""
    assert cfg.model.patch_size == (1, 2, 2)


@pytest.mark.parametrize("overrides,key", [
    (["model.heads=5"], "model.heads"),                                    # 64 % 5 != 0
    (["model.heads=64"], "model.heads"),                                   # head_dim 1: odd, no RoPE pairs
    (["model.fusion_depth=5"], "model.fusion_depth"),                      # tiny has 4 layers
    (["model.audio_layers=9"], "model.audio_layers"),
    (["model.fusion_depth=-1"], "model.fusion_depth"),
    (["parallel.sp=3"], "parallel.sp"),                                    # tiny has 4 heads
    (["train.global_batch=6", "train.micro_batch=4"], "train.global_batch"),
    (["train.global_batch=2", "train.micro_batch=4"], "train.global_batch"),
    (["model.bridge=sideways"], "model.bridge"),
    (["model.attn_backend=xformers"], "model.attn_backend"),
    (["diffusion.sigma_sampler=beta"], "diffusion.sigma_sampler"),
    (["diffusion.struct_sigma=shared"], "diffusion.struct_sigma"),
    (["train.precision=fp16"], "train.precision"),
    (["train.fp8_recipe=mxfp8"], "train.fp8_recipe"),
    (["train.phase=3"], "train.phase"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["model.patch_size=[2, 2, 2]"], "model.patch_size"),
    (["data.window=1"], "data.window"),
    (["model.audio_rate=49"], "model.audio_rate"),
])
def test_invalid_combinations_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ":"):
        load_config(None, overrides)


def test_valid_edge_combinations_pass() -> None:
    cfg = load_config(None, ["model.fusion_depth=4", "model.audio_layers=0", "parallel.sp=4",
                             "train.global_batch=8", "train.micro_batch=4", "model.bridge=struct_to_video"])
    assert cfg.model.fusion_depth == cfg.model.layers and cfg.parallel.sp == cfg.model.heads


def test_lite_sp_must_divide_12_heads() -> None:
    for sp in (1, 2, 3, 4, 6, 12):
        assert load_config(None, ["model.preset=lite", f"parallel.sp={sp}"]).parallel.sp == sp
    for sp in (5, 8):
        with pytest.raises(ConfigError, match=r"parallel\.sp"):
            load_config(None, ["model.preset=lite", f"parallel.sp={sp}"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dim: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml: top level must be a mapping"):
        load_config(str(scalar))


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.preset=lite", "model.layers=12", "model.fusion_depth=4",
                             "model.bridge=struct_to_video", "train.betas=[0.9, 0.95]", "train.lr=1.5e-4",
                             "diffusion.struct_sigma=tied", "diffusion.struct_sigma_k=0.5", "run.name=on",
                             "parallel.sp=3", "data.shards=/data/a.tar,/data/b.tar"])
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    # and the saved file is plain YAML (no python tags), readable by any tool
    assert "!!python" not in path.read_text()
    save_config(again, tmp_path / "saved2.yaml")
    assert (tmp_path / "saved2.yaml").read_text() == path.read_text()
