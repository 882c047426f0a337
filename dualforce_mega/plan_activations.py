"""Activation memory of one training micro batch, itemised from the model's layer structure.

The bytes autograd saves for the backward, per token of each stream, read off the code in
``models/`` (blocks.py, layers.py, audio.py, bridge.py, rope.py): every fp32 island (``.float()``
before a norm, modulation, a gate) saves an fp32 copy, every linear saves its input in the
activation dtype, the attention kernel saves q, k, v, out and the log-sum-exp. Parameters are not
activations and are not counted. ``tests/test_plan.py`` checks the total against the peak measured
by torch's profiler on CPU.

Sequence parallelism: video tokens per rank are the padded shard; a video self-attention holds the
full sequence for H/P heads after the all-to-all (the same bytes as the shard for all heads);
the struct->video bridge gathers every video key and value (full length on every rank).

With activation checkpointing each checkpointed block (video block, struct block, bridge layer) keeps
only its inputs; the backward recomputes one layer at a time, so the peak is the inputs of the
checkpointed blocks, the saved tensors of the layers that are not checkpointed, and one checkpointed
layer's saved tensors. ``total_with`` prices any subset of checkpointed layers (the planner's
``auto`` choice, parallel/parallelize.py).

Not included: short-lived buffers (backward temporaries -- ~1% of the total in the CPU measurement --
and, under SP, the send/receive copies of one layer's q/k/v around an all-to-all).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import ModelConfig
from .timeline import Timeline

FP32 = 4          # bytes of the fp32 copies (norms, modulation, gates, RoPE tables, softmax statistics)
INDEX = 8         # bytes of an int64 index


@dataclass
class StreamShape:
    tokens: int          # tokens of this stream held by one rank
    keys: int            # tokens its attention keys span (full video length under SP)
    frames: int          # per-frame groups (latent frames)


@dataclass
class ActivationReport:
    blocks: list[list[int]] = field(default_factory=list)  # bytes saved inside each block of each layer
    inputs: list[int] = field(default_factory=list)      # bytes of each layer's block inputs (kept when checkpointed)
    outside: int = 0                                     # embeddings, projectors, heads (outside the layers)

    @property
    def per_layer(self) -> list[int]:
        """Bytes saved inside each transformer layer (its blocks together)."""
        return [sum(b) for b in self.blocks]

    @property
    def layer_inputs(self) -> int:
        """Bytes of every layer's block inputs (all layers checkpointed)."""
        return sum(self.inputs)

    def total(self, checkpointing: bool) -> int:
        return self.total_with(range(len(self.per_layer)) if checkpointing else ())

    def total_with(self, checkpointed) -> int:
        """Peak with the layers ``checkpointed`` (indices) recomputed in the backward."""
        ck = set(checkpointed)
        kept = sum(b for i, b in enumerate(self.per_layer) if i not in ck)
        recompute = max((b for i in ck for b in self.blocks[i]), default=0)   # one block at a time
        return kept + sum(self.inputs[i] for i in ck) + recompute + self.outside


def _norm(d: int) -> int:
    """FP32LayerNorm / LayerNorm: the fp32 input plus mean and rstd."""
    return FP32 * d + 2 * FP32


def _rms(d: int) -> int:
    """RMSNorm (QK norm): fp32 input, normalised value and 1/rms."""
    return 2 * FP32 * d + FP32


def _attn_kernel(m: ModelConfig, a: int, lq: int, lk: int, masked: bool, dense_mask: bool) -> int:
    """q, k, v, out (activation dtype), log-sum-exp (fp32 per head); the dense CPU reference also
    keeps its additive mask [Lq, Lk] (in the activation dtype)."""
    saved = a * m.dim * (2 * lq + 2 * lk) + FP32 * m.heads * lq
    if masked and dense_mask:
        saved += a * lq * lk
    return saved


def _modulated_sublayer_in(m: ModelConfig, a: int) -> int:
    """norm -> per-frame modulate (fp32 copy of the normed input) -> linear input (activation dtype)."""
    return _norm(m.dim) + FP32 * m.dim + a * m.dim


def self_attention_sublayer(m: ModelConfig, a: int, s: StreamShape, dense_mask: bool) -> int:
    d = m.dim
    per_token = _modulated_sublayer_in(m, a) + 2 * _rms(d) + 2 * FP32 * m.head_dim  # + RoPE cos/sin (q, k)
    per_token += FP32 * d                                                           # gated residual
    return s.tokens * per_token + _self_kernel(m, a, s, dense_mask)


def _self_kernel(m: ModelConfig, a: int, s: StreamShape, dense_mask: bool) -> int:
    # q, k, v, out of the local tokens (after the all-to-all: all tokens for H/P heads -- equal bytes)
    saved = 4 * a * m.dim * s.tokens + FP32 * m.heads * s.tokens
    if dense_mask:  # the mask covers the full sequence on every rank
        saved += a * s.keys * s.keys
    return saved


def text_sublayer(m: ModelConfig, a: int, s: StreamShape, text_len: int) -> int:
    d = m.dim
    per_token = _norm(d) + a * d + _rms(d)                  # norm3, q linear input, QK norm of q
    keys = text_len * (a * d + _rms(d) + 2 * a * d)          # k/v linear input, QK norm of k, k and v
    return s.tokens * per_token + keys + _attn_kernel(m, a, s.tokens, 0, False, False)


