"""The model's per-chunk forward at static shapes, captured once as a CUDA graph and replayed.

With a ``StaticKVCache`` every chunk after the sink chunk has the same shapes; what differs between
chunks are a few index tensors (block ids, RoPE angles, audio windows). This wrapper

* builds each chunk's ``Layout`` on the host (once per chunk, not per pass) and copies its tensors into
  one static device layout, so nothing inside a pass is built on the host or synchronises with it;
* hands the model a fixed-size slice of the audio features around the chunk (its windows re-indexed
  into the slice), so the captured graph does not depend on the clip's length;
* on CUDA captures the forward twice (denoising pass, cache-writing pass) on the second call of the
  first steady chunk and replays the graphs afterwards; on the CPU it runs the same static-shape path
  eagerly. Chunks of another shape (the sink chunk, a shorter last chunk) run eagerly.

Call it like the model (the keyword arguments the sampler passes); outputs are fresh tensors.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..models.dualforce import DualForceModel, DualForceOutput
from ..models.layout import Layout, audio_window_index, build_layout
from ..models.static_kv_cache import StaticKVCache
from ..timeline import Timeline

log = logging.getLogger(__name__)


def _to_device(obj: Any, device: torch.device, copy: bool = False) -> Any:
    """A (nested dataclass) layout with every tensor on ``device`` (new storage with ``copy``)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=copy)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device, copy)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple):
        return tuple(_to_device(x, device, copy) for x in obj)
    return obj


def _copy_tensors_(dst: Any, src: Any, path: str = "layout") -> None:
    """Copy every tensor of ``src`` into the same-shaped tensor of ``dst`` (non-tensors are ignored)."""
    if isinstance(dst, torch.Tensor):
        if dst.shape != src.shape:
            raise ValueError(f"{path}: shape {tuple(src.shape)} != static {tuple(dst.shape)}")
        dst.copy_(src)
    elif dataclasses.is_dataclass(dst) and not isinstance(dst, type):
        for f in dataclasses.fields(dst):
            _copy_tensors_(getattr(dst, f.name), getattr(src, f.name), f"{path}.{f.name}")
    elif isinstance(dst, tuple):
        for i, (a, b) in enumerate(zip(dst, src)):
            _copy_tensors_(a, b, f"{path}[{i}]")


