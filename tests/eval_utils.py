"""Inputs for the evaluation tests: reference images and speech-like audio with matching names."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from PIL import Image


def write_pairs(folder: Path, stems: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{stem}.png")
        t = np.arange(16000) / 16000
        x = (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) * 32767).astype(np.int16)
        with wave.open(str(folder / f"{stem}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(x.tobytes())
    return folder
