"""Wan2.1 weight import / export: key maps, layer selection, channel growth, loud shape errors,
round trips through both layouts, and numerical agreement with diffusers' WanTransformer3DModel."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints_conv import wan_keys as wk
from checkpoints_conv.diff import diff_checkpoints
from checkpoints_conv.export_wan import WAN_BASENAME, export_wan_state
from checkpoints_conv.export_wan import main as export_main
from checkpoints_conv.import_wan import REPORT_NAME, WanImportError, import_wan_state
from checkpoints_conv.import_wan import main as import_main
from checkpoints_conv.safetensors_io import write_state_dict
from dualforce_mega.bundle import load_bundle, read_state_dict
from dualforce_mega.config import load_config

DIM, HEADS, FFN, TEXT, FREQ, CH = 64, 4, 128, 32, 256, 16   # the tiny preset's video-tower shapes
PATCH = (1, 2, 2)
DOC = Path(__file__).resolve().parents[1] / "docs" / "WAN_IMPORT.md"


def original_shapes(layers: int, in_ch: int = CH) -> dict[str, tuple]:
    """Wan2.1's original key list (docs/WAN_IMPORT.md) with shapes at the tiny size."""
    g = {"patch_embedding.weight": (DIM, in_ch, *PATCH), "patch_embedding.bias": (DIM,),
         "text_embedding.0.weight": (DIM, TEXT), "text_embedding.0.bias": (DIM,),
         "text_embedding.2.weight": (DIM, DIM), "text_embedding.2.bias": (DIM,),
         "time_embedding.0.weight": (DIM, FREQ), "time_embedding.0.bias": (DIM,),
         "time_embedding.2.weight": (DIM, DIM), "time_embedding.2.bias": (DIM,),
         "time_projection.1.weight": (6 * DIM, DIM), "time_projection.1.bias": (6 * DIM,),
         "head.head.weight": (CH * 4, DIM), "head.head.bias": (CH * 4,), "head.modulation": (1, 2, DIM)}
    assert set(g) == set(wk.GLOBAL_MAP)
    block = {"modulation": (1, 6, DIM), "norm3.weight": (DIM,), "norm3.bias": (DIM,),
             "ffn.0.weight": (FFN, DIM), "ffn.0.bias": (FFN,), "ffn.2.weight": (DIM, FFN), "ffn.2.bias": (DIM,)}
    for attn in ("self_attn", "cross_attn"):
        for p in "qkvo":
            block[f"{attn}.{p}.weight"] = (DIM, DIM)
            block[f"{attn}.{p}.bias"] = (DIM,)
        block[f"{attn}.norm_q.weight"] = (DIM,)
        block[f"{attn}.norm_k.weight"] = (DIM,)
    assert set(block) == set(wk.BLOCK_MAP)
    for i in range(layers):
        g.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return g


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def tiny_wan_diffusers(layers: int = 2, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=PATCH, num_attention_heads=HEADS, attention_head_dim=DIM // HEADS,
                              in_channels=CH, out_channels=CH, text_dim=TEXT, freq_dim=FREQ, ffn_dim=FFN,
                              num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # every tensor random (norm weights around 1), so a swapped key cannot hide
        for name, p in m.named_parameters():
            base = 1.0 if re.search(r"norm", name) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return m.eval()


def cfg_for(layers: int, *sets: str):
    return load_config(None, ["model.preset=tiny", f"model.layers={layers}", f"model.fusion_depth={layers}",
                              f"model.audio_layers={layers}", *sets])


# --------------------------------------------------------------------------------------
def test_key_maps_cover_diffusers_and_our_model_exactly():
    sd = tiny_wan_diffusers().state_dict()
    originals = {k: wk.to_original(k, "diffusers") for k in sd}
    assert all(v is not None for v in originals.values()), [k for k, v in originals.items() if v is None]
    assert all(wk.from_original(v, "diffusers") == k for k, v in originals.items())
    assert set(originals.values()) == set(original_shapes(2))
    # our tower holds exactly these keys plus the audio conditioning (which Wan has no counterpart for)
    from dualforce_mega.models import DualForceModel
    ours = [k for k in DualForceModel(cfg_for(2).model).state_dict() if k.startswith("video.")]
    non_wan = [k for k in ours if k[len("video."):] not in set(originals.values())]
    assert {f"video.{o}" for o in originals.values()} <= set(ours)
    assert non_wan and all(".audio_" in k for k in non_wan)
    assert wk.detect_format(list(sd)) == "diffusers"
    assert wk.detect_format(list(original_shapes(1))) == "original"


def test_doc_lists_every_mapping():
    text = DOC.read_text()
    for o, d in list(wk.GLOBAL_MAP.items()) + list(wk.BLOCK_MAP.items()):
        assert re.search(rf"`{re.escape(o)}`\s*\|\s*`{re.escape(d)}`", text), f"{o} -> {d} missing from {DOC}"


def test_parse_layers():
    assert wk.parse_layers("0-3", 30, 20) == [0, 1, 2, 3]
    assert wk.parse_layers("20", 30, 20) == list(range(20))
    assert wk.parse_layers("0-1,5", 30, 20) == [0, 1, 5]
    assert wk.parse_layers(None, 30, 20) == list(range(20))
    with pytest.raises(ValueError, match="selects layers \\[30\\]"):
        wk.parse_layers("28-30", 30, 3)


def test_diffusers_round_trip_is_exact(tmp_path):
    src = tmp_path / "wan_diffusers"   # sharded like a diffusers transformer/ folder
    sd = {k: v.contiguous() for k, v in tiny_wan_diffusers().state_dict().items()}
    write_state_dict(src, sd, max_bytes=64 * 1024, base=WAN_BASENAME)
    assert (src / f"{WAN_BASENAME}.safetensors.index.json").is_file()
    out = tmp_path / "imported"
    assert import_main([str(src), str(out), "--preset", "tiny", "--layers", "2"]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["format"] == "diffusers" and len(report["mapped"]) == len(sd)
    assert not report["unmapped"] and not report["skipped"] and not report["reshaped"]
    assert all(".audio_" in k for k in report["not_imported"])
    model, cfg, _ = load_bundle(out)   # import output is a loadable DualForce checkpoint
    assert cfg.model.layers == 2
    back = tmp_path / "exported"
    assert export_main([str(out), str(back), "--format", "diffusers"]) == 0
    r = diff_checkpoints(src, back)
    assert r.equal and r.compared == len(sd) and r.max_abs_overall == 0.0
    exported_cfg = json.loads((back / "config.json").read_text())
    assert exported_cfg["num_layers"] == 2 and exported_cfg["attention_head_dim"] == DIM // HEADS


def test_original_round_trip_with_layer_selection_and_report(tmp_path):
    shapes = original_shapes(3)
    sd = random_state(shapes, seed=3)
    sd["img_emb.proj.0.weight"] = torch.randn(4, 4)                 # Wan I2V branch: skipped
    sd["blocks.1.cross_attn.k_img.weight"] = torch.randn(DIM, DIM)
    sd["some_future.tensor"] = torch.randn(2)                        # unknown: reported as unmapped
    src = tmp_path / "wan_original.safetensors"
    save_file(sd, str(src))
    cfg = cfg_for(2)
    state, rep = import_wan_state(src, cfg, layers="1-2")
    assert rep.format == "original" and rep.layers == [1, 2] and rep.source_layers == 3
    assert rep.unmapped == ["some_future.tensor"]
    assert set(rep.skipped) == {k for k in shapes if k.startswith("blocks.0.")} | \
        {"img_emb.proj.0.weight", "blocks.1.cross_attn.k_img.weight"}
    assert torch.equal(state["video.blocks.0.ffn.0.weight"], sd["blocks.1.ffn.0.weight"])
    assert torch.equal(state["video.blocks.1.self_attn.norm_k.weight"], sd["blocks.2.self_attn.norm_k.weight"])
    out = tmp_path / "ours"
    write_state_dict(out, state, max_bytes=10**9)
    exported, erep = export_wan_state(out, "original")
    assert all(".audio_" in k for k in erep["not_exported"]) and erep["dropped_non_video"] > 0
    renum = {"blocks.0.": "blocks.1.", "blocks.1.": "blocks.2."}
    mapped = {k for k in shapes if not k.startswith("blocks.0.")}
    assert {re.sub(r"^blocks\.(\d)\.", lambda m: renum[m.group(0)], k) for k in exported} == mapped
    for k, v in exported.items():
        kk = re.sub(r"^blocks\.(\d)\.", lambda m: renum[m.group(0)], k)
        assert torch.equal(v, sd[kk]), k


def test_new_input_channels_are_zero_initialised(tmp_path):
    sd = random_state(original_shapes(2), seed=4)
    src = tmp_path / "w.safetensors"
    save_file(sd, str(src))
    state, rep = import_wan_state(src, cfg_for(2, "model.in_channels=20"))
    w = state["video.patch_embedding.weight"]
    assert w.shape == (DIM, 20, *PATCH)
    assert torch.equal(w[:, :CH], sd["patch_embedding.weight"]) and not w[:, CH:].any()
    assert list(rep.reshaped) == ["video.patch_embedding.weight"]
    assert rep.reshaped["video.patch_embedding.weight"]["from"] == [DIM, CH, *PATCH]


def test_shape_mismatch_and_missing_tensor_fail_loudly(tmp_path):
    sd = random_state(original_shapes(2), seed=5)
    src = tmp_path / "w.safetensors"
    save_file(sd, str(src))
    # safetensors lists keys sorted, so the bias is the first mismatch met
    with pytest.raises(WanImportError, match=r"blocks\.0\.ffn\.0\.bias -> video\.blocks\.0\.ffn\.0\.bias: "
                                             r"source shape \(128,\) does not match the model's \(96,\)"):
        import_wan_state(src, cfg_for(2, "model.ffn_dim=96"))
    with pytest.raises(WanImportError,
                       match=r"head\.head\.bias: source shape \(64,\) does not match the model's \(32,\)"):
        import_wan_state(src, cfg_for(2, "model.out_channels=8"))
    del sd["blocks.1.cross_attn.norm_q.weight"]
    save_file(sd, str(src))
    with pytest.raises(WanImportError, match=r"lacks 1 tensor.*blocks\.1\.cross_attn\.norm_q\.weight"):
        import_wan_state(src, cfg_for(2))


def test_init_struct_from_video(tmp_path):
    src = tmp_path / "w.safetensors"
    save_file(random_state(original_shapes(2), seed=6), str(src))
    state, rep = import_wan_state(src, cfg_for(2), init_struct_from_video=True)
    for i in range(2):
        for k in ("self_attn.q.weight", "self_attn.norm_k.weight", "ffn.2.bias", "modulation"):
            assert torch.equal(state[f"struct.blocks.{i}.{k}"], state[f"video.blocks.{i}.{k}"])
            assert rep.struct_from_video[f"struct.blocks.{i}.{k}"] == f"video.blocks.{i}.{k}"
    assert not any(".audio_attn." in k for k in rep.struct_from_video)
    fresh, _ = import_wan_state(src, cfg_for(2))
    assert not torch.equal(fresh["struct.blocks.0.self_attn.q.weight"], fresh["video.blocks.0.self_attn.q.weight"])


@pytest.mark.parametrize("sigma,atol", [(0.0, 2e-6), (0.73, 2e-5)])
def test_imported_tower_matches_diffusers_forward(tmp_path, sigma, atol):
    """Video only, one causal block spanning every frame (block-causal == full attention), one sigma
    for all frames, text on. At sigma=0 the sinusoidal timestep embedding is exact in both models and
    the outputs agree to float rounding; at sigma>0 diffusers builds the embedding's frequencies in
    float32 and we in float64, which moves the output by ~1e-5 (see docs/WAN_IMPORT.md)."""
    ref = tiny_wan_diffusers(layers=2, seed=7)
    src = tmp_path / "wan"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src / "model.safetensors"))
    frames = 3
    cfg = cfg_for(2, "model.struct_tower=false", "model.audio=false", "model.fusion_depth=0",
                  "model.audio_layers=0", f"model.causal_block_size={frames}", "model.attn_backend=sdpa",
                  "train.phase=2")
    state, rep = import_wan_state(src, cfg)
    assert not rep.not_imported
    from dualforce_mega.models import DualForceModel
    model = DualForceModel(cfg.model).eval()
    model.load_state_dict(state)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, CH, frames, 4, 6, generator=gen)
    text = torch.randn(2, 5, TEXT, generator=gen)
    with torch.no_grad():
        ours = model(x, torch.full((2, frames), sigma), text_emb=text).video
        theirs = ref(x, torch.full((2,), sigma * cfg.model.timestep_scale), text, return_dict=False)[0]
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= atol * theirs.abs().max().item(), f"max abs diff {err:.3e}"