def audio_sublayer(m: ModelConfig, a: int, s: StreamShape, audio_len: int, window: int, per_group: int) -> int:
    d = m.dim
    per_token = _norm(d) + a * d + _rms(d)                  # norm, q linear input, QK norm of q
    per_token += 2 * a * d + FP32 * m.heads                 # q and out in the kernel, log-sum-exp
    per_token += FP32 + a * d + FP32 * d                    # keep mask, o input, tanh-gated residual
    keys = audio_len * (a * d + _rms(d))                    # k/v linear input, QK norm of k
    groups = math.ceil(s.tokens / per_group) + 1            # windows the shard's groups gather
    keys += groups * window * (2 * a * d + FP32 + INDEX)    # gathered k/v windows, mask, index
    return s.tokens * per_token + keys


def ffn_sublayer(m: ModelConfig, a: int, s: StreamShape) -> int:
    per_token = _modulated_sublayer_in(m, a) + 2 * a * m.ffn_dim + FP32 * m.dim  # GELU in/out, gated residual
    return s.tokens * per_token


def bridge_layer(m: ModelConfig, a: int, v: StreamShape, st: StreamShape, dense_mask: bool) -> int:
    d, hd = m.dim, m.head_dim
    rope = 2 * FP32 * (hd // 2)                              # cos and sin of 1D RoPE over the full head dim
    # norms; normed streams are the linear inputs of both directions
    saved = v.tokens * (_norm(d) + a * d) + st.tokens * (_norm(d) + a * d)
    # s2v: video queries (local), struct keys
    saved += v.tokens * (_rms(d) + rope) + st.tokens * (_rms(d) + rope)
    saved += _attn_kernel(m, a, v.tokens, st.tokens, True, dense_mask)
    if m.bridge == "bidirectional":
        # v2s: struct queries, every video key (all-gathered under SP)
        saved += st.tokens * (_rms(d) + rope) + v.tokens * (_rms(d) + rope)
        saved += _attn_kernel(m, a, st.tokens, v.keys, True, dense_mask)
    return saved


def activation_report(m: ModelConfig, batch: int, latent_frames: int, grid_hw: tuple[int, int], sp: int,
                      act_bytes: int, dense_mask: bool, text_len: int = 0, with_audio: bool = True
                      ) -> ActivationReport:
    """Saved activations of one micro batch of ``batch`` clips on one rank of an SP group of ``sp``."""
    a, d = act_bytes, m.dim
    lv = latent_frames * grid_hw[0] * grid_hw[1]
    shard = math.ceil(lv / sp)
    tl = Timeline.of(m)
    n = tl.video_frames(latent_frames)
    per_frame_audio = tl.audio_per_video_frame
    audio_len = n * per_frame_audio if with_audio and m.audio else 0
    text = text_len if m.text_dim > 0 else 0
    video = StreamShape(shard, shard * sp, latent_frames)
    struct = StreamShape(n, n, latent_frames) if m.struct_tower else None
    video_window = (m.vae_temporal_stride + 2 * m.audio_context) * per_frame_audio
    struct_window = (1 + 2 * m.audio_context) * per_frame_audio

    rep = ActivationReport()
    for i in range(m.layers):
        video_block = self_attention_sublayer(m, a, video, dense_mask) + ffn_sublayer(m, a, video)
        if text:
            video_block += text_sublayer(m, a, video, text)
        if audio_len and i < m.audio_layers:
            video_block += audio_sublayer(m, a, video, audio_len, video_window, grid_hw[0] * grid_hw[1])
        blocks = [video_block]
        if struct is not None:
            struct_block = self_attention_sublayer(m, a, struct, dense_mask) + ffn_sublayer(m, a, struct)
            if audio_len and i < m.audio_layers:
                struct_block += audio_sublayer(m, a, struct, audio_len, struct_window, 1)
            blocks.append(struct_block)
            if i < m.fusion_depth:
                blocks.append(bridge_layer(m, a, video, struct, dense_mask))
        rep.blocks.append([batch * b for b in blocks])
        # each block keeps its input: video and struct block, and the bridge's two inputs
        tokens = shard + (n if struct is not None else 0)
        rep.inputs.append(batch * a * d * tokens * (2 if struct is not None and i < m.fusion_depth else 1))

    patch = m.in_channels * math.prod(m.patch_size)
    outside = shard * (patch * a + _norm(d) + FP32 * d + a * d)          # patch conv input; head norm/mod/linear
    if text:
        outside += text * (m.text_dim * a + 2 * a * d)                  # text embedding MLP
    towers = 1 + (struct is not None)
    if audio_len:
        outside += towers * audio_len * (m.audio_dim * a + 3 * a * d + _norm(d))  # audio projectors
    outside += towers * latent_frames * (m.freq_dim + 8 * d) * FP32    # sigma embedding -> 6*dim modulation
    if struct is not None:
        outside += n * (m.motion_dim * a + 2 * a * d)                  # motion tokenizer
        outside += n * (_norm(d) + FP32 * d + a * d)                   # struct head
        outside += n * (m.motion_dim + m.flame_dim) * FP32             # aux heads (x0 estimate, FLAME)
    rep.outside = batch * outside
    return rep
