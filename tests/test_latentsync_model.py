"""LatentSync baseline, model side: the 3D UNet against the official code (key names, shapes and
outputs recorded from bytedance/LatentSync in tests/fixtures/latentsync_unet_reference.json), strict
checkpoint loading, the DDIM schedule, Whisper features / windows, alignment and paste-back."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dualforce_mega.baselines.latentsync import align
from dualforce_mega.baselines.latentsync.config import UNetConfig, load_config
from dualforce_mega.baselines.latentsync.mask import mouth_mask
from dualforce_mega.baselines.latentsync.pipeline import fill_missing, loop_indices
from dualforce_mega.baselines.latentsync.scheduler import SCHEDULER_CONFIG, build_scheduler
from dualforce_mega.baselines.latentsync.tiny import tiny_whisper
from dualforce_mega.baselines.latentsync.unet import LatentSyncUNet, load_unet
from dualforce_mega.baselines.latentsync.whisper import WhisperFeatures, encoder_from_openai

pytestmark = pytest.mark.usefixtures("single_thread")

REF = json.loads((Path(__file__).parent / "fixtures" / "latentsync_unet_reference.json").read_text())


def _digest(sd: dict) -> str:
    lines = "\n".join(f"{k}:{list(v.shape)}" for k, v in sorted(sd.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _tiny_unet() -> LatentSyncUNet:
    return LatentSyncUNet(UNetConfig(**copy.deepcopy(REF["tiny_config"]))).eval()


# ------------------------------------------------------------------------------------------- UNet
def test_unet_output_matches_official_code():
    """Same weights and inputs as the recorded run of the official UNet3DConditionModel."""
    unet = _tiny_unet()
    g = torch.Generator().manual_seed(1247)
    sd = {k: (v if k.endswith(".pe") else torch.randn(v.shape, generator=g) * 0.2)
          for k, v in sorted(unet.state_dict().items())}
    unet.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 13, 3, 6, 10, generator=g)      # 6 x 10 latents: not a multiple of 2 (forced up-size)
    audio = torch.randn(6, 5, 16, generator=g)
    with torch.no_grad():
        y = unet(x, torch.tensor(481), encoder_hidden_states=audio)
    assert list(y.shape) == REF["output_shape"]
    ref = torch.tensor(REF["output"]).view(*REF["output_shape"])
    torch.testing.assert_close(y, ref, atol=2e-4, rtol=1e-4)


def test_unet_key_layout_matches_official_configs():
    """stage2 / stage2_512 (motion modules), stage1 (none), stage2_efficient (decoder only): every
    parameter name and shape as the official code builds them (digest recorded from it)."""
    variants = {"stage2": {}, "stage1": {"use_motion_module": False},
                "stage2_efficient": {"motion_module_decoder_only": True}}
    for name, over in variants.items():
        with torch.device("meta"):
            sd = LatentSyncUNet(UNetConfig(**over)).state_dict()
        ref = REF["official_configs"][name]
        assert (len(sd), sum(v.numel() for v in sd.values())) == (ref["tensors"], ref["numel"]), name
        assert _digest(sd) == ref["sha256"], name
    with torch.device("meta"):
        tiny = _tiny_unet().state_dict()
    assert {k: list(v.shape) for k, v in tiny.items()} == REF["tiny_keys"]


def test_unet_strict_load_official_key_names(tmp_path):
    """A random state dict under the official names, saved as latentsync_unet.pt is, loads strictly."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in REF["tiny_keys"].items()}
    path = tmp_path / "latentsync_unet.pt"
    torch.save({"state_dict": sd, "global_step": 123}, path)
    cfg = UNetConfig(**copy.deepcopy(REF["tiny_config"]))
    unet = load_unet(cfg, path)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # one key short, one key extra, one shape off: each is an error naming the key
    bad = dict(sd)
    gone = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    del bad[gone]
    torch.save({"state_dict": bad}, path)
    with pytest.raises(ValueError, match=gone.replace(".", r"\.")):
        load_unet(cfg, path)
    torch.save({"state_dict": {**sd, "extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"extra\.weight"):
        load_unet(cfg, path)
    torch.save({"state_dict": {**sd, "conv_in.weight": torch.zeros(32, 9, 3, 3)}}, path)
    with pytest.raises(ValueError, match=r"conv_in\.weight \[32, 9, 3, 3\] \(expected \[32, 13, 3, 3\]\)"):
        load_unet(cfg, path)


def test_unet_yaml(tmp_path):
    """The official YAML layout: PyYAML reads 1e-5 as a string; unknown and 1.0-only keys are errors."""
    model = dict(REF["tiny_config"], norm_eps="1e-5")
    p = tmp_path / "unet.yaml"
    p.write_text(json.dumps({"data": {"num_frames": 8, "resolution": 128, "mask_image_path": "x.png"},
                             "model": model}))
    cfg = load_config(p)
    assert cfg.unet.norm_eps == 1e-5 and cfg.data.num_frames == 8 and cfg.data.resolution == 128
    assert cfg.data.audio_feat_length == (2, 2)
    p.write_text(json.dumps({"model": dict(model, custom_audio_layer=False)}))
    with pytest.raises(ValueError, match="LatentSync 1.0"):
        load_config(p)
    p.write_text(json.dumps({"model": dict(model, typo_key=1)}))
    with pytest.raises(ValueError, match="typo_key"):
        load_config(p)


def test_clip_groupnorm_spans_frames():
    """The ResNet GroupNorm normalises each group over all frames of a clip, not per frame."""
    from dualforce_mega.baselines.latentsync.resnet import ClipGroupNorm
    norm = ClipGroupNorm(2, 4, eps=1e-5)
    x = torch.randn(3 * 5, 4, 2, 3)        # 3 clips of 5 frames
    ref = torch.nn.functional.group_norm(x.view(3, 5, 4, 2, 3).transpose(1, 2), 2, eps=1e-5).transpose(1, 2)
    torch.testing.assert_close(norm(x, 5), ref.reshape(15, 4, 2, 3), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- DDIM
def test_ddim_schedule_hand_computed():
    s = build_scheduler(20)
    assert s.timesteps.tolist() == [951 - 50 * i for i in range(20)]
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), acp, rtol=1e-5)
    assert float(s.final_alpha_cumprod) == pytest.approx(acp[0], rel=1e-6)      # set_alpha_to_one False
    # one eta=0 step by hand: x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t); x_prev = sqrt(a_p) x0 + sqrt(1-a_p) eps
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    for t, a_prev in ((951, acp[901]), (1, acp[0])):
        a = acp[t]
        x0 = (x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
        want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps.double()
        got = s.step(eps, t, x).prev_sample
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_ddim_equals_official_scheduler_config():
    """diffusers' DDIMScheduler built from the official scheduler_config.json values behaves the same."""
    from diffusers import DDIMScheduler
    official = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None, "skip_prk_steps": True}
    ref = DDIMScheduler.from_config(official)
    ref.set_timesteps(20)
    ours = build_scheduler(20)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x, eps = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    for t in ref.timesteps:
        assert torch.equal(ours.step(eps, t, x).prev_sample, ref.step(eps, t, x).prev_sample)
    assert SCHEDULER_CONFIG["steps_offset"] == 1


# ---------------------------------------------------------------------------------------- Whisper
def test_log_mel_matches_transformers_feature_extractor():
    from transformers import WhisperFeatureExtractor
    w = WhisperFeatures(tiny_whisper())
    wave = torch.randn(32000, generator=torch.Generator().manual_seed(3)) * 0.1
    fe = WhisperFeatureExtractor(chunk_length=2)          # exactly 2 s: no padding on either side
    ref = fe(wave.numpy(), sampling_rate=16000, return_tensors="np").input_features[0]
    np.testing.assert_allclose(w.log_mel(wave).numpy(), ref, atol=1e-4)


def test_whisper_features_layers_and_segments():
    """Input embedding + every block's raw output (before the final LayerNorm), per 2 s segment of
    the tiny encoder, zero-padded in mel space, half as many features as mel frames kept."""
    enc = tiny_whisper()
    w = WhisperFeatures(enc)
    wave = torch.randn(16000 * 3 + 480, generator=torch.Generator().manual_seed(1)) * 0.1  # 3.03 s: 2 segments
    feats = w.features(wave)
    mel = w.log_mel(wave)
    assert mel.shape[1] == 303 and feats.shape == (100 + 51, 3, 32)     # 200 // 2 + 103 // 2
    seg2 = torch.nn.functional.pad(mel[:, 200:], (0, 97))[None]
    with torch.no_grad():
        h = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(seg2)))).transpose(1, 2)
        h = h + enc.embed_positions.weight
        want = [h]
        for layer in enc.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
            want.append(h)
    for i, ref in enumerate(want):
        torch.testing.assert_close(feats[100:, i], ref[0, :51], atol=1e-5, rtol=1e-5)


