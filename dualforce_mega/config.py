"""Typed configuration: dataclass sections, model presets, YAML loading and ``--set`` overrides.

Every error names the offending key (``section.field``) so a bad YAML file or command line
fails before any rank starts.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration problem; the message always names the key at fault."""


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    preset: str = "tiny"
    dim: int = 64
    heads: int = 4
    ffn_dim: int = 128
    layers: int = 4                  # per tower
    fusion_depth: int = 2            # bridge in the first N layers
    audio_layers: int = 2            # gated audio cross-attention in the first N layers
    struct_tower: bool = True        # False = Phase 2 video-only model
    audio: bool = True               # audio conditioning on/off
    bridge: str = "bidirectional"    # bidirectional | struct_to_video (video attends struct only)
    causal_block_size: int = 1       # latent frames per causal block
    # video stream
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    vae_temporal_stride: int = 4     # latent frame t>=1 covers video frames 4t-3..4t
    vae_spatial_stride: int = 8
    # conditioning streams
    motion_dim: int = 70             # LivePortrait: exp 63 + pitch/yaw/roll 3 + t 3 + scale 1
    kp_dim: int = 63                 # canonical keypoints 21 x 3
    flame_dim: int = 56              # 50 expression + 3 jaw + 3 global pose
    audio_dim: int = 768             # HuBERT-base / wav2vec2-base hidden size
    audio_rate: int = 50             # audio feature frames per second
    fps: int = 25                    # video frames per second
    audio_context: int = 2           # video frames of audio context on each side of a frame's span
    text_dim: int = 0                # 0 = no text cross-attention (umT5: 4096)
    lipsync_dim: int = 256
    # numerics
    freq_dim: int = 256              # sinusoidal sigma embedding size
    timestep_scale: float = 1000.0   # sigma in [0,1] -> Wan timestep in [0,1000]
    eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_backend: str = "auto"       # auto | sdpa | flex | flash | merged
    qk_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass
class DiffusionConfig:
    sigma_sampler: str = "logit_normal"   # uniform | logit_normal | shifted
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    monotonic: bool = False               # non-decreasing sigma over blocks
    struct_sigma: str = "independent"     # independent | tied (s_struct = k * s_video)
    struct_sigma_k: float = 1.0
    loss_video: float = 1.0
    loss_struct: float = 0.5
    loss_flame: float = 0.1
    loss_lipsync: float = 0.3
    lipsync_temperature: float = 0.07
    lipsync_negatives: str = "dp"         # dp: all clips of the data-parallel group | local: this micro batch
    sigma_buckets: int = 4                # video loss logged in this many equal sigma bins
    # what training shows so that sampling stays in distribution (the sampler is the contract)
    audio_drop_prob: float = 0.1          # per sample: audio dropped (CFG's unconditional branch)
    text_drop_prob: float = 0.1           # per sample: text dropped (when the model and batch have text)
    history_prob: float = 0.5             # per sample: a prefix of blocks is clean / lightly noised history
    history_sigma_max: float = 0.1        # ... with sigma ~ U[0, history_sigma_max]
    # sampler
    sample_steps: int = 8
    sample_shift: float = 3.0
    sample_history_sigma: float = 0.05    # generated history is conditioned on at this sigma (<= history_sigma_max)
    chunk_blocks: int = 1
    window_blocks: int = -1               # -1 = the training window (data.window); 0 = unbounded; W blocks
    ar_step: int = 0                      # 0 = synchronous schedule
    cfg_audio: float = 1.0                # 1 = no guidance
    cfg_batched: bool = True              # audio CFG's two branches as one forward of batch 2B (False: two
                                          # forwards of batch B: half the peak activation memory)


