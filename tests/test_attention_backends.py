"""Every block-causal backend that runs here agrees with the dense-mask reference."""
from __future__ import annotations

import pytest
import torch

from dualforce_mega.models.attention import PAD_BLOCK, MaskSpec, _flex, block_attention


def _blocks(sizes: list[int], start: int = 0) -> torch.Tensor:
    return torch.cat([torch.full((n,), start + i, dtype=torch.long) for i, n in enumerate(sizes)])


CASES = {
    # name: (query block sizes, key block sizes, window)
    "video_uneven_not_128": ([37] * 5, [37] * 5, 0),       # 185 tokens
    "struct_1_then_4": ([1, 4, 4, 4, 4], [1, 4, 4, 4, 4], 0),
    "bridge_video_to_struct": ([24] * 4, [1, 4, 4, 4], 0),
    "bridge_struct_to_video": ([1, 4, 4, 4], [24] * 4, 0),
    "long_130": ([130, 130, 130], [130, 130, 130], 0),
    "window_2_with_sink": ([9] * 7, [9] * 7, 2),
    "window_3_uneven": ([1, 4, 4, 4, 4, 4], [1, 4, 4, 4, 4, 4], 3),
}


def _spec(case: str, pad: int = 0) -> MaskSpec:
    qs, ks, window = CASES[case]
    qb, kb = _blocks(qs), _blocks(ks)
    if pad:
        qb = torch.cat([qb, torch.full((pad,), PAD_BLOCK)])
        kb = torch.cat([kb, torch.full((pad,), PAD_BLOCK)])
    return MaskSpec(qb, kb, window=window, sink=1, key=(case, pad))


def _qkv(spec: MaskSpec, seed: int, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 16
    q = torch.randn(b, spec.q_blocks.numel(), h, d, generator=g)
    k = torch.randn(b, spec.k_blocks.numel(), h, d, generator=g)
    v = torch.randn(b, spec.k_blocks.numel(), h, d, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _available() -> list[str]:
    names = ["flash"]
    if _flex() is not None:
        names.append("flex")
    return names


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", _available())
def test_forward_matches_reference(case: str, backend: str) -> None:
    spec = _spec(case)
    q, k, v = _qkv(spec, seed=1)
    ref = block_attention(q, k, v, spec, "sdpa")
    out = block_attention(q, k, v, spec, backend)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_backward_matches_reference(case: str) -> None:
    spec = _spec(case)
    grads = {}
    for backend in ("sdpa", "flash"):
        q, k, v = _qkv(spec, seed=2, requires_grad=True)
        out = block_attention(q, k, v, spec, backend)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[backend] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["sdpa"], grads["flash"]):
        assert (a - b).abs().max().item() < 1e-5


def test_padding_is_never_seen() -> None:
    """Padded keys (PAD_BLOCK) never influence real queries, in every backend."""
    spec = _spec("video_uneven_not_128", pad=3)
    q, k, v = _qkv(spec, seed=3)
    n_real = spec.q_blocks.numel() - 3
    for backend in ["sdpa"] + _available():
        out = block_attention(q, k, v, spec, backend)
        k2, v2 = k.clone(), v.clone()
        k2[:, n_real:] = 1e3
        v2[:, n_real:] = -1e3
        out2 = block_attention(q, k2, v2, spec, backend)
        assert torch.equal(out[:, :n_real], out2[:, :n_real]), backend


def test_reference_mask_semantics() -> None:
    spec = _spec("window_2_with_sink")
    allowed = spec.allowed()
    qb, kb = spec.q_blocks, spec.k_blocks
    for i in range(0, qb.numel(), 5):
        for j in range(0, kb.numel(), 4):
            want = kb[j] <= qb[i] and (kb[j] > qb[i] - 2 or kb[j] < 1)
            assert bool(allowed[i, j]) == bool(want)


def test_unsorted_blocks_rejected_by_prefix_backend() -> None:
    spec = MaskSpec(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2]))
    q, k, v = _qkv(spec, seed=4)
    with pytest.raises(ValueError, match="sorted"):
        block_attention(q, k, v, spec, "flash")