def test_wan_1_3b_shapes_match_the_lite_and_wan_presets():
    """The documented Wan2.1-T2V-1.3B shapes are what our full-size video towers expect (built on meta)."""
    from dualforce_mega.models import DualForceModel
    wan = {"patch_embedding.weight": (1536, 16, 1, 2, 2), "text_embedding.0.weight": (1536, 4096),
           "time_embedding.0.weight": (1536, 256), "time_projection.1.weight": (9216, 1536),
           "head.head.weight": (64, 1536), "head.modulation": (1, 2, 1536), "blocks.0.modulation": (1, 6, 1536),
           "blocks.0.self_attn.q.weight": (1536, 1536), "blocks.0.cross_attn.k.weight": (1536, 1536),
           "blocks.0.norm3.weight": (1536,), "blocks.0.ffn.0.weight": (8960, 1536),
           "blocks.0.ffn.2.weight": (1536, 8960)}
    for preset, layers in (("lite", 20), ("wan1.3b", 30)):
        with torch.device("meta"):
            sd = DualForceModel(load_config(None, [f"model.preset={preset}"]).model).state_dict()
        for k, shape in wan.items():
            assert tuple(sd[f"video.{k}"].shape) == shape, (preset, k)
        assert f"video.blocks.{layers - 1}.ffn.0.weight" in sd and f"video.blocks.{layers}.ffn.0.weight" not in sd