def test_whisper_windows_hand_computed():
    w = WhisperFeatures(tiny_whisper())
    feats = torch.arange(30, dtype=torch.float32)[:, None, None].expand(30, 3, 32)
    win = w.windows(feats, 25, 16)
    assert win.shape == (16, 10 * 3, 32) and w.tokens == 30
    first = win[:, ::3, 0]                # feature index per window slot (layer 0)
    assert first[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]          # centre 0, clamped on the left
    assert first[3].tolist() == list(range(2, 12))                       # centre 6: 6-4 .. 6+5
    assert first[15].tolist() == [26, 27, 28, 29, 29, 29, 29, 29, 29, 29]
    assert torch.equal(win[3, :3, 0], torch.tensor([2.0, 2.0, 2.0]))     # layer-major within a feature frame
    # official feature2chunks: windows until one's centre passes the end (100 features -> 52 frames)
    assert w.num_video_frames(100, 25) == 52 and w.num_video_frames(15, 25) == 9


def test_openai_whisper_checkpoint(tmp_path):
    """OpenAI's tiny.pt layout (LatentSync's checkpoints/whisper) -> transformers WhisperEncoder."""
    ref = tiny_whisper()
    inv = {"q_proj": "attn.query", "k_proj": "attn.key", "v_proj": "attn.value", "out_proj": "attn.out",
           "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln"}
    state = {}
    for k, v in ref.state_dict().items():
        name = k.replace("embed_positions.weight", "positional_embedding").replace("layer_norm.", "ln_post.")
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            for new, old in inv.items():
                rest = rest.replace("self_attn." + new if new.endswith("proj") else new, old)
            name = f"blocks.{i}.{rest}"
        state["encoder." + name] = torch.randn_like(v)
    state["decoder.token_embedding.weight"] = torch.zeros(3, 32)
    c = ref.config
    dims = {"n_mels": 80, "n_audio_ctx": c.max_source_positions, "n_audio_state": c.d_model, "n_audio_head": 2,
            "n_audio_layer": c.encoder_layers, "n_vocab": 3, "n_text_ctx": 4, "n_text_state": 32,
            "n_text_head": 2, "n_text_layer": 1}
    torch.save({"dims": dims, "model_state_dict": state}, tmp_path / "tiny.pt")
    enc = encoder_from_openai(tmp_path / "tiny.pt")
    got = enc.state_dict()
    assert torch.equal(got["layers.1.self_attn.q_proj.weight"], state["encoder.blocks.1.attn.query.weight"])
    assert torch.equal(got["layers.0.fc2.bias"], state["encoder.blocks.0.mlp.2.bias"])
    assert torch.equal(got["embed_positions.weight"], state["encoder.positional_embedding"])
    assert torch.equal(got["layer_norm.weight"], state["encoder.ln_post.weight"])
    torch.save({"state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not an OpenAI Whisper checkpoint"):
        encoder_from_openai(tmp_path / "bad.pt")


# -------------------------------------------------------------------------------- faces and masks
def test_alignment_maps_points_onto_template():
    """Points placed by a known similarity land on the template (then the 4:3 -> square resize)."""
    tpl, (w, h) = align.template(256)
    assert (w, h) == (210, 280)
    angle, scale, shift = 0.3, 0.7, np.array([40.0, -25.0])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = (tpl @ rot.T + shift)[None]
    m = align.align_matrices(pts, 256)[0]
    mapped = pts[0] @ m[:, :2].T + m[:, 2]
    want = np.stack([(tpl[:, 0] + 0.5) * 256 / w - 0.5, (tpl[:, 1] + 0.5) * 256 / h - 0.5], 1)
    np.testing.assert_allclose(mapped, want, atol=1e-3)


def test_warp_and_paste_back():
    """A frame warped to the face and pasted back: unchanged inside the face (away from the edge),
    the frame exactly far outside, a smooth ramp in between."""
    g = torch.Generator().manual_seed(0)
    frame = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=g) * 255, size=(96, 96),
                                            mode="bilinear", align_corners=False)
    m = torch.tensor([[[1.5, 0.2, -40.0], [-0.2, 1.5, -30.0]]])          # frame -> 64 x 64 face
    face = align.warp(frame, m, (64, 64), fill=align.FILL)
    new_face = torch.full_like(face, 200.0)
    out = align.paste_back(frame, new_face, m)
    inv = align._invert(m.double())[0].float()
    centre = inv[:, :2] @ torch.tensor([31.5, 31.5]) + inv[:, 2]        # face centre in the frame
    cx, cy = centre.round().long().tolist()
    assert torch.allclose(out[0, :, cy, cx], torch.full((3,), 200.0), atol=0.5)
    assert torch.equal(out[0, :, 0, 0], frame[0, :, 0, 0]) and torch.equal(out[0, :, 95, 95], frame[0, :, 95, 95])
    back = align.paste_back(frame, face, m)                               # pasting the unchanged face
    err = (back - frame)[0, :, cy - 8:cy + 8, cx - 8:cx + 8].abs()        # two bilinear resamplings
    assert err.mean() < 1.0 and err.max() < 5.0