@dataclass
class DataConfig:
    shards: str = ""                      # dir, glob or comma list of .tar; "" = synthetic
    window: int = 3                       # latent frames per training sample
    shuffle_buffer: int = 64
    workers: int = 0
    seed: int = 0
    latent_height: int = 8                # latent size of synthetic clips
    latent_width: int = 8
    synthetic_clips: int = 64
    synthetic_frames: int = 6             # latent frames per synthetic clip
    synthetic_shards: int = 4
    synthetic_dir: str = ""               # default: <run.dir>/synthetic_shards
    verify_checksums: bool = True         # loader checks each sample's CRC32 (catches flipped tensor bytes)
    normalize: str = "struct,kp_canonical,flame"  # fields the loader standardises with index.json stats ("" = none)
    ref_elsewhere_prob: float = 0.5       # a window's reference image (and motion) from another position of the clip


@dataclass
class TrainConfig:
    phase: int = 4                        # 2 = causal video-only pretraining, 4 = full model
    steps: int = 100
    global_batch: int = 4
    micro_batch: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0                # set explicitly: DeepSpeed's own default is 1.0 too
    seed: int = 0
    save_every: int = 50                  # 0 = no checkpoints at all (benchmark runs)
    keep_last: int = 2
    log_every: int = 1
    nonfinite_limit: int = 10             # consecutive non-finite steps (skipped) that stop the run (0 = never)
    precision: str = "auto"               # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # per-block activation checkpointing: on | off | auto (the planner turns it on, for as few layers as
    # needed, only when the step would not fit the device's memory; off on CPU). YAML true/false work too.
    activation_checkpointing: str = "auto"
    compile: str = "auto"                 # regional torch.compile of the transformer blocks: on | off | auto (= on CUDA)
    fp8: bool = False
    fp8_recipe: str = "delayed"           # delayed (TE) | current (tensor-wise dynamic) | rowwise (torchao)
    fp8_backend: str = "auto"             # auto (TE, else torchao, else torch._scaled_mm) | te | torchao | torch
    ema_decay: float = 0.0                # 0 = no EMA; else sharded like ZeRO-3, used for generation by default
    init_from: str = ""                   # fresh run: start from a run dir / checkpoint tag / safetensors (Wan import)
    init_from_ema: bool = False           # ... from its EMA weights


@dataclass
class ParallelConfig:
    sp: int = 1
    zero_stage: int = 3
    offload_optimizer: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = "dualforce"
    task: str = "dualforce"               # what the trainer trains: dualforce | faceformer (TASK_CONFIGS)
    tensorboard: bool = True
    log_samples: bool = False             # also log each step's global sample indices (debug / tests)
    # operations (docs/TRAINING.md "Preemption, hangs and exit codes")
    preempt_signals: str = "SIGTERM,SIGUSR1"  # on any rank or the launcher: finish the step, save, exit 75
    hang_timeout_s: float = 600.0         # step watchdog: a rank without progress this long ends the job (0 = off)
    collective_timeout_s: float = 1800.0  # timeout of every collective of the process group


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------------------
# presets (DESIGN §3)
# --------------------------------------------------------------------------------------
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, heads=4, ffn_dim=128, layers=4, fusion_depth=2, audio_layers=2,
                 audio_dim=32, text_dim=32),
    "lite": dict(dim=1536, heads=12, ffn_dim=8960, layers=20, fusion_depth=8, audio_layers=6,
                 audio_dim=768, text_dim=4096),
    "wan1.3b": dict(dim=1536, heads=12, ffn_dim=8960, layers=30, fusion_depth=8, audio_layers=6,
                    audio_dim=768, text_dim=4096),
}

_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
DEFAULT_TASK = "dualforce"
# other trainable tasks: the module whose ``build_config(raw, source)`` turns the sections into its config
TASK_CONFIGS = {"faceformer": "dualforce_mega.baselines.faceformer.config"}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {sorted(MODEL_PRESETS)})")
    cfg = ModelConfig(preset=name, **MODEL_PRESETS[name])
    for k, v in overrides.items():
        _set_field(cfg, "model", k, v)
    validate_model(cfg)
    return cfg


# --------------------------------------------------------------------------------------
# loading and overrides
# --------------------------------------------------------------------------------------
def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


