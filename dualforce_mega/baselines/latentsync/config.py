"""LatentSync configuration: the UNet YAML of the official repository (``configs/unet/stage2.yaml``
etc.) read into dataclasses.

Only the keys inference needs are read: the whole ``model:`` section (the 3D UNet's constructor
arguments) and, from ``data:``, ``num_frames``, ``resolution``, ``audio_feat_length``, ``video_fps``
and ``audio_sample_rate``. Unknown ``model:`` keys are an error (a key we ignore could change the
state-dict layout); other sections are ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock3D", "DownBlock3D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock3D", "UpBlock3D"
MID_CROSS_ATTN = "UNetMidBlock3DCrossAttn"
MOTION_MODULE_TYPES = ("Vanilla",)


@dataclass
class MotionModuleConfig:
    """AnimateDiff's "Vanilla" temporal module (``motion_module_kwargs`` of the YAML)."""
    num_attention_heads: int = 8
    num_transformer_block: int = 1
    attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    temporal_position_encoding: bool = True
    temporal_position_encoding_max_len: int = 24
    temporal_attention_dim_div: int = 1
    zero_initialize: bool = True
    cross_frame_attention_mode: None = None
    norm_num_groups: int = 32       # not a YAML key: the official temporal module always uses 32 groups


@dataclass
class UNetConfig:
    """Constructor arguments of LatentSync's ``UNet3DConditionModel`` (the YAML ``model:`` section).

    ``attention_head_dim`` is, as in the official code, the number of attention heads of the spatial
    transformers (head size = channels // attention_head_dim)."""
    in_channels: int = 13
    out_channels: int = 4
    sample_size: int = 64
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN)
    mid_block_type: str = MID_CROSS_ATTN
    up_block_types: tuple[str, ...] = (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 384
    attention_head_dim: Union[int, tuple[int, ...]] = 8
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: None = None
    num_class_embeds: None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    use_inflated_groupnorm: bool = False
    use_motion_module: bool = True
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_type: str = "Vanilla"
    motion_module_kwargs: MotionModuleConfig = field(default_factory=MotionModuleConfig)
    add_audio_layer: bool = True

    def __post_init__(self) -> None:
        # PyYAML reads "1e-5" (no dot) as a string; the official code goes through OmegaConf, which does not
        self.norm_eps = float(self.norm_eps)
        self.mid_block_scale_factor = float(self.mid_block_scale_factor)
        for name in ("down_block_types", "up_block_types", "block_out_channels", "motion_module_resolutions"):
            setattr(self, name, tuple(getattr(self, name)))
        if isinstance(self.attention_head_dim, (list, tuple)):
            self.attention_head_dim = tuple(self.attention_head_dim)
        if isinstance(self.motion_module_kwargs, dict):
            self.motion_module_kwargs = _build(MotionModuleConfig, self.motion_module_kwargs, "motion_module_kwargs")
        self.motion_module_kwargs.attention_block_types = tuple(self.motion_module_kwargs.attention_block_types)
        self.validate()

    @property
    def heads(self) -> tuple[int, ...]:
        """Spatial attention heads per resolution level (down order)."""
        h = self.attention_head_dim
        return h if isinstance(h, tuple) else (h,) * len(self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n or len(self.heads) != n:
            raise ValueError(f"model: down_block_types / up_block_types / attention_head_dim need "
                             f"{n} entries (one per block_out_channels)")
        bad = [t for t in self.down_block_types if t not in (CROSS_ATTN_DOWN, DOWN)]
        bad += [t for t in self.up_block_types if t not in (CROSS_ATTN_UP, UP)]
        if self.mid_block_type != MID_CROSS_ATTN:
            bad.append(self.mid_block_type)
        if bad:
            raise ValueError(f"model: unknown block types {bad}")
        unsupported = {"dual_cross_attention": self.dual_cross_attention, "class_embed_type": self.class_embed_type,
                       "num_class_embeds": self.num_class_embeds, "only_cross_attention": self.only_cross_attention,
                       "resnet_time_scale_shift != default": self.resnet_time_scale_shift != "default",
                       "center_input_sample": self.center_input_sample}
        on = [k for k, v in unsupported.items() if v]
        if on:
            raise ValueError(f"model: {on} not supported (LatentSync's released configs leave them off)")
        if self.use_motion_module and self.motion_module_type not in MOTION_MODULE_TYPES:
            raise ValueError(f"model.motion_module_type: {self.motion_module_type!r} is not one of "
                             f"{MOTION_MODULE_TYPES}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"model.block_out_channels: {c} is not a multiple of "
                                 f"norm_num_groups={self.norm_num_groups}")
            if self.use_motion_module and c % self.motion_module_kwargs.norm_num_groups:
                raise ValueError(f"model.block_out_channels: {c} is not a multiple of the temporal module's "
                                 f"{self.motion_module_kwargs.norm_num_groups} groups")


@dataclass
class DataConfig:
    """What inference takes from the YAML ``data:`` section."""
    num_frames: int = 16
    resolution: int = 256
    audio_feat_length: tuple[int, int] = (2, 2)    # whisper frames (x2 at 50 Hz) before / after a video frame
    video_fps: int = 25
    audio_sample_rate: int = 16000

    def __post_init__(self) -> None:
        self.audio_feat_length = tuple(self.audio_feat_length)
        if len(self.audio_feat_length) != 2 or min(self.audio_feat_length) < 0:
            raise ValueError(f"data.audio_feat_length: {list(self.audio_feat_length)} must be two numbers >= 0")


@dataclass
class LatentSyncConfig:
    unet: UNetConfig
    data: DataConfig


def _build(cls, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    return cls(**values)


# keys only LatentSync 1.0's configs have: that release's UNet has another state-dict layout
# (``audio_cross_attn.*`` instead of ``norm2`` / ``attn2``)
V1_0_KEYS = ("custom_audio_layer", "audio_condition_method", "unet_use_cross_frame_attention",
             "unet_use_temporal_attention")


def load_config(path: Union[str, Path]) -> LatentSyncConfig:
    """Read an official LatentSync UNet YAML (1.5 / 1.6 layout)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: UNet config not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ValueError(f"{p}: no 'model:' section (expected LatentSync's configs/unet/*.yaml layout)")
    old = [k for k in V1_0_KEYS if k in doc["model"]]
    if old:
        raise ValueError(f"{p}: model keys {old} are LatentSync 1.0's; its checkpoint has another layout "
                         f"(use the 1.5 / 1.6 configs, configs/unet/stage2.yaml or stage2_512.yaml)")
    data = doc.get("data") or {}
    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    try:
        unet = _build(UNetConfig, doc["model"], f"{p}: model")
        dcfg = DataConfig(**{k: v for k, v in data.items() if k in data_keys})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from e
    return LatentSyncConfig(unet=unet, data=dcfg)
