"""eval.generate end to end on random tiny encoders: mp4 frames + audio track, latents, batch mode,
streaming VAE decode == one-shot decode, cache == recompute through the CLI."""
from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eval.batch import parse_batch
from dualforce_mega.encoders import SpeechEncoder, WanVAE, tiny_audio_encoder, tiny_vae
from eval.generate import main
from dualforce_mega.media import load_audio

FPS = 25
AAC_FRAME = 1024  # samples per AAC frame: the encoder pads the last one
SIZE = ["--height", "32", "--width", "32"]


pytestmark = pytest.mark.usefixtures("single_thread")

def write_inputs(folder: Path, stem: str, seconds: float, rate: int = 22050) -> tuple[Path, Path]:
    rng = np.random.default_rng(len(stem))
    image = folder / f"{stem}.png"
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(image)
    t = np.arange(int(rate * seconds)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    audio = folder / f"{stem}.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.stack([x, x], 1).tobytes())
    return image, audio


def probe(path: Path) -> tuple[int, float, int]:
    """(decoded video frames, audio stream duration in s, audio sample rate)."""
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        duration = float(a.duration * a.time_base)
        rate = a.rate
        frames = sum(1 for _ in c.decode(video=0))
    return frames, duration, rate


def test_mp4_frames_audio_and_latents(tmp_path):
    image, audio = write_inputs(tmp_path, "a", seconds=1.0)
    out, lat = tmp_path / "out.mp4", tmp_path / "lat.safetensors"
    motion = np.linspace(-1, 1, 70, dtype=np.float32)
    np.save(tmp_path / "motion.npy", motion)
    np.savetxt(tmp_path / "kp.txt", np.zeros(63))
    frames = 10  # -> 1 + ceil(9/4) = 4 latent frames covering 13 video frames; 10 written
    assert main(["--ref", str(image), "--audio", str(audio), "--out", str(out), "--random-preset", "tiny",
                 "--frames", str(frames), "--steps", "1", "--save-latents", str(lat), "--quiet", *SIZE,
                 "--ref-motion", str(tmp_path / "motion.npy"), "--kp-canonical", str(tmp_path / "kp.txt")]) == 0
    n, duration, rate = probe(out)
    assert n == frames
    assert abs(duration - frames / FPS) <= AAC_FRAME / rate
    tensors = load_file(str(lat))
    assert set(tensors) == {"video_latent", "struct"}
    assert tensors["video_latent"].shape == (16, 4, 4, 4)
    assert tensors["struct"].shape == (frames, 70)
    assert torch.equal(tensors["struct"][0], torch.from_numpy(motion))  # the given reference motion, pinned
    assert not (tmp_path / "out.partial.mp4").exists()


def write_trained_bundle(folder: Path):
    """A bundle of the tiny preset whose zero-initialised parts (output heads, gates) are random, as in a
    trained model: the velocity is non-zero and every frame depends on its history. (``--random-preset
    tiny`` predicts velocity 0, so any two sampling paths return the same initial noise.)"""
    import json

    from safetensors.torch import save_file

    from dualforce_mega.config import build_config
    from dualforce_mega.models.dualforce import DualForceModel

    torch.manual_seed(0)
    cfg = build_config({"model": {"preset": "tiny"}})
    model = DualForceModel(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.1)
    vae, speech = tiny_vae(), tiny_audio_encoder(cfg.model.audio_dim)
    bundle = folder / "bundle"
    bundle.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bundle / "model.safetensors"))
    (bundle / "config.json").write_text(json.dumps(cfg.to_dict()))
    vae.save_pretrained(str(bundle / "vae"))
    speech.save_pretrained(str(bundle / "audio_encoder"))
    return bundle, model, cfg, vae, speech


