"""The shard schema (DESIGN §5): the one definition of what a training sample on disk is.

One WebDataset sample per clip: ``<key>.safetensors`` holding the tensors below and
``<key>.json`` holding the clip metadata. Every dimension comes from :class:`ModelConfig`;
the symbolic sizes are related by

    N = 1 + stride * (F - 1)        video frames (struct / FLAME rows) for F latent frames
    A = N * audio_rate / fps        audio feature frames, absolute time from video frame 0
    R                               single-image reference encodings (optional, with ref_positions)

Reference frames: at inference the clean latent frame 0 is the VAE encoding of one image, while the
clip's latent frame t0 >= 1 encodes 4 video frames. ``ref_latent[r]`` is the single-image encoding of
video frame ``stride * ref_positions[r]`` (the last frame of latent frame t0, the frame a window starting
at t0 keeps, ``Timeline.reference_video_frame``); the loader starts windows only at those positions and
uses that encoding as the window's frame 0.

Validation works on *layouts* (dtype + shape per field) so the loader can check a sample from
its safetensors header alone, without decoding the tensors, and the writer checks the same
rules (plus finiteness) on real tensors.
"""
from __future__ import annotations

import json
import re
import struct as _struct
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import ModelConfig
from ..timeline import Timeline

SCHEMA_VERSION = 1
TENSOR_EXT = "safetensors"
META_EXT = "json"
# sample keys become tar member names "<key>.<ext>"; WebDataset splits the extension at the
# first dot of the basename, so keys may not contain dots
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
SPLITS = ("train", "val", "test")
GENDERS = ("female", "male", "unknown")
# safetensors header: little-endian u64 length, then that many bytes of JSON
_HEADER_LEN_BYTES = 8
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                       "U8": torch.uint8, "BOOL": torch.bool}


class SchemaError(ValueError):
    """A sample does not follow the shard schema; the message names shard, key and field."""

    def __init__(self, shard: str, key: str, field: str, problem: str):
        self.shard, self.key, self.field, self.problem = shard, key, field, problem
        super().__init__(f"{shard}: sample {key!r}: field {field!r}: {problem}")


@dataclass(frozen=True)
class FieldSpec:
    name: str
    dims: tuple[str, ...]            # symbolic dims; resolved against ShardSchema.dims + F, N, A, L
    dtypes: tuple[torch.dtype, ...]  # allowed on-disk dtypes (the first is what writers should use)
    required: bool
    doc: str


@dataclass(frozen=True)
class MetaSpec:
    name: str
    types: tuple[type, ...]
    doc: str


