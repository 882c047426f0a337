"""Sliding-window autoregressive sampler for DualForce (both towers, or the video tower alone).

The sampler is the contract training is built to match (DESIGN §4); every rule below has its training
counterpart named in brackets.

1. Chunk 0 is block 0. Latent frame 0 is the given clean reference (sigma 0, pinned) [the clean
   reference frame of every training window, a single-image encoding]. The struct token of video
   frame 0 is pinned too: the reference image's motion, or the data mean when it is unknown [training
   always gives it clean]; so with ``causal_block_size`` 1 block 0 is fully known and only committed.
2. Every chunk starts from per-frame Gaussian noise (seeded by sample seed, stream and absolute
   frame index, so noise does not depend on chunking or on the history path) and runs the
   pyramid passes: flow-matching Euler steps on the shifted ``inference_sigmas`` grid. The struct
   sigma follows the video sigma through ``noise.struct_sigma_of`` when ``diffusion.struct_sigma`` is
   ``tied`` (ablations ``sigma_s_*``) [the same function draws the training struct sigma]; its start is
   then ``k * eps`` (the zero-mean data's expectation at sigma k).
3. A finished chunk is committed to the history (``history.py``) at ``diffusion.sample_history_sigma``
   [training shows clean / lightly noised history blocks, ``history_prob`` / ``history_sigma_max``]: KV-
   cache writing pass, or appended to the recomputed history. It is yielded at once (clean), so callers
   can decode and write it while later chunks are generated.
4. Attention reaches back ``window_blocks`` blocks plus the sink, whose RoPE position is moved to sit
   right before the window; the default window follows the training window (``data.window``), so no
   query sees a larger latent-frame distance than a training window holds [``timeline.py``].
5. Classifier-free guidance on audio: ``v = v_u + cfg_audio * (v_c - v_u)`` for both towers. The
   unconditional branch is the model's dropped-audio form (``audio_drop``) [condition dropout,
   ``diffusion.audio_drop_prob``: the same code path]. Both branches run as one forward of batch 2B
   (conditional rows, then dropped-audio rows; per-sample ``audio_drop``) with one KV cache of batch 2B
   -- or, with ``diffusion.cfg_batched: false``, as two forwards of batch B with a cache each. With
   ``cfg_audio == 1`` (or no audio) only the conditional branch runs.
6. Motion is standardised with the training statistics (``data/normalization.py``): reference motion and
   canonical keypoints go in raw and are standardised here; generated motion comes out raw.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from ..config import DiffusionConfig
from ..data.normalization import Normalizer
from ..models.dualforce import DualForceModel
from ..models.static_kv_cache import StaticKVCache
from ..timeline import Timeline, sampling_window_blocks
from .ar_schedule import Chunk, block_of_frames, plan_chunks, pyramid_passes
from .flow import add_noise, euler_step
from .history import CachedHistory, Committed, PassInputs, RecomputeHistory
from .noise import struct_sigma_of
from .schedules import inference_sigmas
from .static_forward import StaticForward

log = logging.getLogger(__name__)

History = Union[CachedHistory, RecomputeHistory]
# Odd 64-bit multiplier (golden ratio) that spreads (seed, frame, stream) over generator seeds.
_SEED_MIX = 0x9E3779B97F4A7C15
_STREAMS = {"video": 0, "struct": 1, "video_history": 2, "struct_history": 3}


@dataclass
class SampleInputs:
    reference: torch.Tensor                    # [B, C, h, w] clean latent of video frame 0
    num_latent: int                            # latent frames to produce, reference included
    seeds: Sequence[int]                       # one per sample
    audio: Optional[torch.Tensor] = None       # [B, A, audio_dim] from video frame 0, 2 per video frame
    kp_canonical: Optional[torch.Tensor] = None  # [B, kp_dim] raw units; the data mean when unknown
    ref_motion: Optional[torch.Tensor] = None    # [B, motion_dim] raw motion of video frame 0; the data mean when unknown
    text_emb: Optional[torch.Tensor] = None      # [B, L, text_dim]


@dataclass
class GeneratedChunk:
    start: int                                 # first latent frame
    end: int                                   # last latent frame + 1
    video: torch.Tensor                        # [B, C, end-start, h, w] clean latents
    struct: Optional[torch.Tensor] = None      # [B, n, motion_dim] motion of the chunk's video frames (raw units)
    struct_start: int = 0                      # first video frame of ``struct``


@dataclass
class _Forward:
    """One model forward per pass: the guidance branches it serves, stacked along the batch."""
    branches: tuple[str, ...]                  # "cond" / "uncond", in batch order
    audio_drop: Optional[torch.Tensor]         # [len(branches) * B] bool; None without audio
    audio: Optional[torch.Tensor]              # the per-sample conditions, repeated per branch
    kp: Optional[torch.Tensor]
    text: Optional[torch.Tensor]

    @property
    def key(self) -> str:
        """Names its KV cache (and static forward): one per forward, not per branch."""
        return "+".join(self.branches)

    def stack(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A per-sample tensor [B, ...] repeated for every branch: [len(branches) * B, ...]."""
        return _repeat(t, len(self.branches))


