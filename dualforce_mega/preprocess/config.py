"""Configuration of the raw-video pipeline (``data_tools.prepare``): one dataclass per concern, with
every threshold in one place; ``PrepareConfig.from_yaml`` reads overrides from a YAML file."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

MODES = ("talking-head", "video")


@dataclass
class ClipConfig:
    """Step 01: decode, scene cuts, face track, one fixed square crop per clip."""
    size: int = 512                   # output crop side (pixels)
    fps: int = 25
    sample_rate: int = 16000
    min_seconds: float = 2.0          # shorter face runs / scenes are dropped (reason too_short)
    max_seconds: float = 20.0         # longer ones are split
    scene_threshold: float = 27.0     # PySceneDetect ContentDetector threshold
    scene_side: int = 128             # short side of the frames the scene detector sees
    detector: str = "haar"
    detector_weights: Optional[str] = None
    detect_every: int = 5             # run the face detector on every k-th frame (tracks interpolate)
    detect_side: int = 256            # short side of the frames the face detector sees
    crop_scale: float = 1.8           # crop side / face box side
    max_gap_seconds: float = 0.5      # longer face dropouts end a clip
    chunk: int = 32                   # frames decoded per chunk
    crf: int = 12                     # H.264 quality of the intermediate crops (near lossless)
    aligned: bool = False             # inputs are already aligned face crops (VFHQ-512): no detection


@dataclass
class QualityConfig:
    """Step 02 thresholds; every score is kept in the clip metadata whether it passes or not."""
    min_sharpness: float = 20.0       # variance of the Laplacian of the grey crop at 256 px
    min_face_frac: float = 0.06       # face side / source frame short side
    min_continuity: float = 0.7       # fraction of examined frames where the face was detected
    max_centre_offset: float = 0.1    # face centre distance from the crop centre / crop side
    min_speech_frac: float = 0.3      # silero-vad speech fraction of the clip
    vad_threshold: float = 0.5
    min_sync_confidence: float = 1.0  # SyncNet confidence (only when SyncNet weights are given)
    sample_frames: int = 16           # frames per clip used for the sharpness score


@dataclass
class PrepareConfig:
    mode: str = "talking-head"
    clip: ClipConfig = field(default_factory=ClipConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dataset: Optional[str] = None     # default: the input's first folder under --src (or "raw")
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)   # train / val / test by subject
    split_seed: int = 0
    latent_batch: int = 4             # equally long clips per VAE call (and reference images per call)
    ref_every: int = 4                # single-image reference encodings every k latent frames
    max_shard_bytes: int = 1 << 30
    min_shards: int = 1               # spread a small split over at least this many shards (data-parallel ranks)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {MODES}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions: {self.split_fractions} must sum to 1")

    @classmethod
    def from_yaml(cls, path: Union[str, Path], **overrides: Any) -> "PrepareConfig":
        import yaml
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict({**raw, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> "PrepareConfig":
        def build(kind, data: dict, where: str):
            names = {f.name: f for f in dataclasses.fields(kind)}
            kwargs = {}
            for k, v in data.items():
                if k not in names:
                    raise ValueError(f"{source}: unknown key {where}{k} (expected one of {sorted(names)})")
                sub = {"clip": ClipConfig, "quality": QualityConfig}.get(k) if kind is cls else None
                kwargs[k] = build(sub, v, f"{where}{k}.") if sub else (tuple(v) if isinstance(v, list) else v)
            return kind(**kwargs)
        return build(cls, raw, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ = ["MODES", "ClipConfig", "QualityConfig", "PrepareConfig"]