TENSOR_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("video_latent", ("C", "F", "h", "w"), (torch.bfloat16,), True, "VAE latents"),
    # talking-head fields: all three or none (video-only clips for Phase 2 have none)
    FieldSpec("struct", ("N", "M"), (torch.float32,), False, "LivePortrait motion per video frame"),
    FieldSpec("kp_canonical", ("K",), (torch.float32,), False, "canonical 3D keypoints"),
    FieldSpec("audio", ("A", "Da"), (torch.float32,), False, "audio features at audio_rate Hz"),
    # absent = no FLAME for this clip (meta has_flame false): L_flame skips it, never fake zeros
    FieldSpec("flame", ("N", "Q"), (torch.float32,), False, "FLAME expression/jaw/pose per video frame"),
    FieldSpec("text_emb", ("L", "Dt"), (torch.bfloat16, torch.float32), False, "text encoder states"),
    # single-image VAE encodings of video frame stride*t0 at the allowed window starts t0 (both or neither)
    FieldSpec("ref_latent", ("R", "C", "h", "w"), (torch.bfloat16,), False, "reference images' latents"),
    FieldSpec("ref_positions", ("R",), (torch.int64,), False, "latent frame t0 of each ref_latent"),
)
TALKING_HEAD_FIELDS = ("struct", "kp_canonical", "audio")
REF_FIELDS = ("ref_latent", "ref_positions")
META_FIELDS: tuple[MetaSpec, ...] = (
    MetaSpec("fps", (int,), "video frame rate; must equal model.fps"),
    MetaSpec("num_latent_frames", (int,), "F"),
    MetaSpec("num_video_frames", (int,), "N = 1 + stride*(F-1)"),
    MetaSpec("num_audio_frames", (int,), "A = N * audio_rate / fps"),
    MetaSpec("source_dataset", (str,), "e.g. HDTF, CelebV-HQ"),
    MetaSpec("subject", (str,), "speaker / identity id"),
    MetaSpec("split", (str,), f"one of {SPLITS}"),
    MetaSpec("gender", (str,), f"one of {GENDERS}"),
    MetaSpec("quality", (dict,), "quality scores by name (blur, face size, sync confidence, ...)"),
    MetaSpec("source_file", (str,), "original video file"),
    MetaSpec("time_range", (list, tuple), "[start_s, end_s] of the clip in source_file"),
)
FIELD_BY_NAME = {f.name: f for f in TENSOR_FIELDS}
# optional metadata written by the shard writer: CRC32 of the safetensors bytes, so flipped bytes
# inside tensor data (which safetensors cannot detect) are caught by the loader
CRC_META_KEY = "safetensors_crc32"

Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class ShardSchema:
    """Concrete dims of the schema for one model configuration."""

    dims: Mapping[str, int]     # C, M, K, Q, Da, Dt (0 = any text width)
    stride: int                 # VAE temporal stride
    fps: int
    audio_rate: int
    patch_hw: tuple[int, int]   # latent h, w must be divisible by the patch size

    @classmethod
    def from_model(cls, m: ModelConfig) -> "ShardSchema":
        return cls(dims={"C": m.in_channels, "M": m.motion_dim, "K": m.kp_dim, "Q": m.flame_dim,
                         "Da": m.audio_dim, "Dt": m.text_dim},
                   stride=m.vae_temporal_stride, fps=m.fps, audio_rate=m.audio_rate,
                   patch_hw=(int(m.patch_size[1]), int(m.patch_size[2])))

    @property
    def timeline(self) -> Timeline:
        return Timeline(stride=self.stride, fps=self.fps, audio_rate=self.audio_rate)

    @property
    def audio_per_video_frame(self) -> int:
        return self.timeline.audio_per_video_frame

    def video_frames(self, latent_frames: int) -> int:
        return self.timeline.video_frames(latent_frames)

    def audio_frames(self, latent_frames: int) -> int:
        return self.timeline.audio_frames(latent_frames)

    def model_dims(self) -> dict[str, int]:
        """What index.json records so a loader can refuse shards made for another model."""
        return {"in_channels": self.dims["C"], "motion_dim": self.dims["M"], "kp_dim": self.dims["K"],
                "flame_dim": self.dims["Q"], "audio_dim": self.dims["Da"], "text_dim": self.dims["Dt"],
                "vae_temporal_stride": self.stride, "fps": self.fps, "audio_rate": self.audio_rate}

    # ------------------------------------------------------------------ validation
    def validate_layout(self, layout: Layout, meta: Mapping[str, Any], *, shard: str, key: str) -> int:
        """Check dtypes, shapes and metadata; return F (latent frames). Raises SchemaError."""
        def fail(fld: str, problem: str) -> None:
            raise SchemaError(shard, key, fld, problem)

        if not KEY_PATTERN.match(key):
            fail("__key__", f"key must match {KEY_PATTERN.pattern} (no dots: WebDataset splits on them)")
        for name in layout:
            if name not in FIELD_BY_NAME:
                fail(name, f"unknown tensor (schema fields: {sorted(FIELD_BY_NAME)})")
        for spec in TENSOR_FIELDS:
            if spec.name not in layout:
                if spec.required:
                    fail(spec.name, "missing")
                continue
            dtype, shape = layout[spec.name]
            if dtype not in spec.dtypes:
                fail(spec.name, f"dtype {dtype} not allowed (expected {' or '.join(map(str, spec.dtypes))})")
            if len(shape) != len(spec.dims):
                fail(spec.name, f"shape {list(shape)} must have {len(spec.dims)} dims {list(spec.dims)}")

        for group in (TALKING_HEAD_FIELDS, REF_FIELDS):
            have = [n for n in group if n in layout]
            if have and len(have) != len(group):
                fail(next(n for n in group if n not in layout), f"missing (fields {list(group)} come together)")
        if "flame" in layout and "struct" not in layout:
            fail("flame", "present without the talking-head fields")

        shape = {name: tuple(layout[name][1]) for name in layout}
        F = shape["video_latent"][1]
        if F < 1:
            fail("video_latent", f"needs at least one latent frame, got shape {list(shape['video_latent'])}")
        h, w = shape["video_latent"][2:]
        if h % self.patch_hw[0] or w % self.patch_hw[1] or h == 0 or w == 0:
            fail("video_latent", f"latent size {h}x{w} must be a positive multiple of the patch {self.patch_hw}")
        sizes = dict(self.dims, F=F, N=self.video_frames(F), A=self.audio_frames(F), h=h, w=w)
        for spec in TENSOR_FIELDS:
            if spec.name not in shape:
                continue
            for axis, (sym, got) in enumerate(zip(spec.dims, shape[spec.name])):
                if sym == "L":
                    if got < 1:
                        fail(spec.name, "text_emb needs at least one token")
                    continue
                if sym == "R":
                    if got < 1 or got != shape["ref_positions"][0]:
                        fail(spec.name, f"{got} reference latents, ref_positions has {shape['ref_positions'][0]}")
                    continue
                if sym == "Dt" and sizes["Dt"] == 0:
                    continue  # model has no text branch; the loader drops text_emb
                if got != sizes[sym]:
                    fail(spec.name, f"shape {list(shape[spec.name])}: dim {axis} ({sym}) is {got}, "
                                    f"expected {sizes[sym]}" + _relation(sym))
        self.validate_meta(meta, F, shard=shard, key=key)
        return F

    def validate_meta(self, meta: Mapping[str, Any], latent_frames: int, *, shard: str, key: str) -> None:
        def fail(fld: str, problem: str) -> None:
            raise SchemaError(shard, key, f"meta.{fld}", problem)

        if not isinstance(meta, Mapping):
            fail("", f"metadata must be a JSON object, got {type(meta).__name__}")
        for spec in META_FIELDS:
            if spec.name not in meta:
                fail(spec.name, f"missing ({spec.doc})")
            value = meta[spec.name]
            if isinstance(value, bool) or not isinstance(value, spec.types):
                fail(spec.name, f"{value!r} is not of type {'/'.join(t.__name__ for t in spec.types)}")
        expected = {"fps": self.fps, "num_latent_frames": latent_frames,
                    "num_video_frames": self.video_frames(latent_frames),
                    "num_audio_frames": self.audio_frames(latent_frames)}
        for name, want in expected.items():
            if meta[name] != want:
                fail(name, f"is {meta[name]}, tensors imply {want}")
        if meta["split"] not in SPLITS:
            fail("split", f"{meta['split']!r} is not one of {SPLITS}")
        if meta["gender"] not in GENDERS:
            fail("gender", f"{meta['gender']!r} is not one of {GENDERS}")
        for name, score in meta["quality"].items():
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                fail(f"quality.{name}", f"{score!r} is not a number")
        tr = meta["time_range"]
        if len(tr) != 2 or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tr) \
                or tr[1] <= tr[0] or tr[0] < 0:
            fail("time_range", f"{tr!r} must be [start_s, end_s] with 0 <= start_s < end_s")

    def validate_sample(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *,
                        shard: str = "<memory>", key: str) -> int:
        """Layout + metadata checks on real tensors, plus finiteness. Returns F."""
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise SchemaError(shard, key, name, f"expected a tensor, got {type(t).__name__}")
        F = self.validate_layout({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, meta,
                                 shard=shard, key=key)
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SchemaError(shard, key, name, "contains NaN or Inf")
        if "ref_positions" in tensors:
            check_ref_positions(tensors["ref_positions"], F, shard=shard, key=key)
        return F


def check_ref_positions(positions: torch.Tensor, latent_frames: int, *, shard: str, key: str) -> None:
    """Reference positions must be distinct latent frames of the clip."""
    pos = positions.tolist()
    if len(set(pos)) != len(pos) or not all(0 <= p < latent_frames for p in pos):
        raise SchemaError(shard, key, "ref_positions", f"{pos} must be distinct latent frames in [0, {latent_frames})")


def _relation(sym: str) -> str:
    return {"N": " (N = 1 + stride*(F-1))", "A": " (A = N * audio_rate / fps)"}.get(sym, "")


def to_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast each schema field to its on-disk dtype (e.g. float32 VAE output -> bf16) unless already allowed."""
    out = {}
    for name, t in tensors.items():
        spec = FIELD_BY_NAME.get(name)
        out[name] = t.to(spec.dtypes[0]) if spec is not None and t.dtype not in spec.dtypes else t
    return out


def validate_sample(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], model_cfg: ModelConfig, *,
                    shard: str = "<memory>", key: str) -> int:
    """Validate one clip against the schema for ``model_cfg``; returns its latent frame count F."""
    return ShardSchema.from_model(model_cfg).validate_sample(tensors, meta, shard=shard, key=key)


def read_safetensors_layout(data: bytes, *, shard: str, key: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtypes and shapes from a safetensors blob's header, checking the blob is complete.

    Costs a JSON parse of the header only; no tensor is built.
    """
    fld = f"{key}.{TENSOR_EXT}"
    if len(data) < _HEADER_LEN_BYTES:
        raise SchemaError(shard, key, fld, f"{len(data)} bytes is too short for a safetensors file")
    (hlen,) = _struct.unpack("<Q", data[:_HEADER_LEN_BYTES])
    if hlen > len(data) - _HEADER_LEN_BYTES:
        raise SchemaError(shard, key, fld, f"header length {hlen} exceeds the blob ({len(data)} bytes)")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES:_HEADER_LEN_BYTES + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(shard, key, fld, f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise SchemaError(shard, key, fld, "header is not a JSON object")
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(shard, key, name, f"bad safetensors header entry {info!r}: {e}") from None
        numel = 1
        for s in shape:
            numel *= s
        if stop - begin != numel * dtype.itemsize:
            raise SchemaError(shard, key, name, f"header offsets {begin}..{stop} do not fit shape {list(shape)}")
        end = max(end, stop)
        layout[name] = (dtype, shape)
    if _HEADER_LEN_BYTES + hlen + end != len(data):
        raise SchemaError(shard, key, fld, f"blob has {len(data)} bytes, header describes "
                                           f"{_HEADER_LEN_BYTES + hlen + end} (truncated or padded)")
    return layout


def parse_meta(data: bytes, *, shard: str, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(shard, key, f"{key}.{META_EXT}", f"invalid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise SchemaError(shard, key, f"{key}.{META_EXT}", "metadata must be a JSON object")
    return meta


__all__ = ["SCHEMA_VERSION", "SchemaError", "ShardSchema", "FieldSpec", "MetaSpec", "TENSOR_FIELDS",
           "META_FIELDS", "validate_sample", "to_storage", "read_safetensors_layout",
           "check_ref_positions", "parse_meta", "CRC_META_KEY",
           "TENSOR_EXT", "META_EXT", "KEY_PATTERN"]