def _signature(obj: Any) -> tuple:
    """Shapes of every tensor in a nested structure (what a captured graph depends on)."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), obj.dtype)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return tuple(_signature(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (tuple, list)):
        return tuple(_signature(x) for x in obj)
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in sorted(obj.items()))
    return ()


@dataclass
class _Chunk:
    key: tuple                   # (frame ids, grid, struct, window, audio length) it was built for
    layout: Layout               # host (CPU) layout, audio windows indexing the audio slice
    audio_start: int             # first audio frame of the slice (may be < 0: zero padded)
    audio_width: int


class StaticForward:
    def __init__(self, model: DualForceModel, graphs: bool = True):
        self.model = model
        self.graphs = graphs
        self._chunk: Optional[_Chunk] = None
        self._layout: Optional[Layout] = None        # static device layout
        self._inputs: Optional[dict] = None          # static input buffers
        self._signature: Optional[tuple] = None
        self._layout_frames: tuple = ()
        self._cache: Optional[StaticKVCache] = None  # the cache the static state was built on
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[bool, DualForceOutput] = {}
        self.replays = 0

    # ------------------------------------------------------------------------------------
    def _prepare(self, frame_ids: torch.Tensor, grid_hw: tuple[int, int], use_struct: bool, window: int,
                 num_audio: int) -> _Chunk:
        key = (tuple(frame_ids.tolist()), grid_hw, use_struct, window, num_audio)
        if self._chunk is not None and self._chunk.key == key:
            return self._chunk
        cfg = self.model.cfg
        layout = build_layout(cfg, frame_ids, grid_hw, use_struct, window, torch.device("cpu"))
        tl = Timeline.of(cfg)
        ratio = tl.audio_per_video_frame
        spans = tl.spans(frame_ids)
        first, last = int(spans[0, 0]), int(spans[-1, 1])
        start = (first - cfg.audio_context) * ratio
        width = (last - first + 1 + 2 * cfg.audio_context) * ratio
        streams = [layout.video] + ([layout.struct] if layout.struct is not None else [])
        for s in streams:
            index, valid = audio_window_index(cfg, s, num_audio)
            s.audio_window = ((index - start).clamp(0, width - 1), valid)
        self._chunk = _Chunk(key, layout, start, width)
        return self._chunk

    @staticmethod
    def _audio_slice(audio: Optional[torch.Tensor], start: int, width: int) -> Optional[torch.Tensor]:
        """Audio frames [start, start + width) of the clip, zeros outside it: [B, width, D]."""
        if audio is None:
            return None
        n = audio.shape[1]
        lo, hi = max(start, 0), min(start + width, n)
        part = audio[:, lo:max(hi, lo)]
        return F.pad(part, (0, 0, lo - start, width - (lo - start) - part.shape[1]))

    # ------------------------------------------------------------------------------------
    def __call__(self, video: torch.Tensor, sigma_video: torch.Tensor, struct: Optional[torch.Tensor] = None,
                 sigma_struct: Optional[torch.Tensor] = None, kp_canonical: Optional[torch.Tensor] = None,
                 audio: Optional[torch.Tensor] = None, text_emb: Optional[torch.Tensor] = None,
                 frame_ids: Optional[torch.Tensor] = None, window_blocks: int = 0,
                 cache: Optional[StaticKVCache] = None, audio_drop: Optional[torch.Tensor] = None) -> DualForceOutput:
        if not isinstance(cache, StaticKVCache):
            raise ValueError("StaticForward: needs a StaticKVCache")
        model = self.model
        _, ph, pw = model.video.patch_size
        grid_hw = (video.shape[-2] // ph, video.shape[-1] // pw)
        use_struct = model.struct is not None and struct is not None
        chunk = self._prepare(frame_ids.cpu(), grid_hw, use_struct, cache.window,
                              audio.shape[1] if audio is not None else 0)
        inputs = dict(video_latent=video, sigma_video=sigma_video, struct=struct, sigma_struct=sigma_struct,
                      kp_canonical=kp_canonical, audio=self._audio_slice(audio, chunk.audio_start, chunk.audio_width),
                      text_emb=text_emb, audio_drop=audio_drop)
        if cache is not self._cache:  # buffers of another cache: state and graphs start over
            self._cache, self._signature, self._graphs, self._outputs = cache, None, {}, {}
        steady = bool(cache.rings) and 0 not in chunk.key[0]
        signature = _signature((inputs, chunk.layout))
        if not steady or (self._signature is not None and signature != self._signature):
            # the sink chunk, the pass that allocates the ring buffers, or a chunk of another shape
            return model(**inputs, frame_ids=frame_ids, cache=cache,
                         layout=_to_device(chunk.layout, video.device))
        if self._signature is None:
            self._signature = signature
            self._layout = _to_device(chunk.layout, video.device, copy=True)
            self._inputs = {k: (None if v is None else v.clone()) for k, v in inputs.items()}
            self._layout_frames = chunk.key
        if self._layout_frames != chunk.key:
            _copy_tensors_(self._layout, chunk.layout)
            self._layout_frames = chunk.key
        for k, v in inputs.items():
            if v is not None:
                self._inputs[k].copy_(v)
        writing = cache.writing
        if not (self.graphs and video.is_cuda):
            return model(**self._inputs, frame_ids=frame_ids, cache=cache, layout=self._layout)
        if writing not in self._graphs:
            self._capture(cache, frame_ids)
        self._graphs[writing].replay()
        self.replays += 1
        out = self._outputs[writing]
        return DualForceOutput(**{k: None if v is None else v.clone() for k, v in out.items()})

    def _capture(self, cache: StaticKVCache, frame_ids: torch.Tensor) -> None:
        """Capture the denoising and the writing forward (sharing one memory pool).

        Warm-up runs eagerly as a denoising pass on a side stream (it only rewrites the cache's tail);
        capture records without executing, so the writing graph changes nothing until replayed."""
        writing = cache.writing

        def run() -> DualForceOutput:
            return self.model(**self._inputs, frame_ids=frame_ids, cache=cache, layout=self._layout)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        cache.writing = False
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        pool = None
        for flag in (False, True):
            graph = torch.cuda.CUDAGraph()
            cache.writing = flag
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[flag] = run()
            pool = graph.pool()
            self._graphs[flag] = graph
        cache.writing = writing
        log.info("static forward: captured the chunk forward (frames %s shape) as CUDA graphs", len(frame_ids))