def test_wrapper_prefix_is_stripped_and_mixed_layouts_refused(tmp_path):
    sd = random_state(original_shapes(2), seed=8)
    src = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(src))
    state, rep = import_wan_state(src, cfg_for(2))
    assert rep.prefix == "model.diffusion_model." and len(rep.mapped) == len(sd)
    assert torch.equal(state["video.blocks.1.cross_attn.o.bias"], sd["blocks.1.cross_attn.o.bias"])
    mixed = dict(sd, **{"condition_embedder.time_proj.weight": torch.zeros(1)})
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        import_wan_state(tmp_path / "mixed.safetensors", cfg_for(2))


def test_import_output_starts_a_phase2_model_through_init_from(tmp_path):
    """Wan import -> Phase 2 (``train.init_from=<import dir>``): every video-tower weight of the Phase 2
    model is the imported one; the import's other modules are reported as ignored, nothing as new."""
    from dualforce_mega.models import DualForceModel
    from dualforce_mega.training.init_from import init_from

    src = tmp_path / "wan_diffusers"
    write_state_dict(src, {k: v.contiguous() for k, v in tiny_wan_diffusers().state_dict().items()},
                     max_bytes=64 * 1024, base=WAN_BASENAME)
    out = tmp_path / "imported"
    assert import_main([str(src), str(out), "--preset", "tiny", "--layers", "2"]) == 0
    imported = read_state_dict(out)
    phase2 = DualForceModel(cfg_for(2, "train.phase=2", "model.struct_tower=false", "model.audio=false").model)
    report = init_from(phase2, str(out))
    assert not report.new and set(report.loaded) == set(phase2.state_dict())
    assert set(report.ignored) == set(imported) - set(phase2.state_dict())   # struct tower, audio layers, ...
    for name, t in phase2.state_dict().items():
        assert torch.equal(t, imported[name]), name