def test_erode_and_blur_hand_computed():
    x = torch.zeros(1, 1, 7, 7)
    x[..., 1:6, 1:6] = 1
    e = align.erode(x, 3)
    assert e[0, 0].nonzero().tolist() == [[r, c] for r in range(2, 5) for c in range(2, 5)]
    assert torch.equal(align.erode(torch.ones(1, 1, 4, 4), 3), torch.ones(1, 1, 4, 4))   # border keeps
    b = align.gaussian_blur(torch.full((1, 2, 9, 9), 3.0), 5)
    torch.testing.assert_close(b, torch.full((1, 2, 9, 9), 3.0))
    d = torch.zeros(1, 1, 9, 9)
    d[..., 4, 4] = 1
    k = align.gaussian_blur(d, 5)[0, 0]
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    g1 = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * sigma ** 2))
    torch.testing.assert_close(k[2:7, 2:7], torch.outer(g1, g1) / g1.sum() ** 2)


def test_mouth_mask_region():
    m = mouth_mask(256)[0]
    assert m.shape == (256, 256) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[:90].eq(1).all()                      # eyes and nose kept
    assert m[100, 40] == 0 and m[100, 128] == 1    # cheeks regenerated, the nose between them kept
    assert m[200, 128] == 0 and m[250, 128] == 1   # mouth / chin regenerated, the border kept
    assert 0.39 < float(1 - m.mean()) < 0.42       # the official mask covers 40.7 %
    assert (mouth_mask(512)[0, ::2, ::2] != m).float().mean() < 0.005    # the same shape (up to edge pixels)


