"""Small real-media inputs for the preprocessing tests: a talking-head video made from a real photo
(scikit-image's astronaut) with planted head motion, speech from espeak-ng, and bad inputs."""
from __future__ import annotations

import math
import shutil
import subprocess
import wave
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

FACE_CENTRE = (225.0, 114.0)   # astronaut(): Haar face box centre (x, y) in the 512x512 photo
SPEECH = "The quick brown fox jumps over the lazy dog while the astronaut keeps talking to us."


def head_motion(num_frames: int, fps: int = 25, shift: float = 12.0, angle: float = 10.0) -> np.ndarray:
    """Planted motion [T, 3]: dx, dy (pixels of the 512x512 photo) and in-plane roll (degrees),
    smooth sinusoids (a talking head's range: the face moves by about 1/8 of its size)."""
    t = np.arange(num_frames) / fps
    return np.stack([shift * np.sin(2 * math.pi * 0.4 * t), 0.5 * shift * np.sin(2 * math.pi * 0.3 * t + 1.0),
                     angle * np.sin(2 * math.pi * 0.5 * t)], axis=1)


def face_frames(num_frames: int, size: int = 256, fps: int = 25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 RGB [T, size, size, 3] of the astronaut moving by :func:`head_motion`, the motion, and the
    true face centre per frame [T, 2] in output pixels."""
    import cv2
    from skimage.data import astronaut
    img = astronaut()
    s = size / img.shape[0]
    motion = head_motion(num_frames, fps)
    frames, centres = [], []
    for dx, dy, roll in motion:
        m = cv2.getRotationMatrix2D(FACE_CENTRE, roll, 1.0)
        m[:, 2] += (dx, dy)
        m = m * s
        frames.append(cv2.warpAffine(img, m, (size, size), borderMode=cv2.BORDER_REFLECT))
        centres.append(m[:, :2] @ np.array(FACE_CENTRE) + m[:, 2])
    return np.stack(frames), motion, np.asarray(centres)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speech_wav(path: Path, text: str = SPEECH) -> Path:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
        return data.reshape(-1, w.getnchannels()).mean(1), w.getframerate()


def write_video(path: Path, frames, fps: float = 25, audio: Optional[np.ndarray] = None,
                sample_rate: int = 22050, codec: str = "libx264", size: Optional[tuple[int, int]] = None) -> Path:
    """Encode frames (an array or an iterable of [H, W, 3] uint8 with ``size`` = (H, W)) and mono
    float audio in [-1, 1] with PyAV."""
    import av
    rate = Fraction(fps).limit_denominator(1001)
    h, w = size or frames.shape[1:3]
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=rate, options={"preset": "ultrafast"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        a_s = None
        if audio is not None:
            a_s = out.add_stream("aac", rate=sample_rate)
            a_s.layout = "mono"
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        if a_s is not None:
            pcm = np.clip(audio, -1, 1).astype(np.float32)[None]
            af = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
            af.sample_rate = sample_rate
            for p in a_s.encode(af):
                out.mux(p)
            for p in a_s.encode():
                out.mux(p)
    return path


def talking_video(path: Path, seconds: float, size: int = 256, fps: float = 25, silent: bool = False) -> Path:
    """The astronaut talking: planted head motion, espeak-ng speech (looped to length) or silence."""
    n = round(seconds * fps)
    frames, _, _ = face_frames(n, size, fps=round(fps))
    speech, sr = read_wav(speech_wav(path.with_suffix(".speech.wav")))
    path.with_suffix(".speech.wav").unlink()
    total = round(seconds * sr)
    audio = np.zeros(total, np.float32) if silent else np.resize(speech, total)
    return write_video(path, frames, fps, audio, sr)


def long_face_video(path: Path, seconds: float, size: int = 128, fps: int = 5) -> Path:
    """A cheap long talking video made by the ffmpeg CLI (use a .mkv path): the astronaut still image
    at ``size`` px and ``fps`` (the pipeline resamples to 25) with looped espeak-ng speech as PCM."""
    import cv2
    from skimage.data import astronaut
    img = path.with_suffix(".png")
    cv2.imwrite(str(img), cv2.cvtColor(cv2.resize(astronaut(), (size, size), interpolation=cv2.INTER_AREA),
                                       cv2.COLOR_RGB2BGR))
    wav = speech_wav(path.with_suffix(".speech.wav"))
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-loop", "1", "-framerate", str(fps), "-i", str(img),
                    "-stream_loop", "-1", "-i", str(wav), "-t", str(seconds), "-c:v", "libx264",
                    "-preset", "ultrafast", "-tune", "stillimage", "-pix_fmt", "yuv420p", "-c:a", "pcm_s16le",
                    str(path)], check=True)
    img.unlink()
    wav.unlink()
    return path


def noise_video(path: Path, seconds: float, size: int = 96, fps: int = 25, with_speech: bool = True) -> Path:
    """Moving colour gradients (no face), with speech or without an audio stream."""
    n = round(seconds * fps)
    y, x = np.mgrid[0:size, 0:size] / size
    frames = np.stack([np.stack([(x + i / n) % 1, (y * 0.7 + 0.1 * math.sin(i / 5)) % 1, 0.5 * (x + y) % 1], -1)
                       for i in range(n)])
    frames = (frames * 255).astype(np.uint8)
    audio, sr = None, 22050
    if with_speech:
        speech, sr = read_wav(speech_wav(path.with_suffix(".speech.wav")))
        path.with_suffix(".speech.wav").unlink()
        audio = np.resize(speech, round(seconds * sr))
    return write_video(path, frames, fps, audio, sr)


def bad_inputs(root: Path, good: Path) -> dict[str, str]:
    """Write the bad inputs under ``root``; returns input file name -> the reason the pipeline must give."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.mp4").write_bytes(good.read_bytes()[:3000])            # truncated: no moov atom
    (root / "notes.md").write_text("not a video\n")
    speech_wav(root / "speech_only.wav")
    frames, _, _ = face_frames(60, size=160)
    write_video(root / "mute.mp4", frames)                                   # no audio stream
    noise_video(root / "noface.mp4", 3.0)
    talking_video(root / "silent.mp4", 3.0, size=160, silent=True)
    talking_video(root / "short.mp4", 1.0, size=160)
    return {"corrupt.mp4": "unreadable", "notes.md": "unreadable", "speech_only.wav": "no_video",
            "mute.mp4": "no_audio", "noface.mp4": "no_face", "silent.mp4": "silent", "short.mp4": "too_short"}


def train_losses(script: str, shards: Path, run_dir: Path, steps: int = 2) -> list[float]:
    """Run ``bash launch/<script> --nproc 1`` on ``shards`` for ``steps`` steps; the logged losses."""
    repo = Path(__file__).resolve().parents[1]
    cmd = ["bash", f"launch/{script}", "--nproc", "1", "--set", f"data.shards={shards}", "--set", f"train.steps={steps}",
           "--set", "train.global_batch=1", "--set", "train.micro_batch=1", "--set", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [float(line.split(" loss ")[1].split()[0]) for line in (proc.stdout + proc.stderr).splitlines()
            if "step " in line and " loss " in line]