class _CliText(str):
    """A ``--set`` value as typed; parsed according to the field's type in ``_coerce``."""


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Convert a YAML / command-line value to the annotated type, or fail naming ``key``."""
    if isinstance(value, _CliText):
        if hint is str:  # keep the text: YAML would read e.g. "on" as True and "1e3" as a string
            return str(value)
        import yaml  # lazy here and below: benchmarks run on GPU machines that have only torch
        try:
            value = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {str(value)!r}: {e}") from e
    origin = get_origin(hint)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if hint is tuple or origin is tuple:
        if isinstance(value, str):
            import yaml
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(hint)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {list(value)}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _set_field(section_obj: Any, section: str, name: str, value: Any) -> None:
    hints = get_type_hints(type(section_obj))
    if name not in hints:
        close = difflib.get_close_matches(name, list(hints), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise ConfigError(f"{section}.{name}: unknown key{hint}")
    setattr(section_obj, name, _coerce(f"{section}.{name}", hints[name], value))


def _suggest(section: str, sections: Any = _SECTIONS) -> str:
    close = difflib.get_close_matches(section, list(sections), n=1)
    return (f" (did you mean {close[0]}?" if close else " (") + f" sections: {sorted(sections)})"


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    if "." not in key:
        raise ConfigError(f"--set {key}: expected section.key (sections: {sorted(_SECTIONS)})")
    section, name = key.split(".", 1)
    value = _CliText(raw)
    return section.strip(), name.strip(), value


def fill_sections(cfg: Any, raw: dict[str, dict[str, Any]], source: str) -> Any:
    """Set ``raw[section][key]`` on the config dataclass ``cfg`` (a YAML file's values, or the typed
    text of ``--set``); unknown sections and keys fail naming them."""
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, body in raw.items():
        if section not in sections:
            raise ConfigError(f"{source}: {section}: unknown section{_suggest(section, sections)}")
        for name, value in body.items():
            _set_field(getattr(cfg, section), section, name, value)
    return cfg


def _collect(yaml_dict: Optional[dict], overrides: Optional[list[str]], source: str) -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = {}
    for section, body in (yaml_dict or {}).items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {section}: expected a mapping, got {body!r}")
        raw.setdefault(section, {}).update(body)
    for item in overrides or []:
        section, name, value = _parse_override(item)
        raw.setdefault(section, {})[name] = value
    return raw


def build_config(yaml_dict: Optional[dict] = None, overrides: Optional[list[str]] = None,
                 source: str = "<dict>") -> Any:
    """Config from a nested dict (as read from YAML) plus ``section.key=value`` overrides.

    ``run.task`` picks the schema: DualForce's :class:`Config` by default, another task's config
    (``TASK_CONFIGS``) otherwise. For DualForce the model preset is applied first, so explicit model
    keys in the file or on the command line win over the preset's values.
    """
    raw = _collect(yaml_dict, overrides, source)
    task = str(raw.get("run", {}).get("task", DEFAULT_TASK))
    if task != DEFAULT_TASK:
        if task not in TASK_CONFIGS:
            raise ConfigError(f"run.task: unknown task {task!r} (known: {sorted([DEFAULT_TASK, *TASK_CONFIGS])})")
        import importlib
        return importlib.import_module(TASK_CONFIGS[task]).build_config(raw, source)
    for section in raw:
        if section not in _SECTIONS:
            where = f"{source}: {section}" if section in (yaml_dict or {}) else f"{section}.{next(iter(raw[section]))}"
            raise ConfigError(f"{where}: unknown section{_suggest(section)}")
    cfg = Config()
    model_raw = dict(raw.get("model", {}))
    cfg.model = model_preset(str(model_raw.pop("preset", "tiny")))
    fill_sections(cfg, {**raw, "model": model_raw}, source)
    validate(cfg)
    return cfg


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a config file; a top-level ``base: other.yaml`` (relative to this file) is loaded first
    and this file's sections are merged over it key by key (ablations = base + a few keys)."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base: circular include")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / str(base), seen + (path.resolve(),))
    for section, body in data.items():
        if isinstance(body, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **body}
        else:
            merged[section] = body
    return merged


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    data = _read_yaml(Path(path)) if path else {}
    return build_config(data, overrides, source=str(path or "<defaults>"))


def add_config_arguments(parser, preset: bool = False) -> None:
    """The config flags every CLI shares: ``--config FILE``, repeatable ``--set section.key=value``
    (into ``args.overrides``) and, optionally, ``--preset NAME`` (a shorthand for model.preset)."""
    parser.add_argument("--config", default=None, help="YAML config (sections model/diffusion/data/train/parallel/run)")
    if preset:
        parser.add_argument("--preset", default=None, help=f"model preset {sorted(MODEL_PRESETS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key, e.g. --set train.steps=100 (repeatable)")


def config_from_args(args, extra: Optional[list[str]] = None) -> Config:
    """Config from the flags of ``add_config_arguments`` (``--preset`` before ``--set``)."""
    preset = [f"model.preset={args.preset}"] if getattr(args, "preset", None) else []
    return load_config(args.config, preset + list(args.overrides) + list(extra or []))


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate_model(m: ModelConfig) -> None:
    _require(m.dim > 0, "model.dim", "must be positive")
    _require(m.heads > 0 and m.dim % m.heads == 0, "model.heads",
             f"heads={m.heads} must divide model.dim={m.dim}")
    _require(m.head_dim % 2 == 0, "model.heads", f"head_dim={m.head_dim} must be even for RoPE")
    _require(m.layers >= 1, "model.layers", "must be >= 1")
    _require(0 <= m.fusion_depth <= m.layers, "model.fusion_depth",
             f"fusion_depth={m.fusion_depth} must be in [0, model.layers={m.layers}]")
    _require(0 <= m.audio_layers <= m.layers, "model.audio_layers",
             f"audio_layers={m.audio_layers} must be in [0, model.layers={m.layers}]")
    _require(m.bridge in ("bidirectional", "struct_to_video"), "model.bridge",
             f"{m.bridge!r} is not one of bidirectional, struct_to_video")
    _require(m.causal_block_size >= 1, "model.causal_block_size", "must be >= 1")
    _require(len(m.patch_size) == 3 and m.patch_size[0] == 1, "model.patch_size",
             f"{m.patch_size}: expected (1, ph, pw) — one latent frame per token row")
    _require(m.attn_backend in ("auto", "sdpa", "flex", "flash", "merged"), "model.attn_backend",
             f"{m.attn_backend!r} is not one of auto, sdpa, flex, flash, merged")
    _require(m.audio_rate % m.fps == 0, "model.audio_rate",
             f"audio_rate={m.audio_rate} must be a multiple of model.fps={m.fps}")
    _require(m.audio_context >= 0, "model.audio_context", "must be >= 0")
    _require(m.text_dim >= 0, "model.text_dim", "must be >= 0 (0 disables text)")
    _require(m.freq_dim % 2 == 0, "model.freq_dim", "must be even")


SWITCH_VALUES = ("on", "off", "auto")
_SWITCH_ALIASES = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}


def switch_value(key: str, value: object) -> str:
    """An on | off | auto setting, also written as a YAML / command-line boolean -> canonical form."""
    text = str(value).strip().lower()
    text = _SWITCH_ALIASES.get(text, text)
    if text not in SWITCH_VALUES:
        raise ConfigError(f"{key}: {value!r} is not one of on, off, auto (or true / false)")
    return text


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    d, t, p, data = cfg.diffusion, cfg.train, cfg.parallel, cfg.data
    _require(d.sigma_sampler in ("uniform", "logit_normal", "shifted"), "diffusion.sigma_sampler",
             f"{d.sigma_sampler!r} is not one of uniform, logit_normal, shifted")
    _require(d.struct_sigma in ("independent", "tied"), "diffusion.struct_sigma",
             f"{d.struct_sigma!r} is not one of independent, tied")
    _require(d.sigma_buckets >= 1, "diffusion.sigma_buckets", "must be >= 1")
    _require(d.sample_steps >= 1, "diffusion.sample_steps", "must be >= 1")
    _require(d.chunk_blocks >= 1, "diffusion.chunk_blocks", "must be >= 1")
    _require(d.window_blocks >= -1, "diffusion.window_blocks",
             "must be -1 (the training window), 0 (unbounded) or a number of blocks")
    _require(d.lipsync_negatives in ("dp", "local"), "diffusion.lipsync_negatives",
             f"{d.lipsync_negatives!r} is not one of dp, local")
    for key in ("audio_drop_prob", "text_drop_prob", "history_prob", "history_sigma_max"):
        _require(0.0 <= getattr(d, key) <= 1.0, f"diffusion.{key}", f"{getattr(d, key)} must be in [0, 1]")
    _require(0.0 <= d.sample_history_sigma <= d.history_sigma_max, "diffusion.sample_history_sigma",
             f"{d.sample_history_sigma} must be in [0, diffusion.history_sigma_max={d.history_sigma_max}] "
             "(a history sigma that training shows)")
    _require(t.phase in (2, 4), "train.phase", f"{t.phase} is not 2 (video-only) or 4 (full)")
    if t.phase == 4:
        _require(cfg.model.struct_tower or cfg.model.audio, "train.phase",
                 "phase 4 needs model.struct_tower or model.audio")
    validate_train(t)
    _require(p.sp >= 1, "parallel.sp", "must be >= 1")
    _require(cfg.model.heads % p.sp == 0, "parallel.sp",
             f"sp={p.sp} must divide model.heads={cfg.model.heads} (Ulysses shards heads)")
    _require(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3")
    _require(cfg.run.task == DEFAULT_TASK, "run.task", f"{cfg.run.task!r} has its own config schema (TASK_CONFIGS)")
    validate_run(cfg.run)
    _require(data.window >= 2, "data.window",
             "must be >= 2 latent frames (the clean reference frame plus at least one)")
    _require(0.0 <= data.ref_elsewhere_prob <= 1.0, "data.ref_elsewhere_prob",
             f"{data.ref_elsewhere_prob} must be in [0, 1]")
    from .data.normalization import parse_fields   # lazy: config.py is imported by everything
    parse_fields(data.normalize)
    _require(bool(data.shards) or data.synthetic_frames >= data.window, "data.synthetic_frames",
             f"synthetic_frames={data.synthetic_frames} must be >= data.window={data.window}")


def validate_run(r: RunConfig) -> None:
    """The operational ``run`` keys (signals, timeouts) every task's trainer reads."""
    import signal

    for name in filter(None, (s.strip() for s in r.preempt_signals.split(","))):
        _require(name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP") and hasattr(signal, name),
                 "run.preempt_signals", f"{name!r} is not one of SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP")
    _require(r.hang_timeout_s >= 0, "run.hang_timeout_s", "must be >= 0 (0 = no step watchdog)")
    _require(r.collective_timeout_s > 0, "run.collective_timeout_s", "must be positive")


def validate_train(t: TrainConfig) -> None:
    """The ``train`` keys every task's trainer reads (on | off | auto switches are put in canonical form)."""
    t.activation_checkpointing = switch_value("train.activation_checkpointing", t.activation_checkpointing)
    t.compile = switch_value("train.compile", t.compile)
    _require(t.steps >= 0, "train.steps", "must be >= 0")
    _require(t.micro_batch >= 1, "train.micro_batch", "must be >= 1")
    _require(t.global_batch >= t.micro_batch and t.global_batch % t.micro_batch == 0,
             "train.global_batch",
             f"global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch}")
    _require(t.lr > 0, "train.lr", "must be positive")
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"{t.ema_decay} must be in [0, 1) (0 = no EMA)")
    _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(t.save_every >= 0, "train.save_every", "must be >= 0 (0 = never save: benchmarks)")
    _require(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    _require(t.nonfinite_limit >= 0, "train.nonfinite_limit", "must be >= 0 (0 = never stop)")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision",
             f"{t.precision!r} is not one of auto, fp32, bf16")
    _require(t.fp8_recipe in ("delayed", "current", "rowwise"), "train.fp8_recipe",
             f"{t.fp8_recipe!r} is not one of delayed, current, rowwise")