def test_loop_and_fill():
    assert loop_indices(4, 3).tolist() == [0, 1, 2]
    assert loop_indices(3, 8).tolist() == [0, 1, 2, 2, 1, 0, 0, 1]       # forward, backward, forward
    boxes = np.array([[np.nan] * 4, [0, 0, 1, 1], [np.nan] * 4, [np.nan] * 4, [5, 5, 6, 6]], np.float32)
    filled, n = fill_missing(boxes)
    assert n == 3 and filled[:, 0].tolist() == [0, 0, 0, 5, 5]


# --------------------------------------------------------------------------------- user paths
def test_build_from_user_paths(tmp_path):
    """The real loading path: UNet YAML + latentsync_unet.pt, a transformers Whisper folder, a
    diffusers VAE folder (tiny instances saved as the official files are laid out)."""
    import dataclasses

    import yaml
    from transformers import WhisperModel

    from dualforce_mega.baselines.latentsync.build import BuildSpec, build_lipsync
    from dualforce_mega.baselines.latentsync.tiny import tiny_unet_config, tiny_vae

    def plain(x):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else list(x) if isinstance(x, tuple) else x

    cfg = tiny_unet_config()
    (tmp_path / "unet.yaml").write_text(yaml.safe_dump(
        {"data": {"num_frames": 4, "resolution": 32}, "model": plain(dataclasses.asdict(cfg))}))
    unet = LatentSyncUNet(cfg)
    torch.save({"state_dict": unet.state_dict(), "global_step": 5}, tmp_path / "latentsync_unet.pt")
    wcfg = tiny_whisper().config
    wcfg.update(dict(vocab_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                     begin_suppress_tokens=None, max_target_positions=8))
    whisper = WhisperModel(wcfg)
    whisper.save_pretrained(tmp_path / "whisper")
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    pipe = build_lipsync(BuildSpec(str(tmp_path / "unet.yaml"), str(tmp_path / "latentsync_unet.pt"),
                                   whisper=str(tmp_path / "whisper"), vae=str(tmp_path / "vae"), steps=2))
    assert (pipe.opt.num_frames, pipe.opt.resolution, pipe.opt.steps) == (4, 32, 2)
    for name, model, ref in (("unet", pipe.unet, unet), ("whisper", pipe.whisper.encoder, whisper.get_encoder()),
                             ("vae", pipe.vae, vae)):
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items()), name
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.vae.config.shift_factor == 0
    with pytest.raises(ValueError, match="missing"):
        build_lipsync(BuildSpec(str(tmp_path / "unet.yaml"), str(tmp_path / "latentsync_unet.pt")))
    with pytest.raises(FileNotFoundError, match="--vae nowhere"):
        build_lipsync(BuildSpec(str(tmp_path / "unet.yaml"), str(tmp_path / "latentsync_unet.pt"),
                                whisper=str(tmp_path / "whisper"), vae="nowhere"))
