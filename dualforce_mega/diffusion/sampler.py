"""Sliding-window autoregressive sampler for DualForce (both towers, or the video tower alone).

Generation of F latent frames (``ar_schedule`` defines chunks and passes):

1. Chunk 0 is block 0. Latent frame 0 is the given clean reference (sigma 0, pinned); with
   ``causal_block_size`` 1 and a known reference motion (or no struct tower) block 0 is fully known
   and only committed; otherwise its unknown parts (frames 1..k-1, and the struct token of video
   frame 0 when no reference motion is given) are denoised like any chunk.
2. Every chunk starts from per-frame Gaussian noise (seeded by sample seed, stream and absolute
   frame index, so noise does not depend on chunking or on the history path) and runs the
   pyramid passes: flow-matching Euler steps on the shifted ``inference_sigmas`` grid.
3. A finished chunk is committed to the history (``history.py``): KV-cache writing pass, or
   appended to the recomputed history. It is yielded at once, so callers can decode and write it
   while later chunks are generated; with a rolling window, memory is bounded by the window.

Classifier-free guidance on audio: ``v = v_u + cfg_audio * (v_c - v_u)`` for both towers. The
unconditional branch drops the audio (``diffusion.cfg_uncond_audio``: ``none`` = no audio
cross-attention at all, the model's unconditioned path, default; ``zeros`` = all-zero features).
With ``cfg_audio == 1`` (or no audio) only the conditional branch runs.

The struct stream is conditioned on ``kp_canonical`` (zeros when unknown). Its frames follow the
video: the struct tokens of latent frame t are the video frames it covers and share its sigma.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from ..config import DiffusionConfig
from ..models.dualforce import DualForceModel
from ..models.layout import latent_frame_spans
from ..models.static_kv_cache import StaticKVCache
from .ar_schedule import Chunk, block_of_frames, plan_chunks, pyramid_passes
from .flow import euler_step
from .history import CachedHistory, PassInputs, RecomputeHistory
from .schedules import inference_sigmas
from .static_forward import StaticForward

log = logging.getLogger(__name__)

History = Union[CachedHistory, RecomputeHistory]
UNCOND_AUDIO = ("none", "zeros")
# Odd 64-bit multiplier (golden ratio) that spreads (seed, frame, stream) over generator seeds.
_SEED_MIX = 0x9E3779B97F4A7C15
_STREAMS = {"video": 0, "struct": 1}


@dataclass
class SampleInputs:
    reference: torch.Tensor                    # [B, C, h, w] clean latent of video frame 0
    num_latent: int                            # latent frames to produce, reference included
    seeds: Sequence[int]                       # one per sample
    audio: Optional[torch.Tensor] = None       # [B, A, audio_dim] from video frame 0, 2 per video frame
    kp_canonical: Optional[torch.Tensor] = None  # [B, kp_dim]; zeros when unknown
    ref_motion: Optional[torch.Tensor] = None    # [B, motion_dim] motion of video frame 0, if known
    text_emb: Optional[torch.Tensor] = None      # [B, L, text_dim]


@dataclass
class GeneratedChunk:
    start: int                                 # first latent frame
    end: int                                   # last latent frame + 1
    video: torch.Tensor                        # [B, C, end-start, h, w] clean latents
    struct: Optional[torch.Tensor] = None      # [B, n, motion_dim] motion of the chunk's video frames
    struct_start: int = 0                      # first video frame of ``struct``


@dataclass
class SamplerStats:
    model_calls: int = 0
    history_tokens: list = field(default_factory=list)   # per chunk, after commit
    history_bytes: list = field(default_factory=list)
    max_pass_frames: int = 0                             # widest model input, in latent frames


def frame_noise(seed: int, stream: str, frame: int, shape: Sequence[int]) -> torch.Tensor:
    """Deterministic fp32 CPU noise for one latent frame of one stream of one sample."""
    g = torch.Generator().manual_seed((seed * _SEED_MIX + 2 * frame + _STREAMS[stream]) % (1 << 63))
    return torch.randn(*shape, generator=g)


class ARSampler:
    """``use_cache``: KV cache (else the recompute reference). ``static``: the cache is a preallocated
    ring buffer (``StaticKVCache``) and every chunk after the first runs one static-shape forward,
    captured as CUDA graphs on GPU (``StaticForward``); memory stays flat as the video grows."""

    def __init__(self, model: DualForceModel, cfg: DiffusionConfig, use_cache: bool = True, static: bool = False):
        if cfg.cfg_uncond_audio not in UNCOND_AUDIO:
            raise ValueError(f"diffusion.cfg_uncond_audio={cfg.cfg_uncond_audio!r} is not one of {UNCOND_AUDIO}")
        self.model = model
        self.cfg = cfg
        self.use_cache = use_cache
        self.static = static and use_cache
        self._forwards: dict[str, StaticForward] = {}
        self._caches: dict[str, StaticKVCache] = {}
        self.stats = SamplerStats()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: SampleInputs) -> Iterator[GeneratedChunk]:
        """Yields each finished chunk, in order. ``self.stats`` describes the run."""
        mcfg, d = self.model.cfg, self.cfg
        ref = inputs.reference
        if ref.dim() == 5:
            ref = ref[:, :, 0]
        b, c, h, w = ref.shape
        if c != mcfg.in_channels:
            raise ValueError(f"reference: {c} channels != model.in_channels={mcfg.in_channels}")
        if len(inputs.seeds) != b:
            raise ValueError(f"seeds: {len(inputs.seeds)} seeds for a batch of {b}")
        use_struct = self.model.struct is not None
        audio = self._audio(inputs.audio, b)
        branches = ("cond", "uncond") if audio["cond"] is not None and d.cfg_audio != 1.0 else ("cond",)
        kp = None
        if use_struct:
            kp = inputs.kp_canonical if inputs.kp_canonical is not None else torch.zeros(b, mcfg.kp_dim)
            kp = kp.to(self.device, self.dtype)
        text = inputs.text_emb.to(self.device, self.dtype) if inputs.text_emb is not None else None
        history: History = self._history(inputs.num_latent, branches)
        sigmas = inference_sigmas(d.sample_steps, d.sample_shift)
        self.stats = SamplerStats()
        was_training = self.model.training
        self.model.eval()
        try:
            for chunk in plan_chunks(inputs.num_latent, mcfg.causal_block_size, d.chunk_blocks):
                xv, xs, pin_v, pin_s = self._init_chunk(chunk, inputs, ref, use_struct)
                known = bool(pin_v.all()) and (xs is None or bool(pin_s.all()))
                blocks = block_of_frames(chunk.frame_ids, mcfg.causal_block_size)
                counts = self._struct_counts(chunk)
                n_blocks = int(blocks[-1]) + 1
                passes = [] if known else pyramid_passes(n_blocks, sigmas, d.ar_step)
                for sv, sv_next, ss, ss_next, ts, ts_next in self._schedule(passes, blocks, pin_v, pin_s, counts):
                    vel_v, vel_s = self._velocity(history, chunk, xv, sv, xs, ss, branches, audio, kp, text)
                    xv = euler_step(xv, vel_v, sv.view(1, 1, -1, 1, 1), sv_next.view(1, 1, -1, 1, 1))
                    if xs is not None:
                        xs = euler_step(xs, vel_s, ts.view(1, -1, 1), ts_next.view(1, -1, 1))
                if history.needs_writing_pass:
                    zero = torch.zeros(chunk.end - chunk.start, device=self.device)
                    self._velocity(history, chunk, xv, zero, xs, zero if xs is not None else None, branches,
                                   audio, kp, text, writing=True)
                history.append(xv, xs)
                log.debug("chunk %d (latent frames %d..%d) done: %d model calls, history %d tokens",
                          chunk.index, chunk.start, chunk.end - 1, self.stats.model_calls, history.num_tokens())
                self.stats.history_tokens.append(history.num_tokens())
                self.stats.history_bytes.append(history.nbytes())
                yield GeneratedChunk(chunk.start, chunk.end, xv, xs,
                                     int(latent_frame_spans(chunk.frame_ids[:1], mcfg.vae_temporal_stride)[0, 0]))
        finally:
            self.model.train(was_training)

    def sample(self, inputs: SampleInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """All chunks concatenated: (video [B, C, F, h, w], struct [B, 1+4(F-1), motion_dim] or None)."""
        chunks = list(self.generate(inputs))
        video = torch.cat([ch.video for ch in chunks], dim=2)
        struct = torch.cat([ch.struct for ch in chunks], dim=1) if chunks[0].struct is not None else None
        return video, struct

    # ------------------------------------------------------------------------------------
    def _audio(self, audio: Optional[torch.Tensor], b: int) -> dict:
        if audio is None or not self.model.cfg.audio:
            return {"cond": None, "uncond": None}
        if audio.dim() != 3 or audio.shape[0] != b or audio.shape[2] != self.model.cfg.audio_dim:
            raise ValueError(f"audio: shape {tuple(audio.shape)} needs (batch={b}, frames, "
                             f"model.audio_dim={self.model.cfg.audio_dim})")
        cond = audio.to(self.device, self.dtype)
        uncond = torch.zeros_like(cond) if self.cfg.cfg_uncond_audio == "zeros" else None
        return {"cond": cond, "uncond": uncond}

    def _struct_counts(self, chunk: Chunk) -> torch.Tensor:
        spans = latent_frame_spans(chunk.frame_ids, self.model.cfg.vae_temporal_stride)
        return spans[:, 1] - spans[:, 0] + 1

    def _init_chunk(self, chunk: Chunk, inputs: SampleInputs, ref: torch.Tensor, use_struct: bool):
        """Noise for every frame of the chunk; the reference frame (and motion) pinned clean.

        The sampler state stays fp32 whatever the model dtype (the model casts its inputs), so
        low-precision velocities do not accumulate rounding over the Euler steps."""
        b, c, h, w = ref.shape
        ids = chunk.frame_ids.tolist()
        xv = torch.stack([torch.stack([frame_noise(s, "video", t, (c, h, w)) for t in ids], dim=1)
                          for s in inputs.seeds]).to(self.device)
        pin_v = chunk.frame_ids == 0
        pin_s = torch.zeros_like(pin_v)
        if pin_v[0]:
            xv[:, :, 0] = ref.to(self.device, torch.float32)
        xs = None
        if use_struct:
            md = self.model.cfg.motion_dim
            counts = self._struct_counts(chunk).tolist()
            xs = torch.stack([torch.cat([frame_noise(s, "struct", t, (n, md)) for t, n in zip(ids, counts)])
                              for s in inputs.seeds]).to(self.device)
            if pin_v[0] and inputs.ref_motion is not None:
                xs[:, 0] = inputs.ref_motion.to(self.device, torch.float32)
                pin_s = pin_v.clone()
        return xv, xs, pin_v, pin_s

    def _history(self, num_latent: int, branches: tuple[str, ...]) -> History:
        d, mcfg = self.cfg, self.model.cfg
        if not self.use_cache:
            return RecomputeHistory(d.window_blocks)
        if not self.static:
            return CachedHistory(d.window_blocks, branches)
        # the caches and their captured forwards are kept across generations of the same geometry
        blocks = 0 if d.window_blocks else -(-num_latent // mcfg.causal_block_size)
        caches = {}
        for b in branches:
            cache = self._caches.get(b)
            if cache is None or (cache.window, cache.chunk_blocks, cache.capacity_blocks) != (
                    d.window_blocks, d.chunk_blocks, blocks):
                cache = self._caches[b] = StaticKVCache(d.window_blocks, d.chunk_blocks, blocks)
            cache.reset()
            caches[b] = cache
            self._forwards.setdefault(b, StaticForward(self.model))
        return CachedHistory(d.window_blocks, branches, caches)

    def _schedule(self, passes: list, blocks: torch.Tensor, pin_v: torch.Tensor, pin_s: torch.Tensor,
                  counts: torch.Tensor) -> torch.Tensor:
        """Per pass: (video sigma, next video sigma) per frame, the same for struct frames and per struct
        token -- one host-to-device copy per chunk, so no pass waits on the host. Pinned (known) frames
        stay at sigma 0."""
        if not passes:
            return []
        rows = []
        for p in passes:
            sv, sv_next = p.sigma[blocks], p.sigma_next[blocks]
            ss, ss_next = sv.masked_fill(pin_s, 0.0), sv_next.masked_fill(pin_s, 0.0)
            rows.append([sv.masked_fill(pin_v, 0.0), sv_next.masked_fill(pin_v, 0.0), ss, ss_next,
                         ss.repeat_interleave(counts), ss_next.repeat_interleave(counts)])
        return [[t.to(self.device, torch.float32) for t in row] for row in rows]

    def _velocity(self, history: History, chunk: Chunk, xv: torch.Tensor, sv: torch.Tensor,
                  xs: Optional[torch.Tensor], ss: Optional[torch.Tensor], branches: tuple[str, ...],
                  audio: dict, kp, text, writing: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Guided velocity of the chunk's frames; the same call for both history paths."""
        b, f = xv.shape[0], xv.shape[2]
        sv_b = sv.to(self.device, torch.float32).expand(b, f)
        ss_b = ss.to(self.device, torch.float32).expand(b, f) if ss is not None else None
        inp: PassInputs = history.assemble(xv, sv_b, xs, ss_b, chunk.frame_ids)
        self.stats.max_pass_frames = max(self.stats.max_pass_frames, inp.video.shape[2])
        outs = {}
        for branch in branches:
            cache = history.cache(branch)
            if cache is not None:
                cache.writing = writing
            forward = self._forwards[branch] if self.static else self.model
            try:
                out = forward(inp.video, inp.sigma_video, struct=inp.struct, sigma_struct=inp.sigma_struct,
                                 kp_canonical=kp, audio=audio[branch], text_emb=text, frame_ids=inp.frame_ids,
                                 window_blocks=inp.window_blocks, cache=cache)
            finally:
                if cache is not None:
                    cache.writing = False
            self.stats.model_calls += 1
            vs = out.struct[:, -xs.shape[1]:] if xs is not None else None
            outs[branch] = (out.video[:, :, -f:], vs)
        if len(branches) == 1:
            return outs["cond"]
        return tuple(None if u is None else u + self.cfg.cfg_audio * (c - u)
                     for c, u in zip(outs["cond"], outs["uncond"]))


def num_latent_frames(num_video: int, stride: int) -> int:
    """Latent frames needed for ``num_video`` video frames: 1 + ceil((N-1)/stride)."""
    if num_video < 1:
        raise ValueError(f"frames={num_video}: need at least one video frame")
    return 1 + -(-(num_video - 1) // stride)


__all__ = ["ARSampler", "SampleInputs", "GeneratedChunk", "SamplerStats", "frame_noise", "num_latent_frames"]
