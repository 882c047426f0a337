"""Streaming media io with PyAV: anything ffmpeg reads -> constant-fps RGB frames in chunks and 16 kHz
mono audio; cropped clips written back as mp4 + wav. Memory never grows with the input's length:
frames are decoded, resampled and handed on one chunk at a time, audio is streamed into a wav file.
"""
from __future__ import annotations

import logging
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

PCM_BYTES = 2              # int16 wav samples
PCM_SCALE = 32767.0


class MediaError(ValueError):
    """An input that cannot be used; ``reason`` is the manifest's short reason code."""

    def __init__(self, path: Union[str, Path], reason: str, detail: str):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}: {detail}")


@dataclass
class MediaInfo:
    path: str
    duration: float          # seconds (of the video stream when there is one)
    width: int
    height: int
    fps: float               # source average frame rate
    has_audio: bool


def probe(path: Union[str, Path]) -> MediaInfo:
    """Open ``path`` and describe its streams; :class:`MediaError` ``unreadable`` / ``no_video``."""
    import av
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError(path, "no_video", "no video stream")
            vs = c.streams.video[0]
            if vs.duration is not None and vs.time_base is not None:
                duration = float(vs.duration * vs.time_base)
            elif c.duration is not None:
                duration = c.duration / 1e6
            else:
                duration = 0.0
            fps = float(vs.average_rate) if vs.average_rate else 0.0
            return MediaInfo(str(path), duration, vs.codec_context.width, vs.codec_context.height, fps,
                             bool(c.streams.audio))
    except MediaError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise MediaError(path, "unreadable", f"{type(e).__name__}: {e}") from None


def iter_frames(path: Union[str, Path], fps: float, chunk: int = 32, max_side: Optional[int] = None
                ) -> Iterator[np.ndarray]:
    """Constant-``fps`` uint8 RGB chunks ``[<=chunk, H, W, 3]`` of the first video stream.

    Output frame k shows the source frame on screen at time k / fps (the last frame whose timestamp
    is <= k / fps, like ffmpeg's fps filter), so variable or different frame rates resample to a
    fixed grid. ``max_side`` downscales (keeping aspect) so the short side is at most that many
    pixels (for scanning). Decode errors mid-stream end the stream with a :class:`MediaError`."""
    import av
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise MediaError(path, "unreadable", f"{type(e).__name__}: {e}") from None
    with container:
        if not container.streams.video:
            raise MediaError(path, "no_video", "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_rate = float(stream.average_rate or fps)
        size: Optional[tuple[int, int]] = None
        buf: list[np.ndarray] = []
        k = 0                          # next output frame index
        prev: Optional[np.ndarray] = None
        prev_t = 0.0
        t0: Optional[float] = None     # timestamps count from the first frame (streams may start late)
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / src_rate
                t0 = t if t0 is None else t0
                t -= t0
                if size is None:
                    size = _scaled_size(frame.width, frame.height, max_side)
                img = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                if prev is None:
                    prev, prev_t = img, t
                    continue
                while k / fps < t - 1e-6:          # output frames shown before this frame starts
                    buf.append(prev)
                    k += 1
                    if len(buf) == chunk:
                        yield np.stack(buf)
                        buf = []
                prev, prev_t = img, t
        except av.FFmpegError as e:
            raise MediaError(path, "decode_error", f"{type(e).__name__}: {e}") from None
        if prev is not None:
            end = prev_t + 1.0 / src_rate
            while k / fps < end - 1e-6:
                buf.append(prev)
                k += 1
                if len(buf) == chunk:
                    yield np.stack(buf)
                    buf = []
        if buf:
            yield np.stack(buf)


def _scaled_size(w: int, h: int, max_side: Optional[int]) -> tuple[int, int]:
    if max_side is None or min(w, h) <= max_side:
        return w, h
    s = max_side / min(w, h)
    return max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2)


def decode_audio(path: Union[str, Path], out_wav: Union[str, Path], sample_rate: int = 16000) -> int:
    """Stream the first audio stream into a mono int16 wav at ``sample_rate``, aligned so sample 0 is
    at the first video frame's timestamp (leading audio dropped, a late start padded with silence);
    returns the sample count. :class:`MediaError` ``no_audio`` when there is none."""
    import av
    with av.open(str(path)) as c:
        if not c.streams.audio:
            raise MediaError(path, "no_audio", "no audio stream")
        video_start = 0.0
        if c.streams.video and c.streams.video[0].start_time is not None:
            vs = c.streams.video[0]
            video_start = float(vs.start_time * vs.time_base)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        n = 0
        skip: Optional[int] = None   # samples still to drop (audio starting before the video)
        with wave.open(str(out_wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(PCM_BYTES)
            w.setframerate(sample_rate)

            def put(frames) -> None:
                nonlocal n, skip
                for r in frames:
                    data = r.to_ndarray().reshape(-1).astype("<i2")
                    if skip is None:
                        lead = round(((r.time or 0.0) - video_start) * sample_rate)
                        if lead > 0:
                            w.writeframes(np.zeros(lead, "<i2").tobytes())
                            n += lead
                        skip = max(0, -lead)
                    cut = min(skip, data.size)
                    data, skip = data[cut:], skip - cut
                    w.writeframes(data.tobytes())
                    n += data.size
            try:
                for frame in c.decode(c.streams.audio[0]):
                    put(resampler.resample(frame))
                put(resampler.resample(None))
            except av.FFmpegError as e:
                raise MediaError(path, "decode_error", f"audio: {type(e).__name__}: {e}") from None
    return n


def read_wav(path: Union[str, Path], start: int = 0, count: Optional[int] = None) -> tuple[np.ndarray, int]:
    """float32 mono samples [start, start + count) in [-1, 1] (zero-padded past the end) and the rate."""
    with wave.open(str(path)) as w:
        if w.getnchannels() != 1 or w.getsampwidth() != PCM_BYTES:
            raise ValueError(f"{path}: expected mono 16-bit wav")
        total = w.getnframes()
        count = total - start if count is None else count
        w.setpos(min(start, total))
        data = np.frombuffer(w.readframes(max(0, min(count, total - start))), "<i2").astype(np.float32)
        rate = w.getframerate()
    if data.size < count:
        data = np.pad(data, (0, count - data.size))
    return data / PCM_SCALE, rate


def write_wav(path: Union[str, Path], samples: np.ndarray, sample_rate: int) -> None:
    pcm = np.clip(np.round(samples * PCM_SCALE), -PCM_SCALE, PCM_SCALE).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(PCM_BYTES)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


class ClipWriter:
    """Streams uint8 RGB frames into an H.264 mp4 (near-lossless: ``crf``) at a constant frame rate."""

    def __init__(self, path: Union[str, Path], fps: int, size: tuple[int, int], crf: int = 12):
        import av
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps), options={"crf": str(crf)})
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        import av
        for f in frames:
            for p in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                self.container.mux(p)
        self.frames += len(frames)

    def close(self) -> None:
        for p in self.stream.encode():
            self.container.mux(p)
        self.container.close()


def read_clip(path: Union[str, Path]) -> np.ndarray:
    """All frames of a (short, already 25 fps) clip as uint8 RGB [T, H, W, 3]."""
    import av
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


__all__ = ["MediaError", "MediaInfo", "probe", "iter_frames", "decode_audio", "read_wav", "write_wav",
           "ClipWriter", "read_clip"]
