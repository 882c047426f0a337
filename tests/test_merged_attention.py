"""The merged backend (dense pieces merged by log-sum-exp) equals the dense-mask reference, forward
and backward, and its plan does no masked work."""
from __future__ import annotations

import math

import pytest
import torch

from dualforce_mega.models.attention import PAD_BLOCK, MaskSpec, block_attention
from dualforce_mega.models.layout import build_layout
from dualforce_mega.models.merged_attention import KERNELS, _check_kernel, merge_plan, verify_kernel
from model_utils import random_inputs, randomize_heads, tiny_model

TOL = 1e-5


def _blocks(sizes: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])


def _padded(ids: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -ids.numel() % multiple
    return torch.cat([ids, torch.full((pad,), PAD_BLOCK, dtype=torch.long)])


STRUCT = [1] + [4] * 6           # one token for video frame 0, then 4 per latent frame
CASES = {
    # name: (query ids, key ids, window, sink)
    "equal_8": (_blocks([5] * 8), _blocks([5] * 8), 0, 1),
    "equal_9_not_power_of_two": (_blocks([6] * 9), _blocks([6] * 9), 0, 1),
    "equal_12": (_blocks([3] * 12), _blocks([3] * 12), 0, 1),
    "struct_1_then_4": (_blocks(STRUCT), _blocks(STRUCT), 0, 1),
    "bridge_video_to_struct": (_blocks([6] * 7), _blocks(STRUCT), 0, 1),
    "bridge_struct_to_video": (_blocks(STRUCT), _blocks([6] * 7), 0, 1),
    "window_2_sink_1": (_blocks([4] * 9), _blocks([4] * 9), 2, 1),
    "window_3_sink_2": (_blocks([3] * 10), _blocks([3] * 10), 3, 2),
    "struct_window_3": (_blocks(STRUCT), _blocks(STRUCT), 3, 1),
    "padding": (_padded(_blocks([7] * 5), 8), _padded(_blocks([7] * 5), 8), 0, 1),
    "padding_window": (_padded(_blocks([7] * 6), 8), _padded(_blocks([7] * 6), 8), 2, 1),
    "kv_cache_chunk": (_blocks([4] * 7)[-8:], _blocks([4] * 7), 3, 1),
}


def _qkv(nq: int, nk: int, heads: int, seed: int, head_dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, nq, heads, head_dim, generator=g)
    k = torch.randn(2, nk, heads, head_dim, generator=g)
    v = torch.randn(2, nk, heads, head_dim, generator=g)
    grad = torch.randn(2, nq, heads, head_dim, generator=g)
    return q, k, v, grad


def _fwd_bwd(spec: MaskSpec, backend: str, heads: int, seed: int):
    q, k, v, grad = _qkv(spec.q_blocks.numel(), spec.k_blocks.numel(), heads, seed)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = block_attention(*leaves, spec, backend)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _assert_same(spec: MaskSpec, heads: int = 3, seed: int = 0) -> None:
    ref = _fwd_bwd(spec, "sdpa", heads, seed)
    got = _fwd_bwd(spec, "merged", heads, seed)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert (a - b).abs().max().item() < TOL, f"{name} differs by {(a - b).abs().max().item():.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_equals_sdpa_forward_and_backward(case: str) -> None:
    qb, kb, window, sink = CASES[case]
    _assert_same(MaskSpec(qb, kb, window, sink, key=(case,)))


@pytest.mark.parametrize("sp", [2, 4])
@pytest.mark.parametrize("window", [0, 2])
def test_merged_ulysses_rank_view(sp: int, window: int) -> None:
    """What each Ulysses rank computes: the full sequence padded to a multiple of P (PAD_BLOCK),
    heads / P heads."""
    ids = _padded(_blocks([5] * 7), sp * 4 + 1)  # padding spans more than one shard
    _assert_same(MaskSpec(ids, ids, window, 1), heads=8 // sp, seed=sp)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_does_no_masked_work(case: str) -> None:
    """Pieces cover every allowed (query, key) pair exactly once and nothing else."""
    qb, kb, window, sink = CASES[case]
    spec = MaskSpec(qb, kb, window, sink)
    plan = merge_plan(spec)
    cover = torch.zeros(qb.numel(), kb.numel(), dtype=torch.long)
    for g in plan.groups:
        for qs, ks in zip(g.q.starts, g.k.starts):
            cover[qs:qs + g.q.length, ks:ks + g.k.length] += 1
    assert torch.equal(cover, spec.allowed().long())


@pytest.mark.parametrize("frames", [8, 32, 128])
def test_equal_blocks_give_log_levels_of_strided_views(frames: int) -> None:
    """F equal blocks: ceil(log2 F) + 1 batched calls, each on strided views (no gather)."""
    ids = _blocks([2] * frames)
    plan = merge_plan(MaskSpec(ids, ids))
    assert len(plan.groups) == math.ceil(math.log2(frames)) + 1
    assert all(g.q.step is not None and g.k.step is not None for g in plan.groups)
    assert plan.q_covered_by_first and plan.k_covered_by_first  # the diagonal blocks come first


@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("window", [0, 2])
def test_model_merged_equals_sdpa(block_size: int, window: int) -> None:
    """The whole model (video, struct, both bridges) in training mode: outputs and every parameter
    gradient agree."""
    results = []
    for backend in ("sdpa", "merged"):
        model = tiny_model(causal_block_size=block_size, attn_backend=backend)
        randomize_heads(model)
        inputs = random_inputs(model.cfg, frames=2 * block_size + 1, hw=(2, 4))
        out = model(**inputs, window_blocks=window)
        (out.video.square().mean() + out.struct.square().mean()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert (a.video - b.video).abs().max() < TOL and (a.struct - b.struct).abs().max() < TOL
    assert ga.keys() == gb.keys()
    worst = max((ga[n] - gb[n]).abs().max().item() for n in ga)
    assert worst < TOL


def test_layout_specs_run_merged() -> None:
    """Every mask the model builds (block size 3: struct blocks of 1+4+4 then 12 tokens) matches."""
    model = tiny_model(causal_block_size=3)
    layout = build_layout(model.cfg, torch.arange(7), (2, 3), True, 2, torch.device("cpu"))
    for q, k in (("video", "video"), ("struct", "struct"), ("video", "struct"), ("struct", "video")):
        _assert_same(layout.spec(q, k), heads=2)


def test_unsorted_blocks_rejected() -> None:
    spec = MaskSpec(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2]))
    q, k, v, _ = _qkv(3, 3, 1, seed=0)
    with pytest.raises(ValueError, match="sorted"):
        block_attention(q, k, v, spec, "merged")


def test_kernel_self_check_passes_on_cpu() -> None:
    """The check run once per CUDA kernel (uneven blocks, a 1-token block, window + sink) holds here."""
    assert _check_kernel(KERNELS["cpu_flash"], torch.device("cpu"), torch.float32, 16) < TOL


def test_kernel_check_runs_under_inference_mode() -> None:
    """The first attention call of a sampler comes under inference mode, where the check's backward
    would fail and every kernel would be rejected (seen on the H100: 'no piece kernel ... works')."""
    with torch.inference_mode():
        assert verify_kernel(KERNELS["cpu_flash"], torch.device("cpu"), torch.float32, 16) < TOL


def test_kernel_check_inside_a_checkpointed_forward() -> None:
    """The check may run inside the first checkpointed block's forward but not in its recompute; its
    tensors must not reach the checkpoint's saved-tensor hooks (else: 'a different number of tensors
    was saved during the original forward and recomputation', seen on the H100)."""
    from torch.utils.checkpoint import checkpoint

    checked = []

    def block(x: torch.Tensor) -> torch.Tensor:
        if not checked:            # like choose_kernel's cache: the first call only
            checked.append(verify_kernel(KERNELS["cpu_flash"], torch.device("cpu"), torch.float32, 16))
        return (x.sin() * x).sum()

    x = torch.randn(8, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).backward()
    assert checked[0] < TOL and torch.allclose(x.grad, x.detach().sin() + x.detach() * x.detach().cos())