def test_cli_kv_cache_equals_recompute(tmp_path):
    bundle, *_ = write_trained_bundle(tmp_path)
    image, audio = write_inputs(tmp_path, "a", seconds=0.5)
    common = ["--ref", str(image), "--audio", str(audio), "--bundle", str(bundle), "--steps", "2",
              "--window-blocks", "2", "--quiet", *SIZE]
    main(common + ["--out", str(tmp_path / "c.mp4"), "--save-latents", str(tmp_path / "c.st")])
    main(common + ["--out", str(tmp_path / "r.mp4"), "--save-latents", str(tmp_path / "r.st"), "--no-kv-cache"])
    c, r = load_file(str(tmp_path / "c.st")), load_file(str(tmp_path / "r.st"))
    # frames default to the audio length: 0.5 s -> 12 frames -> 4 latent frames
    assert c["video_latent"].shape[1] == 4 and probe(tmp_path / "c.mp4")[0] == 12
    for k in c:
        assert (c[k] - r[k]).abs().max() < 1e-5


def test_batch_folder_and_list(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_inputs(src, "p1", seconds=0.3)
    write_inputs(src, "p2", seconds=0.2)
    out_dir = tmp_path / "out"
    main(["--batch", str(src), "--out-dir", str(out_dir), "--random-preset", "tiny", "--steps", "1", "--quiet",
          *SIZE])
    assert probe(out_dir / "p1.mp4")[0] == 7 and probe(out_dir / "p2.mp4")[0] == 5
    # a broken pair fails alone: the others are written, the exit code says so
    (src / "p3.png").write_bytes(b"not an image")
    (src / "p3.wav").write_bytes((src / "p2.wav").read_bytes())
    (out_dir / "p1.mp4").unlink()
    assert main(["--batch", str(src), "--out-dir", str(out_dir), "--random-preset", "tiny", "--steps", "1",
                 "--quiet", *SIZE]) == 1
    assert (out_dir / "p1.mp4").is_file() and not (out_dir / "p3.mp4").exists()
    listing = tmp_path / "pairs.txt"
    listing.write_text("# image audio name\nin/p1.png in/p2.wav\nin/p2.png, in/p2.wav, second\n")
    jobs = parse_batch(str(listing))
    assert [j.name for j in jobs] == ["p1__p2", "second"]
    listing.write_text("in/p1.png in/missing.wav\n")
    with pytest.raises(FileNotFoundError, match=r"pairs.txt:1: .*missing.wav"):
        parse_batch(str(listing))


def test_streaming_decode_equals_full_decode():
    torch.manual_seed(0)
    vae = WanVAE(tiny_vae())
    latent = torch.randn(1, 16, 5, 4, 4)
    with torch.no_grad():
        full = vae.vae.decode(latent * vae.std + vae.mean).sample
    dec = vae.decoder()
    pieces = torch.cat([dec.decode(latent[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 5))], dim=2)
    assert pieces.shape == full.shape == (1, 3, 17, 32, 32)
    assert (pieces - full).abs().max() < 1e-5


def test_speech_features_aligned():
    torch.manual_seed(0)
    enc = SpeechEncoder(tiny_audio_encoder(32))
    frames = 13
    wav = torch.randn(frames * 16000 // FPS)
    feats = enc.encode(wav, frames, FPS, per_frame=2)
    assert feats.shape == (2 * frames, 32)
    whole = enc.hidden_states(wav)
    assert whole.shape[0] == (wav.numel() - 400) // 320 + 1  # HuBERT's conv front end: 25 ms window, 20 ms hop
    # one segment covering the clip is the plain encoder call
    assert torch.equal(SpeechEncoder(enc.model, segment_s=1.0).hidden_states(wav), whole)
    # segmented (long audio): every segment contributes its own hops, so the time axis stays aligned
    seg = SpeechEncoder(enc.model, segment_s=0.2, context_s=0.1)
    segments = -(-wav.numel() // seg.segment)
    assert abs(seg.hidden_states(wav).shape[0] - whole.shape[0]) <= segments
    assert seg.encode(wav, frames, FPS, per_frame=2).shape == feats.shape


def test_bad_inputs_name_the_file(tmp_path):
    image, audio = write_inputs(tmp_path, "a", seconds=0.2)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio")
    with pytest.raises(ValueError, match="broken.wav"):
        load_audio(bad, 16000)
    np.savetxt(tmp_path / "kp.txt", np.zeros(62))
    with pytest.raises(ValueError, match=r"kp.txt: --kp-canonical needs shape \(63,\)"):
        main(["--ref", str(image), "--audio", str(audio), "--out", str(tmp_path / "x.mp4"), "--random-preset",
              "tiny", "--quiet", "--kp-canonical", str(tmp_path / "kp.txt"), *SIZE])
    with pytest.raises(ValueError, match="broken.wav"):
        main(["--ref", str(bad), "--audio", str(audio), "--out", str(tmp_path / "x.mp4"),
              "--random-preset", "tiny", "--quiet", *SIZE])


def test_bundle_path_matches_in_memory_pipeline(tmp_path):
    """--bundle loads DiT weights + config, BUNDLE/vae and BUNDLE/audio_encoder from disk; the
    result equals generating with the same objects in memory."""
    from eval.batch import Job
    from eval.pipeline import GenerateOptions, Pipeline, generate_one

    bundle, model, cfg, vae, speech = write_trained_bundle(tmp_path)
    image, audio = write_inputs(tmp_path, "a", seconds=0.3)
    lat_cli = tmp_path / "cli.safetensors"
    assert main(["--ref", str(image), "--audio", str(audio), "--out", str(tmp_path / "cli.mp4"), "--bundle",
                 str(bundle), "--steps", "2", "--save-latents", str(lat_cli), "--quiet", *SIZE]) == 0
    cfg.diffusion.sample_steps = 2
    pipe = Pipeline(model, cfg, WanVAE(vae), SpeechEncoder(speech), 32, 32)
    lat_mem = tmp_path / "mem.safetensors"
    generate_one(pipe, Job(image, audio, "a"), tmp_path / "mem.mp4",
                 GenerateOptions(save_latents=lat_mem, progress=False))
    a, b = load_file(str(lat_cli)), load_file(str(lat_mem))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5
    assert a["video_latent"][:, 1:].abs().mean() > 0.1


def _decoded_frames(path: Path) -> list[np.ndarray]:
    """Frames decodable from ``path`` now ([] while the header -- written with the first fragment -- is missing)."""
    try:
        with av.open(str(path)) as c:
            return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except av.error.InvalidDataError:
        return []


def test_stream_mp4_playable_while_generating(tmp_path):
    """--stream writes the mp4 in place as it goes: read while the generator is suspended after a
    chunk, the file already decodes to the first frames -- the same frames the finished file starts with."""
    from eval.batch import Job
    from eval.pipeline import GenerateOptions, PipelineSpec, build_pipeline, generate_one

    image, audio = write_inputs(tmp_path, "s", seconds=1.2)
    out = tmp_path / "stream.mp4"
    pipe = build_pipeline(PipelineSpec(random_preset="tiny", height=32, width=32,
                                       diffusion={"sample_steps": 1, "window_blocks": 2}))
    seen = []

    def on_chunk(written: int) -> None:
        seen.append((written, _decoded_frames(out) if out.exists() else []))

    info = generate_one(pipe, Job(image, audio, "s"), out, GenerateOptions(stream=True, on_chunk=on_chunk,
                                                                          progress=False))
    final = _decoded_frames(out)
    assert len(final) == info["frames"] == 30
    # mid-generation (not the last chunk), the partial file already held decodable frames
    partial = [(w, frames) for w, frames in seen[:-1] if frames]
    assert partial, [(w, len(f)) for w, f in seen]
    for written, frames in partial:
        assert len(frames) <= written < len(final)
        for a, b in zip(frames, final):
            assert np.array_equal(a, b)
    assert 0 < info["reference_frame_s"] <= info["first_frame_s"] <= info["total_s"]
    assert not list(tmp_path.glob("*.partial*"))


def test_stream_cli_reports_latency(tmp_path, capsys):
    image, audio = write_inputs(tmp_path, "c", seconds=0.5)
    out = tmp_path / "c.mp4"
    assert main(["--ref", str(image), "--audio", str(audio), "--out", str(out), "--random-preset", "tiny",
                 "--steps", "1", "--window-blocks", "2", "--stream", "--quiet", *SIZE]) == 0
    assert "first generated frame" in capsys.readouterr().out
    with av.open(str(out)) as c:
        rate = c.streams.audio[0].rate
        samples = sum(f.samples for f in c.decode(audio=0))
    assert len(_decoded_frames(out)) == 12
    assert abs(samples / rate - 12 / FPS) <= AAC_FRAME / rate  # audio in sync: encoder delay trimmed