def _repeat(t: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    return t if t is None or n == 1 else torch.cat([t] * n)


@dataclass
class SamplerStats:
    model_calls: int = 0                                 # model forwards (a batched CFG pass is one)
    history_tokens: list = field(default_factory=list)   # per chunk, after commit
    history_bytes: list = field(default_factory=list)
    max_pass_frames: int = 0                             # widest model input, in latent frames


def frame_noise(seed: int, stream: str, frame: int, shape: Sequence[int]) -> torch.Tensor:
    """Deterministic fp32 CPU noise for one latent frame of one stream of one sample."""
    g = torch.Generator().manual_seed((seed * _SEED_MIX + len(_STREAMS) * frame + _STREAMS[stream]) % (1 << 63))
    return torch.randn(*shape, generator=g)


class ARSampler:
    """``use_cache``: KV cache (else the recompute reference). ``static``: the cache is a preallocated
    ring buffer (``StaticKVCache``) and every chunk after the first runs one static-shape forward,
    captured as CUDA graphs on GPU (``StaticForward``); memory stays flat as the video grows.
    ``training_window``: the training config's ``data.window`` (needed when ``cfg.window_blocks`` is -1,
    the default). ``normalizer``: the training statistics of the motion streams (identity when None)."""

    def __init__(self, model: DualForceModel, cfg: DiffusionConfig, use_cache: bool = True, static: bool = False,
                 *, training_window: Optional[int] = None, normalizer: Optional[Normalizer] = None):
        self.model = model
        self.cfg = cfg
        self.use_cache = use_cache
        self.static = static and use_cache
        self._forwards: dict[str, StaticForward] = {}
        self._caches: dict[str, StaticKVCache] = {}
        self.timeline = Timeline.of(model.cfg)
        self.window_blocks = sampling_window_blocks(cfg.window_blocks, training_window, self.timeline)
        reach = self.timeline.max_latent_distance(self.window_blocks)
        if training_window is not None and (reach is None or reach > training_window - 1):
            log.warning("diffusion.window_blocks=%d attends %s latent frames back; training windows of %d "
                        "latent frames show at most %d", self.window_blocks,
                        "unboundedly many" if reach is None else reach, training_window, training_window - 1)
        self.normalizer = normalizer or Normalizer()
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
        kp = ref_motion = None
        if use_struct:
            kp = self._motion_input("kp_canonical", inputs.kp_canonical, b, mcfg.kp_dim)
            ref_motion = self._motion_input("struct", inputs.ref_motion, b, mcfg.motion_dim)
        text = inputs.text_emb.to(self.device, self.dtype) if inputs.text_emb is not None else None
        forwards = self._plan_forwards(b, audio, kp, text)
        history: History = self._history(inputs.num_latent, [fw.key for fw in forwards])
        sigmas = inference_sigmas(d.sample_steps, d.sample_shift)
        self.stats = SamplerStats()
        was_training = self.model.training
        self.model.eval()
        try:
            for chunk in plan_chunks(inputs.num_latent, mcfg.causal_block_size, d.chunk_blocks):
                pin = chunk.frame_ids == 0   # the reference frame (and its motion): clean, never updated
                counts = self.timeline.video_counts(chunk.frame_ids)
                xv, xs = self._init_chunk(chunk, inputs.seeds, ref, ref_motion, pin, counts, float(sigmas[0]))
                blocks = block_of_frames(chunk.frame_ids, mcfg.causal_block_size)
                n_blocks = int(blocks[-1]) + 1
                passes = [] if bool(pin.all()) else pyramid_passes(n_blocks, sigmas, d.ar_step)
                for sv, sv_next, ss, ss_next, ts, ts_next in self._schedule(passes, blocks, pin, counts):
                    vel_v, vel_s = self._velocity(history, chunk, xv, sv, xs, ss, forwards)
                    xv = euler_step(xv, vel_v, sv.view(1, 1, -1, 1, 1), sv_next.view(1, 1, -1, 1, 1))
                    if xs is not None:
                        xs = euler_step(xs, vel_s, ts.view(1, -1, 1), ts_next.view(1, -1, 1))
                committed = self._history_form(chunk, inputs.seeds, xv, xs, pin, counts)
                if history.needs_writing_pass:
                    self._velocity(history, chunk, committed.video, committed.sigma_video[0], committed.struct,
                                   None if xs is None else committed.sigma_struct[0], forwards, writing=True)
                history.append(committed)
                log.debug("chunk %d (latent frames %d..%d) done: %d model calls, history %d tokens",
                          chunk.index, chunk.start, chunk.end - 1, self.stats.model_calls, history.num_tokens())
                self.stats.history_tokens.append(history.num_tokens())
                self.stats.history_bytes.append(history.nbytes())
                motion = None if xs is None else self.normalizer.denormalize("struct", xs)
                yield GeneratedChunk(chunk.start, chunk.end, xv, motion,
                                     self.timeline.first_video_frame(chunk.start))
        finally:
            self.model.train(was_training)

    def sample(self, inputs: SampleInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """All chunks concatenated: (video [B, C, F, h, w], struct [B, 1+4(F-1), motion_dim] or None)."""
        chunks = list(self.generate(inputs))
        video = torch.cat([ch.video for ch in chunks], dim=2)
        struct = torch.cat([ch.struct for ch in chunks], dim=1) if chunks[0].struct is not None else None
        return video, struct

    # ------------------------------------------------------------------------------------
    def _audio(self, audio: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
        if audio is None or not self.model.cfg.audio:
            return None
        if audio.dim() != 3 or audio.shape[0] != b or audio.shape[2] != self.model.cfg.audio_dim:
            raise ValueError(f"audio: shape {tuple(audio.shape)} needs (batch={b}, frames, "
                             f"model.audio_dim={self.model.cfg.audio_dim})")
        return audio.to(self.device, self.dtype)

    def _motion_input(self, name: str, raw: Optional[torch.Tensor], b: int, dim: int) -> torch.Tensor:
        """A raw motion input [B, dim] standardised; the data mean (0 after standardisation) when unknown."""
        what = {"struct": "ref_motion", "kp_canonical": "kp_canonical"}[name]
        if raw is None:
            log.warning("%s unknown: using the training data's mean (give the reference image's motion, e.g. "
                        "from the motion extractor)", what)
            return torch.zeros(b, dim, device=self.device)
        if raw.shape != (b, dim):
            raise ValueError(f"{what}: shape {tuple(raw.shape)} != (batch, {dim})")
        return self.normalizer.normalize(name, raw.to(self.device, torch.float32))

    def _plan_forwards(self, b: int, audio: Optional[torch.Tensor], kp: Optional[torch.Tensor],
                       text: Optional[torch.Tensor]) -> list[_Forward]:
        """The forwards of one pass: the conditional branch alone (no guidance), both guidance branches
        stacked into one (batched CFG, the default), or one forward per branch (``cfg_batched: false``)."""
        if audio is None or self.cfg.cfg_audio == 1.0:
            groups: list[tuple[str, ...]] = [("cond",)]
        elif self.cfg.cfg_batched:
            groups = [("cond", "uncond")]
        else:
            groups = [("cond",), ("uncond",)]
        forwards = []
        for branches in groups:
            drop = None
            if audio is not None:
                # the unconditional rows are the dropped-audio form training's condition dropout uses
                drop = torch.tensor([br == "uncond" for br in branches], device=self.device).repeat_interleave(b)
            n = len(branches)
            forwards.append(_Forward(branches, drop, _repeat(audio, n), _repeat(kp, n), _repeat(text, n)))
        return forwards

    def _history(self, num_latent: int, keys: Sequence[str]) -> History:
        window = self.window_blocks
        if not self.use_cache:
            return RecomputeHistory(window)
        if not self.static:
            return CachedHistory(window, keys)
        # the caches and their captured forwards are kept across generations of the same geometry
        blocks = 0 if window else self.timeline.num_blocks(num_latent)
        caches = {}
        for key in keys:
            cache = self._caches.get(key)
            if cache is None or (cache.window, cache.chunk_blocks, cache.capacity_blocks) != (
                    window, self.cfg.chunk_blocks, blocks):
                cache = self._caches[key] = StaticKVCache(window, self.cfg.chunk_blocks, blocks)
            cache.reset()
            caches[key] = cache
            self._forwards.setdefault(key, StaticForward(self.model))
        return CachedHistory(window, keys, caches)

    def _schedule(self, passes: list, blocks: torch.Tensor, pin: torch.Tensor, counts: torch.Tensor) -> list:
        """Per pass: (video sigma, next video sigma) per frame, the same for struct frames (coupled) and per
        struct token -- one host-to-device copy per chunk, so no pass waits on the host. Pinned frames stay
        at sigma 0."""
        rows = []
        for p in passes:
            sv, sv_next = p.sigma[blocks].masked_fill(pin, 0.0), p.sigma_next[blocks].masked_fill(pin, 0.0)
            ss, ss_next = self._struct_sigma(sv), self._struct_sigma(sv_next)
            rows.append([sv, sv_next, ss, ss_next, ss.repeat_interleave(counts), ss_next.repeat_interleave(counts)])
        return [[t.to(self.device, torch.float32) for t in row] for row in rows]

    def _struct_sigma(self, sigma_video: torch.Tensor) -> torch.Tensor:
        """The struct sigma that goes with a video sigma: tied as in training, else the same."""
        return struct_sigma_of(sigma_video, self.cfg) if self.cfg.struct_sigma == "tied" else sigma_video

    def _init_chunk(self, chunk: Chunk, seeds: Sequence[int], ref: torch.Tensor, ref_motion: Optional[torch.Tensor],
                    pin: torch.Tensor, counts: torch.Tensor, sigma_start: float
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Noise for every frame of the chunk; the reference frame (and its motion) pinned clean.

        The sampler state stays fp32 whatever the model dtype (the model casts its inputs), so
        low-precision velocities do not accumulate rounding over the Euler steps."""
        xv = self._video_noise(seeds, "video", chunk, ref.shape[1:])
        if pin[0]:
            xv[:, :, 0] = ref.to(self.device, torch.float32)
        if ref_motion is None:
            return xv, None
        start = float(self._struct_sigma(torch.tensor(sigma_start)))
        xs = start * self._struct_noise(seeds, "struct", chunk, counts, self.model.cfg.motion_dim)
        if pin[0]:
            xs[:, 0] = ref_motion
        return xv, xs

    def _history_form(self, chunk: Chunk, seeds: Sequence[int], xv: torch.Tensor, xs: Optional[torch.Tensor],
                      pin: torch.Tensor, counts: torch.Tensor) -> Committed:
        """The finished chunk as later chunks see it: at the history sigma, pinned frames clean."""
        b, c, f, h, w = xv.shape
        sv = torch.full((f,), self.cfg.sample_history_sigma).masked_fill(pin, 0.0)
        eps = self._video_noise(seeds, "video_history", chunk, (c, h, w))
        video = add_noise(xv, eps, self._per_frame(sv, xv))
        struct = ss = None
        if xs is not None:
            ss = self._struct_sigma(sv)
            eps = self._struct_noise(seeds, "struct_history", chunk, counts, xs.shape[-1])
            struct = add_noise(xs, eps, self._per_token(ss, counts, xs))
            ss = ss.expand(b, f)
        return Committed(video, sv.expand(b, f), struct, ss)

    def _video_noise(self, seeds: Sequence[int], stream: str, chunk: Chunk, frame_shape: Sequence[int]
                     ) -> torch.Tensor:
        """[B, C, F, h, w]: ``frame_noise`` of ``stream`` for every sample and latent frame of the chunk."""
        ids = chunk.frame_ids.tolist()
        return torch.stack([torch.stack([frame_noise(s, stream, t, frame_shape) for t in ids], dim=1)
                            for s in seeds]).to(self.device)

    def _struct_noise(self, seeds: Sequence[int], stream: str, chunk: Chunk, counts: torch.Tensor, dim: int
                      ) -> torch.Tensor:
        """[B, n, dim]: ``frame_noise`` of ``stream`` for the struct tokens of every latent frame (``counts``
        video frames each)."""
        pairs = list(zip(chunk.frame_ids.tolist(), counts.tolist()))
        return torch.stack([torch.cat([frame_noise(s, stream, t, (n, dim)) for t, n in pairs])
                            for s in seeds]).to(self.device)

    def _per_frame(self, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.to(self.device, like.dtype).view(1, 1, -1, 1, 1)

    def _per_token(self, sigma: torch.Tensor, counts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.repeat_interleave(counts).to(self.device, like.dtype).view(1, -1, 1)

    def _velocity(self, history: History, chunk: Chunk, xv: torch.Tensor, sv: torch.Tensor,
                  xs: Optional[torch.Tensor], ss: Optional[torch.Tensor], forwards: list[_Forward],
                  writing: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Guided velocity of the chunk's frames; the same call for both history paths."""
        b, f = xv.shape[0], xv.shape[2]
        sv_b = sv.to(self.device, torch.float32).expand(b, f)
        ss_b = ss.to(self.device, torch.float32).expand(b, f) if ss is not None else None
        inp: PassInputs = history.assemble(xv, sv_b, xs, ss_b, chunk.frame_ids)
        self.stats.max_pass_frames = max(self.stats.max_pass_frames, inp.video.shape[2])
        outs = {}
        for fw in forwards:
            cache = history.cache(fw.key)
            if cache is not None:
                cache.writing = writing
            forward = self._forwards[fw.key] if self.static else self.model
            try:
                out = forward(fw.stack(inp.video), fw.stack(inp.sigma_video), struct=fw.stack(inp.struct),
                              sigma_struct=fw.stack(inp.sigma_struct), kp_canonical=fw.kp, audio=fw.audio,
                              text_emb=fw.text, frame_ids=inp.frame_ids, window_blocks=inp.window_blocks,
                              cache=cache, audio_drop=fw.audio_drop)
            finally:
                if cache is not None:
                    cache.writing = False
            self.stats.model_calls += 1
            for i, branch in enumerate(fw.branches):
                rows = slice(i * b, (i + 1) * b)
                outs[branch] = (out.video[rows, :, -f:], None if xs is None else out.struct[rows, -xs.shape[1]:])
        if len(outs) == 1:
            return outs["cond"]
        return tuple(None if u is None else u + self.cfg.cfg_audio * (c - u)
                     for c, u in zip(outs["cond"], outs["uncond"]))


__all__ = ["ARSampler", "SampleInputs", "GeneratedChunk", "SamplerStats", "frame_noise"]
