"""Media I/O: reference image, speech audio, and a streaming mp4 writer (used by eval.generate and the baselines).

The writer muxes video (H.264 via libx264, else MPEG-4 Part 2) and audio (AAC) incrementally:
each batch of frames written is followed by the audio samples up to the same time, so nothing
needs the whole clip in memory and the streams stay interleaved.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import av
import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

VIDEO_CODECS = ("libx264", "h264", "mpeg4")
AUDIO_CODEC = "aac"


def load_image(path: Union[str, Path], height: int, width: int) -> torch.Tensor:
    """RGB image -> [3, height, width] in [-1, 1]: scaled to cover the target, then center-cropped."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    scale = max(height / img.height, width / img.width)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def load_audio(path: Union[str, Path], sample_rate: int) -> torch.Tensor:
    """Any audio file PyAV can read -> mono float32 [samples] at ``sample_rate``."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot open audio ({e})") from e
    with container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts = []
        for frame in container.decode(audio=0):
            parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    if not parts:
        raise ValueError(f"{path}: audio stream is empty")
    return torch.from_numpy(np.concatenate(parts).astype(np.float32))


def fit_length(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """Trim, or pad with silence, to exactly ``samples``."""
    if wave.numel() >= samples:
        return wave[:samples]
    return torch.cat([wave, wave.new_zeros(samples - wave.numel())])


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    x = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


# fragmented mp4: a moov without samples, then a self-contained fragment (moof + mdat) per keyframe; the
# moov waits for the first fragment so it carries the AAC encoder delay (edit list: audio stays in sync)
FRAGMENTED_MOVFLAGS = "frag_keyframe+empty_moov+delay_moov+default_base_moof"


class Mp4Writer:
    """Streaming mp4 writer; ``audio`` (mono float32 at ``sample_rate``) is muxed alongside.

    ``fragment_frames`` > 0 writes a fragmented mp4 that is playable while it grows: a keyframe (and a
    fragment) every ``fragment_frames`` frames, no encoder lookahead (x264 ``zerolatency``), packets
    flushed to the file as they come, and the audio muxed one fragment ahead so the muxer never holds
    video back to interleave it. A fragment appears in the file when the next one starts (or at close).
    """

    def __init__(self, path: Union[str, Path], fps: int, height: int, width: int,
                 audio: Optional[torch.Tensor] = None, sample_rate: int = 16000, crf: int = 18,
                 fragment_frames: int = 0):
        if height % 2 or width % 2:
            raise ValueError(f"{path}: frame size {height}x{width} must be even for yuv420p")
        self.path = Path(path)
        self.fps = fps
        self.fragment_frames = fragment_frames
        options = {"movflags": FRAGMENTED_MOVFLAGS, "flush_packets": "1"} if fragment_frames else {}
        self.container = av.open(str(self.path), mode="w", options=options)
        self.video = self._video_stream(fps, height, width, crf)
        self.audio = None
        self.wave = None
        if audio is not None:
            self.audio = self.container.add_stream(AUDIO_CODEC, rate=sample_rate, layout="mono")
            self.wave = audio.detach().float().cpu().numpy()
            self.sample_rate = sample_rate
        self.frames = 0
        self.samples = 0

    def _video_stream(self, fps: int, height: int, width: int, crf: int):
        for name in VIDEO_CODECS:
            try:
                stream = self.container.add_stream(name, rate=fps)
            except (av.FFmpegError, ValueError):
                continue
            stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
            if name == "libx264":
                stream.options = {"crf": str(crf), **({"tune": "zerolatency"} if self.fragment_frames else {})}
            if self.fragment_frames:
                stream.codec_context.gop_size = self.fragment_frames
            if name != VIDEO_CODECS[0]:
                log.warning("%s: libx264 unavailable, writing %s video", self.path, name)
            return stream
        raise RuntimeError(f"{self.path}: none of the video encoders {VIDEO_CODECS} is available")

    def write(self, frames: np.ndarray) -> None:
        """frames [T, H, W, 3] uint8."""
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            self.container.mux(self.video.encode(frame))
        self.frames += len(frames)
        self._write_audio_until(self.frames + self.fragment_frames)

    def _write_audio_until(self, frames: int) -> None:
        if self.audio is None:
            return
        end = min(round(frames * self.sample_rate / self.fps), len(self.wave))
        if end <= self.samples:
            return
        frame = av.AudioFrame.from_ndarray(self.wave[None, self.samples:end], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples
        self.container.mux(self.audio.encode(frame))
        self.samples = end

    def close(self) -> None:
        self._write_audio_until(self.frames)
        self.container.mux(self.video.encode(None))
        if self.audio is not None:
            self.container.mux(self.audio.encode(None))
        self.container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
