"""DualForce: video DiT + struct DiT, shallow cross-attention bridge, gated audio conditioning.

One forward serves Phase 2 (video only), Phase 4 (both towers), training (all frames, no cache),
KV-cache inference (a chunk of frames at absolute ``frame_ids``) and the sliding-window reference
(``window_blocks``).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, validate_model
from .audio import AudioContext
from .blocks import Attention, TextContext
from .bridge import BridgeLayer
from .heads import AuxHeads
from .kv_cache import KVCache
from .layout import Layout, StreamLayout, audio_window_index, build_layout, shard_video
from .struct_dit import StructDiT
from .video_dit import VideoDiT


class DualForceOutput(dict):
    """The model's outputs by name, readable as attributes (``out.video``).

    A ``dict`` because DeepSpeed's ZeRO-3 hooks find the tensors of dicts, lists and tuples only
    (and warn that they cannot see inside other types).
      video       [B, C, F, H, W] predicted velocity
      struct      [B, N, motion_dim] predicted velocity
      flame       [B, N, flame_dim] from the struct x0 estimate
      lip_struct  [B, F, lipsync_dim] per latent frame
      lip_audio   [B, F, lipsync_dim] per latent frame
    """
    FIELDS = ("video", "struct", "flame", "lip_struct", "lip_audio")

    def __init__(self, video: Optional[torch.Tensor] = None, struct: Optional[torch.Tensor] = None,
                 flame: Optional[torch.Tensor] = None, lip_struct: Optional[torch.Tensor] = None,
                 lip_audio: Optional[torch.Tensor] = None):
        super().__init__(video=video, struct=struct, flame=flame, lip_struct=lip_struct, lip_audio=lip_audio)

    def __getattr__(self, name: str) -> Optional[torch.Tensor]:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"DualForceOutput has no field {name!r}") from None

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self.FIELDS:
            raise AttributeError(f"DualForceOutput has no field {name!r} (fields: {', '.join(self.FIELDS)})")
        self[name] = value


def _run(block: nn.Module, recompute: bool, *args):
    """``block(*args)``, recomputed in the backward when the block is marked for activation checkpointing."""
    if recompute and block.activation_checkpointing:
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class SequenceParallelGroup(Protocol):
    """The model's view of its sequence-parallel group (installed by
    ``dualforce_mega.parallel.sequence_parallel.apply_sequence_parallel``)."""
    rank: int
    size: int

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather ``x`` [B, L_shard, ...] along dim 1 (backward: reduce-scatter of the gradient)."""
        ...


class DualForceModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        self.video = VideoDiT(cfg)
        self.struct = StructDiT(cfg) if cfg.struct_tower else None
        self.bridge = nn.ModuleList(BridgeLayer(cfg) for _ in range(cfg.fusion_depth)) if cfg.struct_tower \
            else nn.ModuleList()
        self.aux = AuxHeads(cfg) if cfg.struct_tower else None
        # None = off. Otherwise each rank of the group runs its shard of the video tokens; the struct
        # stream, audio and text are replicated, and every rank returns the full outputs.
        self.sequence_parallel: Optional[SequenceParallelGroup] = None
        self.reset_parameters()
        for name, m in self.named_modules():
            if isinstance(m, Attention):
                m.cache_name = name

    def transformer_blocks(self) -> list[tuple[int, str, nn.Module]]:
        """(layer index, qualified name, module) of every transformer block: the units that activation
        checkpointing and regional compilation act on (video block, struct block, bridge layer)."""
        out = [(i, f"video.blocks.{i}", b) for i, b in enumerate(self.video.blocks)]
        if self.struct is not None:
            out += [(i, f"struct.blocks.{i}", b) for i, b in enumerate(self.struct.blocks)]
        out += [(i, f"bridge.{i}", b) for i, b in enumerate(self.bridge)]
        return sorted(out, key=lambda t: t[0])

    @property
    def gradient_checkpointing(self) -> bool:
        """True when every transformer block recomputes its activations in the backward."""
        return all(b.activation_checkpointing for _, _, b in self.transformer_blocks())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        for _, _, block in self.transformer_blocks():
            block.activation_checkpointing = bool(on)

    def set_attention_backend(self, backend: str) -> None:
        """Switch every block-causal attention layer to ``backend`` (auto | sdpa | flex | flash)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend

    def reset_parameters(self) -> None:
        self.video.init_weights()
        if self.struct is not None:
            self.struct.init_weights()
        for layer in self.bridge:
            layer.zero_init()

    # ------------------------------------------------------------------------------------
    def forward(self, video_latent: torch.Tensor, sigma_video: torch.Tensor,
                struct: Optional[torch.Tensor] = None, sigma_struct: Optional[torch.Tensor] = None,
                kp_canonical: Optional[torch.Tensor] = None, audio: Optional[torch.Tensor] = None,
                text_emb: Optional[torch.Tensor] = None, frame_ids: Optional[torch.Tensor] = None,
                window_blocks: int = 0, cache: Optional[KVCache] = None,
                return_aux: bool = False, layout: Optional[Layout] = None,
                audio_drop: Optional[torch.Tensor] = None, text_drop: Optional[torch.Tensor] = None
                ) -> DualForceOutput:
        """
        video_latent [B, C, F, H, W] noisy latents; sigma_video [B, F] per latent frame.
        struct [B, N, 70] noisy motion, N = video frames of the F latent frames; sigma_struct [B, F].
        audio [B, A, D_a] features of the whole clip from video frame 0 (absolute time).
        frame_ids [F] absolute latent-frame indices (default 0..F-1), on CPU.
        layout: the ``build_layout`` of these frames, prebuilt (static-shape inference builds it outside
        a captured graph); default: built here.
        audio_drop / text_drop [B] bool: the condition is dropped for that sample (its cross-attention
        adds nothing) — the form of condition dropout in training and of CFG's unconditional branch.
        The residual streams are fp32; every layer computes in its parameters' dtype.
        """
        cfg = self.cfg
        b, _, f = video_latent.shape[:3]
        if sigma_video.shape != (b, f):
            raise ValueError(f"sigma_video: shape {tuple(sigma_video.shape)} != (batch, frames) = {(b, f)}")
        if frame_ids is None:
            frame_ids = torch.arange(f)
        if cache is not None and window_blocks and cache.window != window_blocks:
            raise ValueError(f"window_blocks={window_blocks} differs from the cache's window {cache.window}")
        window = cache.window if cache is not None else window_blocks
        use_struct = self.struct is not None and struct is not None
        sp = self.sequence_parallel
        if sp is None:
            xv, grid = self.video.embed(video_latent)
            if layout is None:
                layout = build_layout(cfg, frame_ids.cpu(), grid[1:], use_struct, window, xv.device)
        else:
            if cache is not None or layout is not None:
                raise ValueError("cache / layout: KV-cache inference does not run sequence-parallel")
            xv, grid, layout = self._embed_shard(video_latent, frame_ids, use_struct, window, sp)
        xv = xv.float()
        e_v, e0_v = self.video.modulation(sigma_video)
        text = None
        if text_emb is not None and self.video.text_embedding is not None:
            emb = self.video.text_embedding(text_emb.to(self.video.text_embedding[0].weight.dtype))
            text = TextContext(emb, None if text_drop is None else ~text_drop.bool())
        audio_keep = None if audio_drop is None else ~audio_drop.bool()
        audio_v = self._audio_context(self.video, layout.video, audio, audio_keep)
        spec_vv = layout.spec("video", "video")

        xs = e_s = audio_s = None
        if use_struct:
            n = layout.struct.blocks.numel()
            if struct.shape[:2] != (b, n):
                raise ValueError(f"struct: shape {tuple(struct.shape)} needs (batch, video frames) = {(b, n)} "
                                 f"for latent frames {frame_ids.tolist()}")
            sigma_struct = sigma_video if sigma_struct is None else sigma_struct
            kp = self.struct.keypoint_condition(kp_canonical) if kp_canonical is not None else None
            xs = self.struct.embed(struct).float()
            e_s, e0_s = self.struct.modulation(sigma_struct, kp)
            audio_s = self._audio_context(self.struct, layout.struct, audio, audio_keep)
            specs = (layout.spec("struct", "struct"), layout.spec("video", "struct"), layout.spec("struct", "video"))

        # per-block activation checkpointing (``block.activation_checkpointing``, set by parallel.parallelize)
        recompute = self.training and cache is None and torch.is_grad_enabled()
        for i in range(cfg.layers):
            xv = _run(self.video.blocks[i], recompute, xv, e0_v, layout.video.groups, layout.video.angles, spec_vv,
                      text, audio_v, cache)
            if xs is not None:
                xs = _run(self.struct.blocks[i], recompute, xs, e0_s, layout.struct.groups, layout.struct.angles,
                          specs[0], None, audio_s, cache)
                if i < len(self.bridge):
                    xv, xs = _run(self.bridge[i], recompute, xv, xs, layout.video.bridge_angles,
                                  layout.struct.bridge_angles, specs[1], specs[2], cache)

        tokens = self.video.head(xv, e_v, layout.video.groups)
        if sp is not None:
            # out_channels * patch values per token, far less than the hidden state: gathering them
            # lets every rank return the full prediction (the loss needs no sharding)
            tokens = sp.gather(tokens)[:, :layout.shard.tokens]
        out = DualForceOutput(video=self.video.unembed(tokens, grid))
        if use_struct:
            out.struct = self.struct.head(xs, e_s, layout.struct.groups)
            if return_aux:
                self.aux.fill(out, struct, sigma_struct, layout, audio)
        return out

    def _embed_shard(self, video_latent: torch.Tensor, frame_ids: torch.Tensor, use_struct: bool, window: int,
                     sp: SequenceParallelGroup) -> tuple[torch.Tensor, tuple[int, int, int], Layout]:
        """This rank's video tokens [B, shard length, dim] (zero rows for padding), grid, shard layout.

        Only the latent frames the shard touches are embedded; every rank calls the embedding
        (ZeRO-3 gathers its weights collectively), even one whose shard is all padding.
        """
        _, ph, pw = self.video.patch_size
        f, hh, ww = video_latent.shape[2:]
        grid = (f, hh // ph, ww // pw)
        hw = grid[1] * grid[2]
        layout = shard_video(build_layout(self.cfg, frame_ids.cpu(), grid[1:], use_struct, window,
                                          video_latent.device), sp.rank, sp.size)
        shard = layout.shard
        first = min(shard.start, shard.tokens - 1) // hw
        last = (shard.start + shard.real - 1) // hw if shard.real else first
        x, _ = self.video.embed(video_latent[:, :, first:last + 1])
        offset = shard.start - first * hw
        x = x[:, offset:offset + shard.real]
        if shard.real < shard.length:
            x = torch.cat([x, x.new_zeros(x.shape[0], shard.length - shard.real, x.shape[2])], dim=1)
        return x, grid, layout

    def _audio_context(self, tower, stream: StreamLayout, audio: Optional[torch.Tensor],
                       keep: Optional[torch.Tensor]) -> Optional[AudioContext]:
        if audio is None or tower.audio_projector is None:
            return None
        if audio.shape[-1] != self.cfg.audio_dim:
            raise ValueError(f"audio: feature dim {audio.shape[-1]} != model.audio_dim={self.cfg.audio_dim}")
        feats = tower.audio_projector(audio.to(tower.audio_projector[0].weight.dtype))
        # computed on the host from the layout's spans (no device read), or prebuilt by static-shape inference
        index, valid = stream.audio_window or audio_window_index(self.cfg, stream, audio.shape[1])
        return AudioContext(feats, index.to(feats.device), valid.to(feats.device), stream.audio_groups, keep)
