"""Throughput of the data pipeline's network steps at their real sizes (random weights: the cost does
not depend on the values): step 04 LivePortrait motion extractor (ConvNeXt-V2-tiny, 256x256), step 05
EMOCA (two ResNet-50, 224x224), step 06 HuBERT-base (30 s segments), each through the same runner
the pipeline uses, batched on the device. Prints video frames/s (audio: seconds of speech/s) and the
real-time factor at 25 fps.

    python benchmarks/bench_preprocess.py                         # CPU: a few frames, ~1 min
    python benchmarks/bench_preprocess.py --device cuda --frames 512 --batch 64,128
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from common import device_name, markdown_table, time_fn  # noqa: I100
from dualforce_mega.encoders.emoca import EmocaConfig, EmocaEncoder
from dualforce_mega.encoders.liveportrait import LivePortraitMotionExtractor
from dualforce_mega.encoders.speech import AUDIO_SAMPLE_RATE, SpeechEncoder
from dualforce_mega.preprocess.audio_features import extract_audio_features
from dualforce_mega.preprocess.flame import EmocaRunner
from dualforce_mega.preprocess.motion import LivePortraitMotion
from dualforce_mega.preprocess.netutil import resolve_device

FPS, AUDIO_RATE = 25, 50
CROP = 512  # the pipeline's default crop side; each runner resizes to its network's input


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=16, help="video frames per measured call")
    ap.add_argument("--batch", default="8,16", help="comma list of batch sizes for the image networks")
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    frames = np.random.default_rng(0).integers(0, 256, size=(args.frames, CROP, CROP, 3), dtype=np.uint8)
    rows = []

    def record(step: str, batch: str, fn, seconds_of_video: float) -> None:
        ms = time_fn(fn, device, warmup=1, iters=args.iters).median_ms
        rows.append([step, batch, f"{args.frames / (ms / 1e3):.1f}", f"{seconds_of_video / (ms / 1e3):.2f}x"])

    lp = LivePortraitMotionExtractor().to(device)
    emoca = EmocaEncoder(EmocaConfig()).to(device)
    for b in (int(x) for x in args.batch.split(",")):
        runner = LivePortraitMotion(lp, batch_size=b)
        record("04 LivePortrait motion", str(b), lambda: runner(frames), args.frames / FPS)
        er = EmocaRunner(emoca, batch_size=b)
        record("05 EMOCA", str(b), lambda: er(frames), args.frames / FPS)
    del lp, emoca
    from transformers import HubertConfig, HubertModel
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    speech = SpeechEncoder(HubertModel(HubertConfig()).to(device, dtype))  # HuBERT-base geometry
    wave = torch.randn(args.frames * AUDIO_SAMPLE_RATE // FPS)
    record("06 HuBERT-base audio", "segment 30 s", lambda: extract_audio_features(speech, wave, args.frames, FPS,
                                                                              AUDIO_RATE), args.frames / FPS)
    print(f"device: {device_name(device)}; {args.frames} frames of {CROP}x{CROP} per call")
    print(markdown_table(["step", "batch", "video frames/s", "real time (25 fps)"], rows))


if __name__ == "__main__":
    main()
